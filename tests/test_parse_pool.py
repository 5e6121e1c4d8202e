"""Passes parse in processes (MAILSYNC_PARSE_PROCESSES): the same results as in-process
parsing, failures carried back, a pool whose process died is replaced, a message that kills
its parse process fails alone and never runs in the worker, and a worker's shutdown stops
the processes."""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Sequence
from typing import Any

from backend.sync import parsing
from backend.sync.parsing import (
    ParsedMessage,
    UnparseableMessage,
    parse_each,
    parse_many,
    parse_message,
)
from tests.factories import raw_message
from tests.sync_helpers import wait_until
from worker import settings as worker_settings


async def test_parse_processes_answer_as_parsing_in_process_does() -> None:
    raws = [
        raw_message("Pat <pat@pool.test>", ["olivia@crm.test"], "Pooled é", html="<p>Hi</p>"),
        b"",
        raw_message("quinn@pool.test", ["olivia@crm.test"], "Second"),
    ]
    pooled = await parse_many(raws, 2)  # split between two processes, answered in order
    threaded = await parse_many(raws, 0)
    assert pooled[0] == parse_message(raws[0]) == threaded[0]
    assert isinstance(pooled[0], ParsedMessage) and pooled[0].subject == "Pooled é"
    assert isinstance(pooled[1], UnparseableMessage) and isinstance(threaded[1], UnparseableMessage)
    assert pooled[2] == parse_message(raws[2])


async def test_a_dead_parse_process_does_not_fail_the_pass() -> None:
    raw = raw_message("pat@pool.test", ["olivia@crm.test"], "After a crash")
    await parse_many([raw], 1)
    pool = parsing._pool
    assert pool is not None
    for pid in list(pool._processes or {}):  # type: ignore[attr-defined]  # our own children
        os.kill(pid, signal.SIGKILL)

    async def broken() -> bool:
        return bool(pool._broken)  # type: ignore[attr-defined]

    await wait_until(broken, 60)
    (answer,) = await parse_many([raw], 1)  # parsed in a process of its own meanwhile
    assert isinstance(answer, ParsedMessage) and answer.subject == "After a crash"
    (again,) = await parse_many([raw], 1)  # by a new pool
    assert isinstance(again, ParsedMessage)
    assert parsing._pool is not None and parsing._pool is not pool


POISON = b"Subject: kills its parser\r\n\r\nboom"


def parse_or_die(raws: Sequence[bytes]) -> list[ParsedMessage | Exception]:
    """`parse_each`, except that the poison message kills the process that parses it, as a
    parser crash (a C extension, the OOM killer) would; in the worker's own process it only
    raises, so that a test that got that far fails instead of killing pytest."""
    if POISON in raws:
        if multiprocessing.parent_process() is None:
            raise AssertionError("the worker parsed a message that kills its parser")
        os._exit(1)
    return parse_each(raws)


async def test_a_message_that_kills_its_parse_process_fails_alone() -> None:
    before = raw_message("pat@pool.test", ["olivia@crm.test"], "Before the poison")
    after = raw_message("quinn@pool.test", ["olivia@crm.test"], "After the poison")
    first, poisoned, last = await parse_many([before, POISON, after], 2, parse=parse_or_die)
    assert isinstance(first, ParsedMessage) and first.subject == "Before the poison"
    assert isinstance(poisoned, UnparseableMessage)  # filed as IMPORT_FAILED by the pass
    assert isinstance(last, ParsedMessage) and last.subject == "After the poison"
    (next_batch,) = await parse_many([after], 2, parse=parse_or_die)  # a new pool
    assert isinstance(next_batch, ParsedMessage)


class _Runtime:
    closed = False

    async def close(self) -> None:
        self.closed = True


async def test_worker_shutdown_stops_the_parse_processes() -> None:
    await parse_many([raw_message("pat@pool.test", ["olivia@crm.test"], "Warm")], 1)
    pool = parsing._pool
    assert pool is not None
    children = list((pool._processes or {}).values())  # type: ignore[attr-defined]
    assert children
    runtime = _Runtime()
    ctx: dict[str, Any] = {"runtime": runtime}
    await worker_settings.shutdown(ctx)
    assert parsing._pool is None and runtime.closed
    assert not any(child.is_alive() for child in children)
