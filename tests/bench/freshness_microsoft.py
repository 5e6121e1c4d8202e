"""Benchmark: the freshness bench (`tests.bench.freshness`) on Outlook: from a delivery in
the Microsoft sandbox (Graph change notification to the webhook, a delta pass) to the
`emailReceived` frame, against a bare client polling `me/messages` in the same run.

    uv run python -m tests.bench.freshness_microsoft [--count 200] [--interval 0.25]

Last line: `freshness ratio: <product p99 / baseline p99>`.
"""

from __future__ import annotations

from tests.bench.freshness import main

if __name__ == "__main__":
    main(provider="microsoft")
