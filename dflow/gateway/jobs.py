"""The job store, held by the cluster, not the gateway.

A job's result is a task whose key is the job's id (``video_...``,
``img_...``), published as a Dask dataset of that name, so it outlives the
gateway that submitted it; the job's record (model, prompt, times) is the
scheduler's metadata under the same key, which the scheduler forgets with the
task. Any gateway of the cluster reads both: two gateways serve the same jobs,
and a restarted one loses none.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from distributed import Client, Future


class JobStore:
    """Records and results of jobs, on ``client``'s scheduler."""

    def __init__(self, client: Client):
        self.client = client

    async def add(self, record: dict[str, Any], result: Future) -> None:
        """Keep ``result`` (whose key is ``record["id"]``) and its record."""
        key = record["id"]
        assert result.key == key
        await self.client.publish_dataset(result, name=key)
        await self.client.set_metadata([key], record)

    async def record(self, key: str) -> dict[str, Any] | None:
        record = await self.client.get_metadata([key], default=None)
        # a record written while its job was deleted has no id: ignore it
        return record if isinstance(record, dict) and "id" in record else None

    async def records(self, prefix: str) -> list[dict[str, Any]]:
        """Records of the jobs whose ids start with ``prefix``."""
        everything = await self.client.get_metadata([], default={})
        return [
            record
            for key, record in everything.items()
            if isinstance(key, str)
            and key.startswith(prefix)
            and isinstance(record, dict)
            and "id" in record
        ]

    async def note(self, key: str, **fields: Any) -> None:
        """Add fields to a job's record."""
        for name, value in fields.items():
            await self.client.set_metadata([key, name], value)

    async def states(self, keys: Iterable[str]) -> dict[str, str | None]:
        """The scheduler's state of each job's task (``memory`` when done,
        ``erred``, ``None`` if gone; else waiting or running)."""
        keys = list(keys)
        if not keys:
            return {}
        scheduler = self.client.scheduler
        assert scheduler is not None, "the client is not connected"
        return await scheduler.get_task_status(keys=keys)

    async def result(self, key: str) -> Future | None:
        """The future of a job's result, or None if there is no such job."""
        return await self.client.get_dataset(key, default=None)

    async def drop(self, key: str, reason: str) -> bool:
        """Cancel a job's work, free its result and forget its record.
        Returns False if there was no such job."""
        future = await self.result(key)
        if future is None:
            return False
        # force: every client that holds the future lets go, the published
        # dataset and other gateways included, so the work stops and is freed
        await self.client.cancel([future], force=True, reason=reason)
        await self.client.unpublish_dataset(key)
        return True

    async def expire(self, prefixes: Iterable[str], now: float | None = None) -> int:
        """Drop the jobs past their ``expires_at``; returns how many."""
        now = time.time() if now is None else now
        expired = [
            record["id"]
            for prefix in prefixes
            for record in await self.records(prefix)
            if record.get("expires_at") is not None and record["expires_at"] <= now
        ]
        for key in expired:
            await self.drop(key, reason="expired")
        return len(expired)
