"""The registry: tfcrypt's view of etcd, as events in and one leased record out.

Rules:
- The registry moves bytes. It never parses a value; whoever consumes `events()` verifies
  every value it is handed (signed envelopes, see docs/trust.md).
- `events()` never raises because etcd is away: it retries with backoff across the
  endpoints and starts over with a fresh `Listed` (see watch.py). It ends only when the
  registry is closed.
- `publish()`/`unpublish()` state what this node's record should be; a background keeper
  makes etcd agree and keeps the lease alive (see lease.py). They raise
  `RegistryUnavailable` when the immediate attempt fails, and the keeper keeps trying.
- `recheck_published(revision)` is told of every write the watch sees at our record's key:
  the keeper tells its own echo from someone else's write by revision and puts ours back
  over anything else (lease.py).
- With `tls=True` nothing connects before `set_credentials()` (the SVID as the client
  certificate, registry/tls.py); a call before it waits (`events()`, the keeper) or fails.
- `put()`/`delete()`/`get_all()` are for the controller CLI: no lease, one attempt per
  endpoint, then `RegistryUnavailable`.
- Every task the registry starts lives in `self._tasks` and is cancelled by `aclose()`.
  `aclose()` does not revoke the lease: an agent restarting within the ttl keeps its
  record visible; a dead agent's record expires.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeVar

import aetcd

from tfcrypt.registry.connection import Connection, RegistryStatus
from tfcrypt.registry.endpoints import Backoff, check_scheme, parse_endpoints
from tfcrypt.registry.errors import RegistryError, RegistryUnavailable, etcd_errors
from tfcrypt.registry.events import Listed, RegistryEvent
from tfcrypt.registry.keys import Keyspace, seen_prefix
from tfcrypt.registry.lease import LeaseKeeper, Record
from tfcrypt.registry.tls import TlsCredentials
from tfcrypt.registry.watch import STOP_WAIT, WatchStream, list_prefix, stop_within

T = TypeVar("T")

DEFAULT_PREFIX = "/tfcrypt/v1"
DEFAULT_BACKOFF = Backoff()


class Registry:
    """Watch, publish and edit the keys under one etcd prefix.

    Pitfalls: one `Registry` holds one gRPC connection shared by all its users; a failure
    seen by any of them moves everyone to the next endpoint (and the watch relists).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        backoff: Backoff | tuple[float, ...] = DEFAULT_BACKOFF,
        *,
        request_timeout: float = 5.0,
        probe_interval: float = 5.0,
        tls: bool = False,
        server_name: str | None = None,
    ) -> None:
        self._keys = Keyspace(prefix)
        self._seen = Keyspace(seen_prefix(prefix))
        self._backoff = backoff if isinstance(backoff, Backoff) else Backoff(*backoff)
        parsed = parse_endpoints(endpoints)
        check_scheme(parsed, tls)
        self._conn = Connection(parsed, request_timeout, tls=tls, server_name=server_name)
        self._probe_interval = probe_interval
        self._tasks: set[asyncio.Task[None]] = set()
        self._keeper = LeaseKeeper(self._conn, self._backoff)
        self._keeper_task: asyncio.Task[None] | None = None
        self._publish_lock = asyncio.Lock()

    @property
    def prefix(self) -> str:
        return self._keys.prefix

    @property
    def connected(self) -> bool:
        return self._conn.connected

    @property
    def last_revision(self) -> int:
        return self._conn.last_revision

    @property
    def relists(self) -> int:
        return self._conn.relists

    @property
    def reconnects(self) -> int:
        return self._conn.reconnects

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    @property
    def lease_id(self) -> int | None:
        """The lease our record sits on, if one is held (for status and tests)."""
        return self._keeper.lease_id

    def status(self) -> RegistryStatus:
        return self._conn.status()

    @property
    def tls(self) -> bool:
        return self._conn.tls

    def set_credentials(self, credentials: TlsCredentials) -> None:
        """The client certificate for etcd (TLS only): the first call lets the registry
        connect; a later one with a rotated SVID moves every user to a new connection,
        and the watch resumes where it was (no relist)."""
        self._conn.set_credentials(credentials)

    def events(self) -> AsyncIterator[RegistryEvent]:
        """`Listed`, then `Put`/`Deleted`; a new `Listed` after any interruption."""
        stream = WatchStream(
            self._conn, self._keys, self._backoff, self._probe_interval, self._tasks
        )
        return stream.events()

    async def publish(self, rel_key: str, value: bytes, ttl: int = 15) -> None:
        """Make `rel_key` hold `value` under a lease kept alive until `unpublish()`."""
        if ttl < 1:
            raise ValueError(f"ttl must be at least 1 second, got {ttl}")
        record = Record(self._keys.key(rel_key), bytes(value), int(ttl))
        async with self._publish_lock:
            self._ensure_keeper()
            await self._keeper.request(record)

    def recheck_published(self, revision: int | None) -> bool:
        """A write at our record's key at `revision` (None: a listing without it); True
        if it was not our own put, and the keeper will make etcd hold ours again."""
        return self._keeper.recheck(revision)

    @property
    def own_revision(self) -> int | None:
        """The etcd revision of the keeper's last put of our record: its echo is no
        overwrite."""
        return self._keeper.put_revision

    @property
    def reasserted(self) -> int:
        """How often the keeper put our record back over someone else's write."""
        return self._keeper.reasserted

    async def unpublish(self) -> None:
        """Revoke the lease: the record disappears now (or within its ttl if etcd is away)."""
        async with self._publish_lock:
            if self._keeper_task is None:
                return
            await self._keeper.request(None)

    async def put(self, rel_key: str, value: bytes) -> int:
        """Write `value` without a lease; return the revision of the write."""
        return await self._put(self._keys.key(rel_key), value)

    async def put_seen(self, rel_key: str, value: bytes) -> int:
        """Write `value` at `rel_key` of the seen-traffic keyspace (`seen_prefix`)."""
        return await self._put(self._seen.key(rel_key), value)

    async def _put(self, key: bytes, value: bytes) -> int:
        async def op(client: aetcd.Client) -> int:
            with etcd_errors("put"):
                result = await client.put(key, bytes(value))
            return int(result.header.revision)

        return await self._each_endpoint_once(op)

    async def get_all_seen(self, sub_prefix: str = "") -> Listed:
        """Every key of the seen-traffic keyspace starting with `sub_prefix`."""
        start = self._seen.sub(sub_prefix)
        return await self._each_endpoint_once(lambda c: list_prefix(c, self._seen, start))

    async def delete(self, rel_key: str) -> bool:
        """Delete `rel_key`; return whether it existed."""
        key = self._keys.key(rel_key)

        async def op(client: aetcd.Client) -> bool:
            with etcd_errors("delete"):
                result = await client.delete(key)
            return result is not None and result.deleted > 0

        return await self._each_endpoint_once(op)

    async def get_all(self, sub_prefix: str = "") -> Listed:
        """Every key starting with `sub_prefix` (relative, e.g. "nodes/"), at one revision."""
        start = self._keys.sub(sub_prefix)
        return await self._each_endpoint_once(lambda c: list_prefix(c, self._keys, start))

    async def aclose(self) -> None:
        """Stop every task, close the connection. The published record is left to its ttl."""
        for task in list(self._tasks):
            await stop_within(task, STOP_WAIT)
        self._tasks.clear()
        self._keeper_task = None
        await self._conn.aclose()

    async def __aenter__(self) -> Registry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _ensure_keeper(self) -> None:
        if self._keeper_task is None or self._keeper_task.done():
            task = asyncio.create_task(self._keeper.run(), name="registry-lease-keeper")
            self._tasks.add(task)
            self._keeper_task = task

    async def _each_endpoint_once(self, op: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        last: RegistryUnavailable | None = None
        for _ in range(self._conn.endpoint_count):
            client = self._conn.client()
            try:
                result = await op(client)
            except RegistryUnavailable as exc:
                await self._conn.failed(client, exc)
                last = exc
                continue
            except RegistryError as exc:
                self._conn.last_error = str(exc)
                raise
            self._conn.succeeded()
            return result
        assert last is not None
        raise last
