"""The agent loop: sources mark the view dirty, one debounced reconcile applies it.

Rules:
- Tasks live in one TaskGroup: the SVID follower, the etcd follower, the publisher, the
  key-file watcher, the status API, the kernel monitors (nft and ip monitor: drift is
  repaired on events, not only by the periodic resync), the device supervisor (a backend
  that has one, `Supervised`) and the reconciler. Nothing is fire-and-forget.
- Sources only record and mark dirty; one reconcile (tfcrypt/agent/reconcile.py) runs
  after a burst, debounced, when a lingering workload's grace ends, and after
  `resync_interval` of quiet as a full resync.
- No peer, route or rule is removed until the inputs are in sync (an SVID is loaded and
  etcd has been listed once): a restarted agent adopts what the previous one left and
  leaves traffic alone until it knows better.
- The apply order across reconcilers, and why it is safe, lives in tfcrypt/agent/
  dataplane.py. Applies are incremental (O(change)); a full apply, which reads the kernel
  and repairs drift, runs on the periodic resync, a relist, a device restart and kernel
  events that are not our own.
- Rollback floors survive restarts: the epochs accepted per key are restored from the
  state dir (tfcrypt/agent/epochstore.py) before etcd is read, and saved before each
  reconcile that follows a rise, so the dataplane never uses a record whose floor a
  crash could forget. A bad file is counted and reported, and the agent starts empty.
- Our own record: the first publish waits for the first listing, and is signed above
  any epoch etcd held for our key that we accepted (tfcrypt/agent/nodekey.py
  `publish_above`). Any write at our key that is not our own put (told apart by etcd
  revision, tfcrypt/registry/lease.py) is answered by putting ours back, throttled when
  someone keeps overwriting it (a second agent for this node fights us).
- On exit (SIGTERM, SIGINT) the dataplane and the etcd record stay as they are: a
  restart must not disturb traffic; the record's lease lapses if no agent returns.
- Flow records (`flows`, on by default): one more task reads the kernel's flow sets,
  saves the records and publishes this node's signed report (tfcrypt/agent/flows.py).
- Elsewhere: the snapshot the core is fed (tfcrypt/agent/snapshot.py), lingering
  (tfcrypt/agent/lingering.py), the status document (tfcrypt/agent/status_report.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from tfcrypt import metrics
from tfcrypt.agent.dataplane import Dataplane
from tfcrypt.agent.epochstore import PersistedFloors
from tfcrypt.agent.flows import Addresses, FlowCollector
from tfcrypt.agent.infrastructure import static_infrastructure
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.agent.monitor import KernelScope, watch
from tfcrypt.agent.nodekey import NodeKey, key_file_stamp, load_node_key, publish_above
from tfcrypt.agent.reconcile import Reconciler
from tfcrypt.agent.snapshot import CoreInput
from tfcrypt.agent.status_api import StatusServer
from tfcrypt.agent.status_report import StatusReport
from tfcrypt.config import AgentConfig
from tfcrypt.core.flow_table import FlowTable
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.svid_source import SvidSource, SvidUpdate, etcd_credentials
from tfcrypt.identity.view import Prepared, VerifiedView
from tfcrypt.model.families import families
from tfcrypt.model.flow import FlowReport
from tfcrypt.model.node import NodeRecord
from tfcrypt.registry import Registry
from tfcrypt.registry.errors import RegistryError
from tfcrypt.registry.events import Deleted, Item, Listed, Put
from tfcrypt.text import excerpt
from tfcrypt.wireguard.backend import DeviceOrigin

DEBOUNCE = 0.05
FIGHT_WINDOW = 30.0  # seconds: more than FIGHT_FREE overwrites within it is a fight
FIGHT_FREE = 3
FIGHT_MAX_DELAY = 30.0


@runtime_checkable
class Supervised(Protocol):
    """A WireGuard backend that restarts a vanished device (tfcrypt/wireguard/userspace.py):
    `supervise()` runs as one of the agent's tasks, `restarted` is set after a restart."""

    restarted: asyncio.Event
    restarts: int

    def supervise(self) -> Awaitable[None]: ...


