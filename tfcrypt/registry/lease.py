"""Keeping this node's own record alive in etcd under a lease.

Rules:
- One keeper per registry, one record at a time (the agent publishes `nodes/<node>`).
  `desired` is what should be in etcd; the keeper task converges etcd to it and keeps
  the lease alive every ttl/3, so two refreshes may fail before the record expires.
- The record is put again whenever the keeper is not sure etcd still holds it: after a
  new lease, after any failed attempt (someone may have deleted it while we were away:
  etcd is trusted for availability, not authenticity), and when the value changes.
  A new value goes on the same lease; a new ttl takes a new lease (the old one is
  revoked once the record sits on the new one); a new key moves the record (the old key
  is deleted after the new one is written).
- Echoes are told from overwrites by etcd revision, never by value: the keeper keeps the
  revision of its own last put (`put_revision`). The watch hands every write at our key
  to `recheck(revision)`: our own put's revision is an echo; anything else (someone
  else's write, even of bytes we once wrote ourselves, or a listing that lacks our put)
  makes the keeper read the key back, and put again unless etcd holds our last put. The
  read-back runs in the keeper's own sequence, after any put in flight has completed,
  so an echo that overtakes its put's reply costs one read, never a put.
- A lease that etcd no longer knows (expired while we could not reach etcd, or revoked)
  is replaced at once: grant, put. Consumers see the record vanish and come back.
- `unpublish` revokes the lease, which deletes the record. If etcd is unreachable the
  keeper stops refreshing and the record expires within its ttl on its own.
- Each request (`request()`) is answered by the first attempt that starts after it: the
  caller learns whether etcd has its record now; on failure the keeper keeps retrying
  with backoff anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aetcd

from tfcrypt.registry.connection import Connection
from tfcrypt.registry.endpoints import Backoff
from tfcrypt.registry.errors import LeaseLost, RegistryError, etcd_errors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Record:
    key: bytes
    value: bytes
    ttl: int


@dataclass(frozen=True)
class _Lease:
    id: int
    ttl: int


class LeaseKeeper:
    """Converges etcd to `desired` (a record or nothing) and keeps its lease alive."""

    def __init__(self, conn: Connection, backoff: Backoff) -> None:
        self._conn = conn
        self._backoff = backoff
        self._desired: Record | None = None
        self._written: Record | None = None
        self._lease: _Lease | None = None
        self._key_on_lease: bytes | None = None
        self._put_revision: int | None = None
        self._recheck = False
        self.reasserted = 0  # puts made because etcd held something else at our key
        self._wake = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def lease_id(self) -> int | None:
        return self._lease.id if self._lease else None

    @property
    def put_revision(self) -> int | None:
        """The etcd revision of our last put of the record, if we made one."""
        return self._put_revision

    def recheck(self, revision: int | None) -> bool:
        """The watch saw a write at our key at `revision` (None: a listing without our
        key). False for our own put's echo; else True, and the keeper makes sure etcd
        holds our record (module rules)."""
        if revision is not None and revision == self._put_revision:
            return False
        if self._desired is None:
            return False
        self._recheck = True
        self._wake.set()
        return True

    async def request(self, desired: Record | None) -> None:
        """Set what etcd should hold and wait for the next attempt's outcome."""
        self._desired = desired
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.set()
        await waiter

    async def run(self) -> None:
        delays = self._backoff.delays()
        while True:
            waiters, self._waiters = self._waiters, []
            desired = self._desired
            if desired is None and self._lease is None:
                _answer(waiters, None)
                await self._sleep(None)
                continue
            await self._conn.wait_credentials()
            if self._conn.closed:
                return
            client = self._conn.client()
            try:
                await self._converge(client, desired)
            except LeaseLost as exc:
                log.warning("registry lease lost (%s); granting a new one", exc)
                self._lease = None
                self._key_on_lease = None
                self._written = None
                self._waiters = waiters + self._waiters
                continue
            except RegistryError as exc:
                if desired is None:
                    self._lease = None
                self._written = None
                _answer(waiters, exc)
                await self._conn.failed(client, exc)
                await self._sleep(next(delays))
                continue
            self._conn.succeeded()
            delays = self._backoff.delays()
            _answer(waiters, None)
            await self._sleep(desired.ttl / 3 if desired else None)

    async def _sleep(self, timeout: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)
        self._wake.clear()

    async def _converge(self, client: aetcd.Client, desired: Record | None) -> None:
        if desired is None:
            await self._revoke(client)
            return
        if self._recheck:
            self._recheck = False
            written = self._written
            if written is not None and not await self._holds(client, written):
                log.warning("etcd holds someone else's write at %s; putting ours back",
                            written.key.decode(errors="replace"))
                self._written = None
                self.reasserted += 1
        retired: _Lease | None = None
        if self._lease is None or self._lease.ttl != desired.ttl:
            retired = self._lease
            with etcd_errors("lease grant"):
                granted = await client.lease(desired.ttl)
            self._lease = _Lease(granted.id, desired.ttl)
            self._key_on_lease = None
            self._written = None
        if self._written != desired:
            with etcd_errors("put"):
                put = await client.put(desired.key, desired.value, lease=self._lease.id)
            self._put_revision = int(put.header.revision)
            moved_from, self._key_on_lease = self._key_on_lease, desired.key
            if moved_from is not None and moved_from != desired.key:
                with etcd_errors("delete"):
                    await client.delete(moved_from)
            self._written = desired
        else:
            with etcd_errors("lease keepalive"):
                reply = await client.refresh_lease(self._lease.id)
            if reply is None or reply.TTL <= 0:
                raise LeaseLost(f"lease {self._lease.id:x} not found at keepalive")
        if retired is not None:
            with contextlib.suppress(RegistryError), etcd_errors("lease revoke"):
                await client.revoke_lease(retired.id)

    async def _holds(self, client: aetcd.Client, desired: Record) -> bool:
        """Whether etcd's value at our key is our last put (by revision, and value)."""
        with etcd_errors("get"):
            got = await client.get(desired.key)
        return (got is not None and int(got.mod_revision) == self._put_revision
                and bytes(got.value) == desired.value)

    async def _revoke(self, client: aetcd.Client) -> None:
        lease, self._lease = self._lease, None
        self._key_on_lease = None
        self._written = None
        if lease is None:
            return
        with contextlib.suppress(LeaseLost), etcd_errors("lease revoke"):
            await client.revoke_lease(lease.id)


def _answer(waiters: list[asyncio.Future[None]], error: RegistryError | None) -> None:
    for waiter in waiters:
        if waiter.done():
            continue
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)
