"""A value that changes over time, which any number of streams can follow.

Rules:
- every `publish` bumps the version by one; a follower passes the last version it sent
  and gets the newest value, so a slow stream skips stale values instead of queueing them
  (a Workload API client only ever needs the current SVID);
- `close` wakes every follower with None, which is how streams end on server shutdown;
- single event loop only (asyncio.Condition), like the rest of the server.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Versioned(Generic[T]):
    """Newest value plus a version counter; followers wait with `next_after`."""

    def __init__(self, value: T) -> None:
        self._value = value
        self._version = 1
        self._closed = False
        self._changed = asyncio.Condition()

    @property
    def value(self) -> T:
        return self._value

    @property
    def version(self) -> int:
        return self._version

    async def publish(self, value: T) -> None:
        async with self._changed:
            self._value = value
            self._version += 1
            self._changed.notify_all()

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def next_after(self, version: int) -> tuple[int, T] | None:
        """The newest (version, value) once it is newer than `version`; None once closed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._version > version)
            if self._closed:
                return None
            return self._version, self._value
