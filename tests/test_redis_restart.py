"""The worker rides out a Redis restart (issue 13, item 2). Runs its own Redis server on a
free port: the machine's shared one is never restarted."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from arq import create_pool, func
from arq.connections import RedisSettings
from redis.exceptions import RedisError

from tests.redis_server import RedisServer
from tests.sync_helpers import wait_until
from worker.resilient import ResilientWorker


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_the_worker_rides_out_a_redis_restart(own_redis: RedisServer) -> None:
    done: list[int] = []

    async def remember(ctx: dict[str, Any], value: int) -> None:
        done.append(value)

    settings = RedisSettings(host="127.0.0.1", port=own_redis.port)
    worker = ResilientWorker(
        functions=[func(remember, name="remember")],
        redis_settings=settings,
        poll_delay=0.05,
        handle_signals=False,
    )
    task = asyncio.create_task(worker.async_run())
    pool = await create_pool(settings)
    try:

        def ran(value: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                assert not task.done(), task.exception()  # the worker must not exit
                return value in done

            return check

        await pool.enqueue_job("remember", 1)
        await wait_until(ran(1), 30)

        await own_redis.stop()

        async def noticed() -> bool:
            assert not task.done(), task.exception()
            return worker.outages == 1

        await wait_until(noticed, 30)
        await own_redis.start()  # same port, empty data

        async def enqueued() -> bool:
            with contextlib.suppress(OSError, RedisError):
                return await pool.enqueue_job("remember", 2) is not None
            return False

        await wait_until(enqueued, 30)
        await wait_until(ran(2), 30)
        assert not task.done()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        await pool.aclose()


def test_compose_restarts_the_processes() -> None:
    """Whatever the worker cannot ride out (a crash, Redis down at start-up) is restarted."""
    compose = yaml.safe_load((Path(__file__).parents[1] / "docker" / "compose.yaml").read_text())
    restart = {name: service.get("restart") for name, service in compose["services"].items()}
    assert restart == dict.fromkeys(
        ["postgres", "redis", "api", "worker", "capture"], "unless-stopped"
    )