def _never_ours(why: str) -> bool:
    """Monitor reasons that no incremental apply of ours produces."""
    return why.startswith("nft delete table") or (
        why.startswith(("ip rule deleted", "route deleted", "link ")) and "deleted" in why)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Agent:
    """The node's agent: `registry` and `svids` are its sources, `dataplane` its sink."""

    def __init__(self, cfg: AgentConfig, *, registry: Registry, svids: SvidSource,
                 dataplane: Dataplane) -> None:
        self.cfg = cfg
        self.registry = registry
        self.svids = svids
        self.dataplane = dataplane
        self.wg = dataplane.wireguard
        self.view = VerifiedView(families(),
                                 on_reject=lambda r: metrics.RECORDS_REJECTED.labels(r).inc(),
                                 on_unremembered=metrics.REJECTIONS_UNREMEMBERED.inc)
        self.svid: SvidUpdate | None = None
        self.listed = False
        self.node_key: NodeKey | None = None
        self.inputs = CoreInput(cfg.node_name, cfg.workload_grace)
        self.reconciler = Reconciler(cfg, dataplane, self.inputs)
        self.report = StatusReport(self)
        # full applies read the kernel and repair drift; others apply only what changed
        self._full_needed = True
        self._dirty = asyncio.Event()
        self._publish_needed = asyncio.Event()
        # set once the device holds peers for our view: only then may others handshake
        self._device_ready = asyncio.Event()
        self._state_dir = Path(cfg.state_dir)
        self._own_key = f"nodes/{cfg.node_name}"
        self._listed_once = asyncio.Event()  # the first publish waits for etcd's view
        self._recheck_own = False  # etcd may hold someone else's write at our key
        self._overwrites: deque[float] = deque(maxlen=16)
        self._published_basis: tuple[int, str, int] | None = None  # SVID serial, key, epoch
        self.floors = PersistedFloors(self.view.epochs, self._state_dir)
        self._causes: list[str] = []
        self.flows: FlowCollector | None = None
        if cfg.flows:
            self.flows = FlowCollector(
                dataplane.nft, Addresses(self.inputs.inventory.values, cfg.node_name,
                                         lambda: self.reconciler.last_reconcile.get("at")),
                wg_ifname=cfg.interface, state_dir=self._state_dir,
                interval=cfg.flows_interval, publish_interval=cfg.flows_publish_interval,
                table=FlowTable(cfg.flows_max_records, cfg.flows_retention))
        self.status_server = StatusServer(cfg.status_socket, self.report.collect,
                                          flows=self._flows_doc if self.flows else None)

    # -- tasks -----------------------------------------------------------------------

    async def run(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.floors.restore()
        # etcd endpoints given by name are resolved once, here (tfcrypt/agent/infrastructure.py)
        self.inputs.static_infrastructure = await asyncio.to_thread(
            static_infrastructure, self.cfg)
        await self.status_server.start()
        fallback = None
        try:
            if await self.wg.backend.ensure_device() is DeviceOrigin.ADOPTED:
                self._device_ready.set()  # a previous run's device, peers configured
            fallback = await self.wg.backend.read_private_key()
        except Exception as exc:
            log.warning("wireguard device not available yet: %s", exc)
        self.node_key = load_node_key(self._state_dir, time.time(), fallback=fallback)
        if self.node_key.key.problem:
            metrics.STATE_PROBLEMS.labels("key_file").inc()
            log.warning("wireguard key file: %s", self.node_key.key.problem)
        log.info("node %s: wireguard public key %s, epoch %d", self.cfg.node_name,
                 self.node_key.public_key, self.node_key.epoch)
        backend = self.wg.backend
        if self.flows is not None:
            await asyncio.to_thread(self.flows.restore)
        async with asyncio.TaskGroup() as tg:
            if self.flows is not None:
                tg.create_task(self.flows.run(self._publish_flows))
            tg.create_task(self._follow_svids())
            tg.create_task(self._follow_registry())
            tg.create_task(self._publisher())
            tg.create_task(self._watch_key_file())
            tg.create_task(self._reconcile_when_dirty())
            tg.create_task(self.status_server.serve())
            tg.create_task(watch(KernelScope.of(self.cfg.interface, self.cfg.route_table,
                                                self.cfg.rule_priority), self._kernel_drift))
            if isinstance(backend, Supervised):
                tg.create_task(backend.supervise())
                tg.create_task(self._follow_device_restarts())

    async def _flows_doc(self) -> dict[str, Any]:
        """`GET /flows` (served only when flows are on: 404 otherwise)."""
        assert self.flows is not None
        return self.flows.records_doc(self.view.of("policies/").values())

    async def _publish_flows(self) -> None:
        """Put this node's signed flow report (tfcrypt/agent/flows.py); retried at the
        next interval when there is no SVID yet or etcd refuses."""
        if self.flows is None or self.svid is None:
            return
        report: FlowReport = self.flows.report(self.cfg.node_name,
                                               await self.report.handshakes())
        value = sign_envelope(report.to_payload(), self.svid.private_key, self.svid.chain)
        try:
            await self.registry.put_seen(report.key, value)
        except Exception as exc:  # etcd away: the next interval retries
            log.warning("flow report: cannot put %s: %s", report.key, exc)

    def _own_write(self, revision: int | None, listed: bool = False) -> None:
        """The watch saw a write at our key at `revision` (None: a deletion, or a listing
        without our key). Our own put's echo is nothing; so is an event older than our
        last put (the echo of an earlier put, arriving late: etcd has had ours since).
        Anything else makes the keeper read the key back and put ours again if etcd holds
        something else (a listing is checked whatever its revision: etcd may have been
        restored)."""
        own = self.registry.own_revision
        if revision is not None and own is not None and (
                revision == own or (revision < own and not listed)):
            return
        self._recheck_own = True
        self._publish_needed.set()

    async def _follow_svids(self) -> None:
        async for update in self.svids.updates():
            expected = self.cfg.node_spiffe_id(update.trust_domain)
            if update.spiffe_id != expected:
                metrics.WORKLOAD_API_ERRORS.labels("unexpected_spiffe_id").inc()
                self.svids.refuse(update, expected)  # logged, and shown by status
                continue
            if self.registry.tls:
                # before self.svid: the record signed with it is published over this
                try:
                    self.registry.set_credentials(etcd_credentials(update))
                except ValueError as exc:
                    metrics.WORKLOAD_API_ERRORS.labels("invalid_svid").inc()
                    self.svids.refuse_for_etcd(update, str(exc))
                    continue
            authorizer = Authorizer(
                trust_domain=update.trust_domain,
                node_id_template=self.cfg.node_id_template,
                controller_ids=self.cfg.controller_ids)
            bundles, now = TrustBundles(update.bundles), _utcnow()
            prepared = None
            if self.view.trust_changes(bundles, authorizer):
                prepared = await self._check_off_loop(dict(self.view.raw), now, bundles,
                                                      authorizer)
            if self.view.set_trust(bundles, authorizer, now, prepared):
                self.inputs.all_changed()  # everything was verified again
            # Only now: `svid` makes the agent in sync, and a reconcile that ran while the
            # records were still being verified under the new bundle (seconds at scale, or
            # on a slow machine) would apply a view that believes nothing: at a restart
            # after etcd's listing, that deleted the class chains of the adopted table
            # (their traffic unmarked for a moment) and re-created them (issue #16's note).
            self.svid = update
            log.info("SVID %s serial %x valid until %s", update.spiffe_id, update.serial,
                     update.not_after.isoformat())
            metrics.DATAPLANE.set_svid_expiry(update.not_after.timestamp())
            self._causes.append(f"SVID serial {update.serial:x}")
            self._publish_needed.set()
            self._dirty.set()

    async def _follow_registry(self) -> None:
        async for event in self.registry.events():
            now = _utcnow()
            match event:
                case Listed(items=items):
                    raw = {k: i.value for k, i in items.items()}
                    prepared = await self._check_off_loop(self.view.pending(raw), now)
                    self.view.replace_all(raw, now, prepared,
                                          {k: i.mod_revision for k, i in items.items()})
                    self.inputs.all_changed()  # anything may have changed
                    self._full_needed = True
                    self.listed = True
                    self._causes.append("etcd listed")
                    self._own_write(_revision_of(items, self._own_key), listed=True)
                    self._listed_once.set()
                    self._publish_needed.set()
                case Put(rel_key=key, value=value, mod_revision=revision):
                    changed = self.view.put(key, value, now, revision)
                    if key == self._own_key:
                        self._own_write(revision)
                    elif not changed and key not in self.view.rejected:
                        # a record re-signed with nothing changed (every node's, at each
                        # SVID rotation: N x N events a rotation round, bench.fleet F3):
                        # no reconcile, whose core pass costs ~15 ms at 5,000 nodes
                        continue
                    self.inputs.note_changed(key)
                    self._causes.append(f"put {excerpt(key)}")
                case Deleted(rel_key=key):
                    self.view.delete(key)
                    self.inputs.note_changed(key)
                    self._causes.append(f"deleted {excerpt(key)}")
                    if key == self._own_key:
                        self._own_write(None)
            self._dirty.set()

    async def _check_off_loop(self, items: dict[str, bytes], now: dt.datetime,
                              bundles: TrustBundles | None = None,
                              authorizer: Authorizer | None = None) -> Prepared | None:
        """Verify a batch in a worker thread: 100,000 records take tens of seconds, during
        which the loop must keep the lease alive and answer status. The view applies the
        results in one step afterwards (tfcrypt.identity.view). Every size goes this way:
        the thread hop costs well under a millisecond, and one path for every size is the
        path every lab test exercises."""
        if not items:
            return None
        started = time.monotonic()
        prepared = await asyncio.to_thread(self.view.check, items, now, bundles, authorizer)
        if len(items) >= 1000:
            log.info("verified %d records in %.1fs", len(items), time.monotonic() - started)
        return prepared

    async def _publisher(self) -> None:
        """Publish our signed record whenever the SVID or the key changes, or etcd holds
        an epoch of ours above it; make the keeper check etcd holds it after any write at
        our key that was not our own put (the keeper puts the same record back, no new
        signature: re-signing on every such event made each late echo a new put, whose
        echo came late again, a republish storm seen in bench C4).

        Not before the device holds its peers (the first apply, or an adopted device): a
        peer that learns of us sends a handshake at once, and one that reaches a device not
        knowing that peer yet is dropped and retried only after WireGuard's 5 s.
        """
        await self._device_ready.wait()
        await self._listed_once.wait()  # what etcd holds for our key decides our epoch
        while True:
            await self._publish_needed.wait()
            self._publish_needed.clear()
            if self.svid is None or self.node_key is None:
                continue
            if self._recheck_own:
                self._recheck_own = False
                await self._throttle_fight()
                self.registry.recheck_published(None)
            self._publish_above_etcd()
            basis = (self.svid.serial, self.node_key.public_key, self.node_key.epoch)
            if basis == self._published_basis:
                continue  # the keeper holds this record and puts it back if etcd lost it
            self._published_basis = basis
            record = NodeRecord(
                node=self.cfg.node_name, spiffe_id=self.svid.spiffe_id,
                wg_public_key=self.node_key.public_key, endpoint=self.cfg.endpoint,
                workload_subnets=(), epoch=self.node_key.epoch, issued_at=int(time.time()))
            value = sign_envelope(record.to_payload(), self.svid.private_key,
                                  self.svid.chain)
            try:
                await self.registry.publish(record.key, value, ttl=self.cfg.lease_ttl)
                log.info("published %s (epoch %d, SVID serial %x)", record.key, record.epoch,
                         self.svid.serial)
            except RegistryError as exc:
                log.warning("publishing %s failed, the keeper retries: %s", record.key, exc)

    def _publish_above_etcd(self) -> None:
        """Sign above a record of ours that etcd held at a higher epoch (or at ours, with
        another key): readers that accepted it would refuse ours as a rollback."""
        assert self.node_key is not None
        floor = self.view.epoch(self._own_key)
        if floor is None or floor < self.node_key.epoch:
            return
        believed = self.view.records.get(self._own_key)
        if floor == self.node_key.epoch and (
                believed is None or believed.wg_public_key == self.node_key.public_key):
            return
        self.node_key = publish_above(self._state_dir, self.node_key, floor)
        log.warning("etcd held %s at epoch %d, signed by this node's identity but not by "
                    "this agent (another agent instance for %s, or a restored backup of "
                    "the state dir?): publishing at epoch %d", self._own_key, floor,
                    self.cfg.node_name, self.node_key.epoch)
        metrics.STATE_PROBLEMS.labels("epoch_below_etcd").inc()

    async def _throttle_fight(self) -> None:
        """Put our record back at once the first times; if someone keeps overwriting it
        (a second agent for this node), back off so two writers do not spin etcd."""
        now = time.monotonic()
        self._overwrites.append(now)
        recent = sum(1 for t in self._overwrites if now - t < FIGHT_WINDOW)
        if recent <= FIGHT_FREE:
            return
        delay = min(FIGHT_MAX_DELAY, 2.0 ** (recent - FIGHT_FREE - 1))
        log.error("%s was overwritten %d times in %.0fs: is a second agent running for "
                  "node %s? Putting ours back in %.0fs", self._own_key, recent,
                  FIGHT_WINDOW, self.cfg.node_name, delay)
        await asyncio.sleep(delay)

    async def _watch_key_file(self) -> None:
        """`tfcrypt keys rotate` rewrites the key file; pick the new key up."""
        stamp = key_file_stamp(self._state_dir)
        while True:
            await asyncio.sleep(1.0)
            now_stamp = key_file_stamp(self._state_dir)
            if now_stamp == stamp or now_stamp is None:
                continue
            stamp = now_stamp
            self.node_key = load_node_key(self._state_dir, time.time())
            log.info("wireguard key rotated: public key %s, epoch %d",
                     self.node_key.public_key, self.node_key.epoch)
            self._causes.append("key rotated")
            await self.reconcile()  # the device gets the new key before peers hear of it
            self._publish_needed.set()

    async def _follow_device_restarts(self) -> None:
        """A vanished device took its peers and routes with it: re-apply at once."""
        assert isinstance(self.wg.backend, Supervised)
        restarted = self.wg.backend.restarted
        while True:
            await restarted.wait()
            restarted.clear()
            log.warning("wireguard device %s was restarted; re-applying", self.cfg.interface)
            metrics.WIREGUARD_RESTARTS.inc()
            self._causes.append("device restarted")
            self._full_needed = True
            self._dirty.set()

    def _kernel_drift(self, why: str) -> None:
        """A monitor saw our kernel objects change (by hand, or by our own apply).

        Events that arrive while we apply, or just after an apply that changed something,
        are most likely our own: they get an incremental reconcile (which finds nothing to
        do). Any other event gets a full one, which reads the kernel and repairs it, and so
        does an event our applies never cause (the table deleted, one of our rules or
        routes deleted, the WireGuard link deleted), even inside that window. Other hand
        changes that land inside the window are repaired by the periodic resync.
        """
        if why not in self._causes:
            self._causes.append(why)
        if not self.reconciler.changes_are_ours() or _never_ours(why):
            self._full_needed = True
        self._dirty.set()

    async def _reconcile_when_dirty(self) -> None:
        """Reconcile after events (debounced), when a lingering workload's grace period
        ends (its address is released on time, not at the next resync), and after
        `resync_interval` of quiet as a full resync."""
        while True:
            wait = self.cfg.resync_interval
            expiry_first = False
            next_expiry = self.inputs.lingering.next_expiry
            if next_expiry is not None:
                to_expiry = max(0.0, next_expiry - time.monotonic())
                if to_expiry < wait:
                    wait, expiry_first = to_expiry, True
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=wait)
            except TimeoutError:
                if not expiry_first:
                    self._full_needed = True  # the periodic full resync repairs any drift
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            await self.reconcile()

    # -- reconcile -----------------------------------------------------------------

    @property
    def epochs_problem(self) -> str | None:
        return self.floors.problem

    @property
    def in_sync(self) -> bool:
        return self.svid is not None and self.listed and self.node_key is not None

    async def reconcile(self) -> None:
        """Apply the view once, if in sync; write status.json either way."""
        causes, self._causes = self._causes, []
        await self.floors.save()
        if not self.in_sync:
            self._causes = causes[-50:]
        else:
            assert self.node_key is not None
            full, self._full_needed = self._full_needed, False
            result = await self.reconciler.run(self.view, self.node_key, full, causes)
            if "wireguard" not in result.failed:
                self._device_ready.set()
        await self.report.write(self._state_dir)


def _revision_of(items: Mapping[str, Item], key: str) -> int | None:
    item = items.get(key)
    return None if item is None else item.mod_revision
