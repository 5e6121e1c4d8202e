"""Passes parse in processes (MAILSYNC_PARSE_PROCESSES): the same results as in-process
parsing, failures carried back, and a pool whose process died is replaced."""

from __future__ import annotations

import os
import signal

from backend.sync import parsing
from backend.sync.parsing import ParsedMessage, UnparseableMessage, parse_many, parse_message
from tests.factories import raw_message
from tests.sync_helpers import wait_until


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
    (answer,) = await parse_many([raw], 1)  # parsed in a thread meanwhile
    assert isinstance(answer, ParsedMessage) and answer.subject == "After a crash"
    (again,) = await parse_many([raw], 1)  # by a new pool
    assert isinstance(again, ParsedMessage)
    assert parsing._pool is not None and parsing._pool is not pool
