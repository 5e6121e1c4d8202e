"""Benchmark: a contact's timeline page (20 emails with participants and contacts) through
the product's GraphQL API against a bare Starlette endpoint running the same SQL.

    uv run python -m tests.bench.timeline [--postgres] [--rounds 3] [--seconds 10]
        [--connections 32] [--emails 200]

Both are real uvicorn processes (one each, one worker) on the same freshly seeded database,
loaded in turn by `wrk` (apt-get install wrk) for `rounds` alternating rounds. Prints min,
median and max req/s and p99 of each, and last the product's share of the baseline's
median req/s: `timeline ratio: <number>`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx

from backend import migrations
from backend.graphql.relay import to_global_id
from backend.kit.clock import now
from backend.runtime import Runtime
from backend.sending.queue import JobQueue
from backend.settings import Settings
from tests.factories import Factory, raw_message

SECRET = "t" * 48
QUERY = """
query($id: ID!, $first: Int) {
  contact(id: $id) {
    name email
    timeline(first: $first) {
      totalCount
      pageInfo { hasNextPage endCursor }
      edges { cursor node {
        id subject snippet bodyHtml direction source sentAt deliveryStatus
        from { email name contact { name email } user { email } }
        to { email name contact { name } user { name } }
        cc { email contact { name } }
        thread { id subject emailCount lastEmailAt }
        mailbox { emailAddress }
        sentBy { name }
        contacts { id name }
        attachments { filename size }
      } }
    }
  }
}
"""


@dataclass
class Target:
    name: str
    url: str
    body: dict[str, object]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def seed(settings: Settings, count: int) -> tuple[str, uuid.UUID]:
    """A workspace, a teammate, a mailbox and `count` emails on Pat's timeline."""
    await asyncio.to_thread(migrations.upgrade, settings.database_url)
    runtime = await Runtime.create(settings, jobs=JobQueue)
    try:
        factory = Factory(runtime)
        owner = await factory.workspace()
        teammate = await factory.member(owner)
        mailbox = await factory.mailbox(owner, connected_at=now() - timedelta(days=1))
        pat = await factory.contact(owner, "pat@bigclient.test", "Pat")
        await factory.contact(owner, "quinn@bigclient.test", "Quinn")
        start = now() - timedelta(hours=20)
        for i in range(count):
            await factory.email(
                owner,
                mailbox,
                raw_message(
                    "Pat <pat@bigclient.test>",
                    [owner.email, f"other{i}@elsewhere.test"],
                    f"Message {i}",
                    body=f"Body {i} " * 40,
                    cc=[teammate.email, "quinn@bigclient.test"],
                    date=start + timedelta(minutes=i),
                    html=f"<p>Body {i}</p>" * 20,
                ),
            )
        return owner.token, pat.id
    finally:
        await runtime.close()


@contextmanager
def server(app: str, port: int, env: dict[str, str]) -> Iterator[str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--factory",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env={**os.environ, **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/", timeout=2)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{app} did not start") from None
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wrk(target: Target, token: str, seconds: int, connections: int) -> tuple[float, float]:
    """(requests per second, p99 latency in seconds) of one wrk run."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(
            'wrk.method = "POST"\n'
            f"wrk.body = {json.dumps(json.dumps(target.body))}\n"
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {token}"\n'
        )
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{connections}",
                f"-d{seconds}s",
                "--timeout",
                "30s",
                "--latency",
                "-s",
                script.name,
                target.url,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        Path(script.name).unlink()
    if "Non-2xx" in out or "Socket errors" in out:
        print(out, file=sys.stderr)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    value, unit = re.search(r"99%\s+([\d.]+)(us|ms|s)", out).groups()  # type: ignore[union-attr]
    return rate, float(value) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[unit]


def check(target: Target, token: str) -> None:
    answer = httpx.post(
        target.url, json=target.body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    answer.raise_for_status()
    data = answer.json()
    assert "errors" not in data, data
    edges = data["data"]["contact"]["timeline"]["edges"]
    assert len(edges) == 20 and edges[0]["node"]["from"]["contact"]["name"] == "Pat", data


def summary(values: list[float]) -> str:
    return (
        f"min {min(values):8.1f}  median {statistics.median(values):8.1f}  max {max(values):8.1f}"
    )


def run(database_url: str, args: argparse.Namespace) -> float:
    redis_url = args.redis_url
    settings = Settings(
        env="test",
        database_url=database_url,
        redis_url=redis_url,
        secret_key=SECRET,
        _env_file=None,
    )  # type: ignore[call-arg]
    token, contact_id = asyncio.run(seed(settings, args.emails))
    env = {
        "MAILSYNC_ENV": "test",
        "MAILSYNC_DATABASE_URL": database_url,
        "MAILSYNC_REDIS_URL": redis_url,
        "MAILSYNC_SECRET_KEY": SECRET,
        "MAILSYNC_LOG_LEVEL": "WARNING",
    }
    rates: dict[str, list[float]] = {"mailsync": [], "raw": []}
    p99s: dict[str, list[float]] = {"mailsync": [], "raw": []}
    with (
        server("backend.app:create_app", free_port(), env) as product,
        server("tests.bench.timeline_raw:create_raw_app", free_port(), env) as raw,
    ):
        targets = [
            Target(
                "mailsync",
                product + "/graphql",
                {
                    "query": QUERY,
                    "variables": {"id": to_global_id("Contact", contact_id), "first": 20},
                },
            ),
            Target(
                "raw", raw + "/timeline", {"variables": {"contact": str(contact_id), "first": 20}}
            ),
        ]
        for target in targets:
            check(target, token)
            wrk(target, token, 2, args.connections)  # warm up
        for _ in range(args.rounds):
            for target in targets:
                rate, p99 = wrk(target, token, args.seconds, args.connections)
                rates[target.name].append(rate)
                p99s[target.name].append(p99)
    for name in rates:
        print(f"{name:9} req/s: {summary(rates[name])}")
        print(f"{name:9} p99 ms: {summary([p * 1000 for p in p99s[name]])}")
    return statistics.median(rates["mailsync"]) / statistics.median(rates["raw"])


async def create_database(admin_url: str) -> tuple[str, str]:
    name = f"mailsync_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    return name, f"{base}/{name}"


async def drop_database(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--postgres", action="store_true", help="PostgreSQL instead of SQLite")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "MAILSYNC_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--emails", type=int, default=200)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is needed: apt-get install wrk")
    if args.postgres:
        name, url = asyncio.run(create_database(args.postgres_url))
        try:
            ratio = run(url, args)
        finally:
            asyncio.run(drop_database(args.postgres_url, name))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ratio = run(f"sqlite+aiosqlite:///{Path(tmp) / 'bench.db'}", args)
    print(f"timeline ratio: {ratio:.3f}")


if __name__ == "__main__":
    main()
