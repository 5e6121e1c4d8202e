"""Per-mailbox pacing shared by every provider instance of a worker process.

A pass, a send job and a webhook-triggered pass of the same mailbox each build their own
provider, yet the providers' limits are per mailbox (Gmail: quota units per user per
minute; Graph: four concurrent requests per mailbox and app). So what must be shared lives
here, in process-wide registries keyed by mailbox id, one per event loop (asyncio
primitives belong to the loop that created them). Across worker processes nothing is
shared: arq runs one pass per mailbox at a time (R14), which keeps the count of processes
talking to one mailbox small, and each backs off on the 429s it sees.
"""

from __future__ import annotations

import asyncio
import random
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_registries: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], object]] = (
    weakref.WeakKeyDictionary()
)


def _shared(kind: str, key: str, make: Callable[[], T]) -> T:
    """The one `kind` object for `key` on the running loop, made on first use."""
    registry = _registries.setdefault(asyncio.get_running_loop(), {})
    found = registry.get((kind, key))
    if found is None:
        found = registry[(kind, key)] = make()
    return found  # type: ignore[return-value]


def mailbox_semaphore(key: str, limit: int) -> asyncio.Semaphore:
    """At most `limit` requests in flight to one mailbox from this process."""
    return _shared("semaphore", key, lambda: asyncio.Semaphore(limit))


def mailbox_state(key: str) -> dict[str, Any]:
    """Plain values shared by the providers of one mailbox (the newest credentials)."""
    return _shared("state", key, dict)


def mailbox_lock(key: str) -> asyncio.Lock:
    """One holder at a time per mailbox in this process (token refresh)."""
    return _shared("lock", key, asyncio.Lock)


class Backoff:
    """Exponential backoff with jitter and an adaptive batch size for one mailbox.

    Google asks clients that hit a rate limit to retry after 1, 2, 4 ... seconds plus a random
    part, up to a maximum of 32 or 64 seconds (Gmail "Resolve errors"; Cloud "exponential
    backoff"); quota errors carry no Retry-After, so the pacing is driven by the 429s alone.
    The batch size shrinks by half on a rate-limited batch and grows back by a step after
    each clean one (within `max_batch`, 50 for Gmail, whose batching guide discourages more).
    Every caller for the mailbox waits for the same `not_before`, so one 429 slows them all.
    """

    def __init__(
        self,
        *,
        base: float = 1.0,
        cap: float = 64.0,
        max_batch: int = 50,
        min_batch: int = 5,
        step: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.max_batch = max_batch
        self.min_batch = min_batch
        self.step = step
        self.batch_size = max_batch
        self.failures = 0
        self.not_before = 0.0
        self._clock = clock

    async def wait(self) -> float:
        """Sleep until the mailbox may be called again; returns the seconds slept."""
        delay = self.not_before - self._clock()
        if delay > 0:
            await asyncio.sleep(delay)
            return delay
        return 0.0

    def next_delay(self) -> float:
        """The wait after one more refusal: half the exponential step plus up to as much again
        at random, so that callers refused together do not retry together."""
        step = min(self.cap, self.base * 2.0 ** max(self.failures - 1, 0))
        return float(step / 2 + random.uniform(0, step / 2))

    def rate_limited(self, retry_after: float | None = None) -> float:
        """Record a refusal; returns how long from now the mailbox rests."""
        self.failures += 1
        self.batch_size = max(self.min_batch, self.batch_size // 2)
        delay = retry_after if retry_after is not None else self.next_delay()
        self.not_before = max(self.not_before, self._clock() + delay)
        return delay

    def succeeded(self) -> None:
        """A call or batch went through without a refusal."""
        self.failures = 0
        self.batch_size = min(self.max_batch, self.batch_size + self.step)

    @property
    def exhausted(self) -> bool:
        """The waits reached the cap: the limit is not a short one, give up the pass."""
        return bool(self.base * 2.0 ** max(self.failures - 1, 0) > self.cap)


def mailbox_backoff(provider: str, key: str, make: Callable[[], Backoff] = Backoff) -> Backoff:
    return _shared(f"backoff:{provider}", key, make)
