"""Issue 13's chaos test: a few hundred messages into Gmail and Outlook sandbox mailboxes
while the providers fail and slow down, workers are SIGKILLed mid-pass (twice, every worker)
and Redis restarts empty once. Nothing may be lost, stored twice or filed on the wrong
timelines (R1, R4, R5, R7), and every filed email is announced exactly once. The same run,
larger: `uv run python -m tests.bench.soak --messages 10000`."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos import Chaos

# Starts redis-server, an API and worker processes; about two minutes on a busy machine, the
# deadline generous.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

MESSAGES = 300


async def test_r7_chaos_loses_duplicates_and_misfiles_nothing_and_announces_once(
    database_url: str, tmp_path: Path
) -> None:
    report = await Chaos(database_url, tmp_path).run(MESSAGES, rate=10.0)
    print(report.summary())
    assert report.killed_workers >= 6 and report.redis_restarts == 1
    assert report.to_file > MESSAGES // 2
    assert (report.lost, report.duplicated, report.misfiled) == (0, 0, 0), report.details[:20]
    assert report.filed == report.to_file
    assert (report.unannounced, report.announced_twice, report.announced_unfiled) == (0, 0, 0), (
        report.details[:20]
    )
    assert report.announced_once == report.filed
