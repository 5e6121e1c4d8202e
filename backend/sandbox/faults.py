"""Fault injection: make chosen requests fail or slow down, per account and per path."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    status: int = 0  # 0: no error, only the delay
    reason: str | None = None  # Google `errors[0].reason`, Graph `error.code`
    message: str | None = None
    retry_after: float | None = None
    delay_seconds: float = 0.0
    # Set (even 0): the request is processed first (a send is accepted and delivered), then
    # the answer waits this long, and is the fault's error when `status` is set: a provider
    # that accepted a message whose answer never reached the client in time.
    after_delay_seconds: float | None = None
    account: str | None = None  # None: every account
    path: str | None = None  # regular expression searched in the request path
    method: str | None = None
    times: int | None = None  # None: until cleared
    id: int = 0
    hits: int = 0

    @property
    def after(self) -> bool:
        """The request runs before this fault applies (see `after_delay_seconds`)."""
        return self.after_delay_seconds is not None

    def matches(self, account: str | None, method: str, path: str) -> bool:
        if self.account is not None and (account or "").lower() != self.account.lower():
            return False
        if self.method is not None and self.method.upper() != method.upper():
            return False
        return self.path is None or re.search(self.path, path) is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "reason": self.reason,
            "message": self.message,
            "retryAfter": self.retry_after,
            "delaySeconds": self.delay_seconds,
            "afterDelaySeconds": self.after_delay_seconds,
            "account": self.account,
            "path": self.path,
            "method": self.method,
            "times": self.times,
            "hits": self.hits,
        }


@dataclass
class FaultTable:
    faults: list[Fault] = field(default_factory=list)
    _next_id: int = 1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            fault.id = self._next_id
            self._next_id += 1
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def take(self, account: str | None, method: str, path: str) -> Fault | None:
        """The first matching fault, counted as used once."""
        with self._lock:
            for fault in self.faults:
                if fault.matches(account, method, path):
                    fault.hits += 1
                    if fault.times is not None:
                        fault.times -= 1
                        if fault.times <= 0:
                            self.faults.remove(fault)
                    return fault
        return None


def fault_from_json(data: dict[str, Any]) -> Fault:
    def number(key: str) -> float | None:
        value = data.get(key)
        return None if value is None else float(value)

    return Fault(
        status=int(data.get("status", 0)),
        reason=data.get("reason"),
        message=data.get("message"),
        retry_after=number("retryAfter"),
        delay_seconds=float(data.get("delaySeconds", 0) or 0),
        after_delay_seconds=number("afterDelaySeconds"),
        account=data.get("account"),
        path=data.get("path"),
        method=data.get("method"),
        times=None if data.get("times") is None else int(data["times"]),
    )
