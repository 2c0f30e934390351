"""The consumer's stream: list the prefix, watch from the next revision, relist on trouble.

Rules:
- A stream opens with `Listed` (a read of the whole prefix at revision R, in pages of
  `LIST_PAGE` keys all read at R), then watches from R+1, so no change falls between the
  list and the watch. Pages, because one answer for 100,000 signed records (~110 MB) is
  over gRPC's receive limit: the agent would retry the list for ever.
- Any trouble — a compacted revision, a lost connection, a broken or silently ended
  watch stream, a member that stops answering — ends the watch. The stream then waits
  (backoff, next endpoint) and starts over with a new `Listed`: deletions that happened
  while we were away show up as keys missing from it. Nothing is raised to the consumer;
  it keeps its last view until the next `Listed`.
- A watch that delivers nothing for `probe_interval` is checked with a linearizable read
  of the prefix key; a member that is hung or cut off from the quorum fails that read.
  If the store's revision had moved past the last revision the watch delivered already
  at the previous probe, a second read lists the prefix's keys changed in between: such
  a change is at least one probe interval old and never arrived, so the watch is
  stalled (seen once in a full test run after a member of a 3-member cluster was
  killed: the watch, moved to another member, stayed open and silent while probes
  succeeded) and the stream relists. Deletions are not seen this way (only existing
  keys carry a mod revision), but a stalled watch also misses puts, such as every
  agent's node record publications.
- The backoff schedule starts over only once a watch has been created, so a member that
  lists but cannot watch is not hammered.
- The pump task that drains aetcd's watch iterator belongs to this stream and is
  cancelled when the stream ends, whichever way it ends.
- New TLS credentials (a rotated SVID, connection.py) are not trouble: the watch ends
  and a new one starts on the new client where the old one stopped, without a `Listed`.
  It starts at the last delivered revision, skipping the events of that revision already
  delivered (one revision can hold several events), so nothing is missed or repeated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import aetcd
from aetcd.utils import prefix_range_end

from tfcrypt.registry.connection import Connection
from tfcrypt.registry.endpoints import Backoff
from tfcrypt.registry.errors import RegistryError, RegistryUnavailable, etcd_errors
from tfcrypt.registry.events import Deleted, Item, Listed, Put, RegistryEvent
from tfcrypt.registry.keys import Keyspace

log = logging.getLogger(__name__)

_END = object()
_ROTATED = object()
STOP_WAIT = 1.0  # seconds a stopping task or a watch cancellation is given


async def stop_within(task: asyncio.Future[object], seconds: float, cancel: bool = True
                      ) -> bool:
    """Cancel `task` (unless `cancel` is False) and wait at most `seconds` for it to end;
    whether it ended. Never longer: `asyncio.wait_for` waits for a cancelled task to
    finish, so a library call that ignores cancellation would hang a shutdown (a full
    test run once stalled 90 s in a watch's teardown after an etcd restart). Whatever the
    task ends with is retrieved, so nothing is logged as never retrieved."""
    if cancel:
        task.cancel()
    await asyncio.wait({task}, timeout=seconds)
    if not task.done():
        task.cancel()
    task.add_done_callback(_retrieve)
    return task.done()


def _retrieve(task: asyncio.Future[object]) -> None:
    if not task.cancelled():
        task.exception()


LIST_PAGE = 1000


async def _range(client: aetcd.Client, key: bytes, range_end: bytes | None = None,
                 **fields: int | bool) -> Any:
    """A Range request with protobuf `fields` aetcd's API drops (limit, revision, keys_only,
    mod revision bounds): built with its `_build_get_range_request` and sent on its
    `kvstub` with its timeout and metadata, as its own `get_prefix` does."""
    request = (client._build_get_range_request(key=key) if range_end is None
               else client._build_get_range_request(key=key, range_end=range_end))
    for name, value in fields.items():
        setattr(request, name, value)
    return await client.kvstub.Range(request, timeout=client._timeout,
                                     metadata=client.metadata)


async def list_prefix(client: aetcd.Client, keys: Keyspace, start: bytes,
                      page: int = LIST_PAGE) -> Listed:
    """Every key under the absolute byte prefix `start`, at one revision, page by page.

    aetcd 1.0 has no range read with a limit or a revision (its request builder accepts
    both and drops them), hence `_range`. The first page fixes the revision; a revision
    compacted between pages fails the list, and the stream lists again.
    """
    end = prefix_range_end(start)
    items: dict[str, Item] = {}
    revision: int | None = None
    key = start
    with etcd_errors("list"):
        await client.connect()
        while True:
            answer = await _range(client, key, end, limit=page,
                                  **({} if revision is None else {"revision": revision}))
            if revision is None:
                revision = answer.header.revision
            for kv in answer.kvs:
                items[keys.relative(kv.key)] = Item(kv.value, kv.mod_revision)
            if not answer.more or not answer.kvs:
                break
            key = answer.kvs[-1].key + b"\0"
    assert revision is not None
    return Listed(items, revision)


class WatchStream:
    """One consumer's `Listed`/`Put`/`Deleted` stream over a shared `Connection`."""

    def __init__(
        self,
        conn: Connection,
        keys: Keyspace,
        backoff: Backoff,
        probe_interval: float,
        tasks: set[asyncio.Task[None]],
    ) -> None:
        self._conn = conn
        self._keys = keys
        self._backoff = backoff
        self._probe_interval = probe_interval
        self._tasks = tasks
        self._resume = (0, 0)  # (revision the next watch starts at, its events to skip)

    async def events(self) -> AsyncIterator[RegistryEvent]:
        delays = self._backoff.delays()
        listed_before = False
        while not self._conn.closed:
            await self._conn.wait_credentials()
            if self._conn.closed:
                break
            client = self._conn.client()
            try:
                listed = await list_prefix(client, self._keys, self._keys.root)
            except RegistryError as exc:
                await self._retry_later(client, exc, next(delays))
                continue
            self._conn.succeeded()
            if listed_before:
                self._conn.relists += 1
            listed_before = True
            self._conn.last_revision = listed.revision
            yield listed
            self._resume = (listed.revision + 1, 0)
            try:
                while True:
                    if not self._conn.is_current(client):  # new credentials meanwhile
                        client = self._conn.client()
                        log.info("registry watch resumes at revision %d on a new client",
                                 self._resume[0])
                    async for event in self._watch(client, *self._resume):
                        if event is None:
                            delays = self._backoff.delays()
                            continue
                        self._conn.last_revision = event.mod_revision
                        yield event
                    if self._conn.closed:  # _watch returns only for new credentials
                        return
            except RegistryError as exc:
                log.info("registry watch ended: %s; relisting", exc)
                await self._retry_later(client, exc, next(delays))

    async def _retry_later(self, client: aetcd.Client, exc: RegistryError, delay: float) -> None:
        await self._conn.failed(client, exc)
        if not self._conn.closed:
            await asyncio.sleep(delay)

    async def _watch(
        self, client: aetcd.Client, start_revision: int, skip: int = 0
    ) -> AsyncIterator[Put | Deleted | None]:
        """Changes from `start_revision` (the first `skip` events of that revision were
        delivered already); yields None once, when the watch is established. Returns
        (without an error) when the connection's credentials are replaced, with
        `self._resume` saying where the next watch starts."""
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop_listening = self._conn.on_rotation(lambda: queue.put_nowait(_ROTATED))
        try:
            with etcd_errors("watch"):
                watch = await client.watch_prefix(self._keys.root,
                                                  start_revision=start_revision)
        except BaseException:
            stop_listening()
            raise
        self._conn.succeeded()
        yield None
        pump = asyncio.create_task(_pump(watch, queue), name="registry-watch-pump")
        self._tasks.add(pump)
        delivered = start_revision - 1
        at_delivered = 0  # events of revision `delivered` the consumer has (all watches)
        if skip:
            delivered, at_delivered = start_revision, skip
        replayed = 0  # events of `start_revision` this watch dropped as already delivered
        probed: int | None = None  # the store's revision at the last silent probe
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), self._probe_interval)
                except TimeoutError:
                    probed = await self._probe(client, delivered, probed)
                    continue
                if item is _ROTATED:
                    self._resume = ((delivered, at_delivered) if at_delivered
                                    else (delivered + 1, 0))
                    return
                if item is _END:
                    raise RegistryUnavailable("watch: stream ended")
                if isinstance(item, RegistryError):
                    raise item
                assert isinstance(item, aetcd.Event)
                revision = item.kv.mod_revision
                if revision == start_revision and replayed < skip:
                    replayed += 1
                    continue  # delivered by the previous watch
                if revision == delivered:
                    at_delivered += 1
                elif revision > delivered:
                    delivered, at_delivered = revision, 1
                probed = None
                yield self._convert(item)
        finally:
            stop_listening()
            if await stop_within(pump, STOP_WAIT):
                self._tasks.discard(pump)  # else Registry.aclose tries again
            await stop_within(asyncio.ensure_future(watch.cancel()), STOP_WAIT,
                              cancel=False)

    async def _probe(self, client: aetcd.Client, delivered: int, probed: int | None) -> int:
        """Check the member and the watch (see the module rules); the store's revision.

        The first read is cheap (the prefix key alone). Only when the store moved past
        the last delivered revision before the previous probe does a second read look for
        keys of the prefix changed in between (keys only; etcd filters by mod revision on
        the server, but scans the prefix to do it, so it is not done on every probe).
        """
        with etcd_errors("probe"):
            await client.connect()
            answer = await _range(client, self._keys.root)
            if probed is not None and probed > delivered:
                missed = await _range(client, self._keys.root,
                                      prefix_range_end(self._keys.root), keys_only=True,
                                      min_mod_revision=delivered + 1,
                                      max_mod_revision=probed)
                if missed.kvs:
                    raise RegistryUnavailable(
                        f"watch: stalled, {len(missed.kvs)} key(s) changed between revisions "
                        f"{delivered + 1} and {probed} never arrived")
        self._conn.succeeded()
        return int(answer.header.revision)

    def _convert(self, event: aetcd.Event) -> Put | Deleted:
        rel_key = self._keys.relative(event.kv.key)
        if event.kind == aetcd.EventKind.DELETE:
            return Deleted(rel_key, event.kv.mod_revision)
        return Put(rel_key, event.kv.value, event.kv.mod_revision)


async def _pump(watch: aetcd.Watch, queue: asyncio.Queue[object]) -> None:
    """Move aetcd's watch events into `queue`; always end it with an error or `_END`.

    Whatever stops the pump (a stream error, a clean end, a bug in aetcd, cancellation by
    `Registry.aclose()`), the reader wakes up and relists or finishes.
    """
    end: object = _END
    try:
        with etcd_errors("watch"):
            async for event in watch:
                queue.put_nowait(event)
    except RegistryError as exc:
        end = exc
    except Exception as exc:
        log.exception("registry watch pump failed")
        end = RegistryUnavailable(f"watch: {exc!r}")
    finally:
        queue.put_nowait(end)
