"""Reading the events stream directly, as an API process's hub does, from a given moment."""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from backend.events.bus import STREAM


class StreamReader:
    """Events of one workspace appended to the stream after `start()`."""

    def __init__(self, redis_url: str, workspace_id: object) -> None:
        self.redis = Redis.from_url(redis_url)
        self.workspace_id = str(workspace_id)
        self.last_id = "0-0"

    async def start(self) -> StreamReader:
        last = await self.redis.xrevrange(STREAM, count=1)
        self.last_id = last[0][0].decode() if last else "0-0"
        return self

    async def read(self, block_ms: int = 5000) -> list[dict[str, Any]]:
        """The workspace's next events (possibly none, after `block_ms`)."""
        batches = await self.redis.xread({STREAM: self.last_id}, block=block_ms)
        events = []
        for entry_id, fields in batches[0][1] if batches else []:
            self.last_id = entry_id.decode()
            if fields[b"workspace"].decode() == self.workspace_id:
                events.append(json.loads(fields[b"event"]))
        return events

    async def aclose(self) -> None:
        await self.redis.aclose()
