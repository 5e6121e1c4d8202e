"""Soak: issue 13's chaos test at scale. Mail into Gmail and Outlook sandbox mailboxes while
the providers fail and slow down, every worker is SIGKILLed mid-pass twice and Redis restarts
empty once; prints lost, duplicated, misfiled and announcement counts.

    uv run python -m tests.bench.soak --messages 10000 [--rate 40] [--settle 900]

Runs on a fresh SQLite database unless MAILSYNC_DATABASE_URL is set (a migrated database),
with its own redis-server. The last line is machine-readable: `chaos result: {json}`, and
the exit status is 1 when anything was lost, duplicated, misfiled or not announced once.
"""

from __future__ import annotations

import argparse
import asyncio
import os

from tests.chaos import result_line, run_chaos


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=40.0, help="messages delivered a second")
    parser.add_argument(
        "--settle", type=float, default=900.0, help="seconds to wait for the last mail"
    )
    args = parser.parse_args()
    report = asyncio.run(
        run_chaos(os.environ.get("MAILSYNC_DATABASE_URL"), args.messages, args.rate, args.settle)
    )
    for line in report.details[:50]:
        print(line)
    print(
        f"messages {report.messages}: to file {report.to_file}, filed {report.filed}; "
        f"lost {report.lost}, duplicated {report.duplicated}, misfiled {report.misfiled}; "
        f"announced once {report.announced_once}, never {report.unannounced}, "
        f"more than once {report.announced_twice}; workers killed {report.killed_workers}, "
        f"Redis restarts {report.redis_restarts}"
    )
    print(result_line(report), flush=True)
    bad = report.lost + report.duplicated + report.misfiled
    bad += report.unannounced + report.announced_twice + report.announced_unfiled
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
