"""The agent loop: sources mark the view dirty, one debounced reconcile applies it.

Rules:
- Tasks live in one TaskGroup: the SVID follower, the etcd follower, the publisher, the
  key-file watcher, the status API, the kernel monitors (nft and ip monitor: drift is
  repaired on events, not only by the periodic resync), the device supervisor and the
  reconciler. Nothing is fire-and-forget.
- No peer, route or rule is removed until the inputs are in sync (an SVID is loaded and
  etcd has been listed once): a restarted agent adopts what the previous one left and
  leaves traffic alone until it knows better.
- The apply order across reconcilers, and why it is safe, lives in tfcrypt/agent/
  dataplane.py. Applies are incremental (O(change)); a full apply, which reads the kernel
  and repairs drift, runs on the periodic resync, a relist, a device restart and kernel
  events that are not our own.
- On exit (SIGTERM, SIGINT) the dataplane and the etcd record stay as they are: a
  restart must not disturb traffic; the record's lease lapses if no agent returns.
- A deleted workload lingers (tfcrypt/core/linger.py): its addresses stay selected for
  `workload_grace` seconds unless a live workload claims them, so a terminating pod that
  still sends is not sent in plaintext; the reconciler wakes when the next one ends.
- Status is computed when asked (status API) and after every reconcile (status.json,
  metrics samples): it reads the device and the nft counters, never changes them.
  A reconcile that changed the kernel logs one line: what changed and why.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tfcrypt import metrics, status_view
from tfcrypt.agent.dataplane import Dataplane
from tfcrypt.agent.logs import change_summary
from tfcrypt.agent.monitor import KernelScope, watch
from tfcrypt.agent.nodekey import NodeKey, key_file_stamp, load_node_key
from tfcrypt.agent.status_api import StatusServer
from tfcrypt.config import AgentConfig
from tfcrypt.core.compute import Desired, Snapshot
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.inventory import Inventory
from tfcrypt.core.linger import EndReason, Lingering, LingerResult, linger
from tfcrypt.dataplane.netlink import NetlinkError
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.svid_source import SvidSource, SvidUpdate
from tfcrypt.identity.view import Prepared, VerifiedView
from tfcrypt.model.families import WORKLOADS, families
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.workload import Workload
from tfcrypt.registry import Registry
from tfcrypt.registry.errors import RegistryError
from tfcrypt.registry.events import Deleted, Listed, Put
from tfcrypt.registry.text import excerpt
from tfcrypt.wireguard.backend import DeviceOrigin
from tfcrypt.wireguard.errors import WireGuardError
from tfcrypt.wireguard.model import DeviceState, mtu_for_underlay

log = logging.getLogger(__name__)

DEBOUNCE = 0.05
OWN_EVENTS_WINDOW = 1.0  # seconds after an apply that changed something: events are ours
DEFAULT_MTU = 1420  # 1500-byte underlay minus the 80 bytes of WireGuard over IPv6: the
# fallback when the interface holding the advertise address cannot be read
MIN_MTU = 1280  # IPv6's minimum link MTU: below it the tunnel could not carry IPv6
MAX_LINGER_LOGGED = 20  # per reconcile; a relist may end or start thousands at once
MAX_LINGER_SHOWN = 20  # status lists the entries only when there are this few
DROP_NAMES = {"guard_drops": "guard", "ingress_drops": "strict_ingress",
              "ingress_audit": "strict_ingress_audit"}


def _never_ours(why: str) -> bool:
    """Monitor reasons that no incremental apply of ours produces."""
    return why.startswith("nft delete table") or (
        why.startswith(("ip rule deleted", "route deleted", "link ")) and "deleted" in why)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Agent:
    def __init__(self, cfg: AgentConfig, *, registry: Registry, svids: SvidSource,
                 dataplane: Dataplane, supervise: Any = None) -> None:
        self.cfg = cfg
        self.registry = registry
        self.svids = svids
        self.dataplane = dataplane
        self.wg = dataplane.wireguard
        self._supervise = supervise
        self.view = VerifiedView(families(),
                                 on_reject=lambda r: metrics.RECORDS_REJECTED.labels(r).inc(),
                                 on_unremembered=metrics.REJECTIONS_UNREMEMBERED.inc)
        self.svid: SvidUpdate | None = None
        self.listed = False
        self.node_key: NodeKey | None = None
        self.desired: Desired | None = None
        self.core = IncrementalCore(cfg.node_name)
        # full applies read the kernel and repair drift; others apply only what changed
        self._full_needed = True
        self._applying = False
        self._own_changes_until = 0.0
        # workload keys changed since the last reconcile; None = unknown, diff everything
        self._changed_workloads: set[str] | None = None
        # the workloads the core was last given (live plus lingering), indexed as they
        # change (tfcrypt/core/inventory.py: the core's full computations query it instead
        # of indexing 100,000 workloads); the lingering entries, and when the next one
        # ends (monotonic seconds)
        self._inventory = Inventory()
        self._lingering: Mapping[str, Lingering] = {}
        self._next_expiry: float | None = None
        self.last_reconcile: dict[str, Any] = {}
        self.mtu: int | None = None  # the WireGuard MTU in use, and where it came from
        self.mtu_source = ""
        # the last full apply that found the kernel differing from what we had applied
        self.last_repair: dict[str, Any] | None = None
        self._dirty = asyncio.Event()
        self._publish_needed = asyncio.Event()
        # set once the device holds peers for our view: only then may others handshake
        self._device_ready = asyncio.Event()
        self._state_dir = Path(cfg.state_dir)
        self._own_key = f"nodes/{cfg.node_name}"
        # our last signed values: the watch echoes each of them back, maybe after a newer
        # one was published (signatures differ every time), and that is no overwrite
        self._published: deque[bytes] = deque(maxlen=16)
        self._causes: list[str] = []
        self._etcd_down_since: dt.datetime | None = _utcnow()
        self.status_server = StatusServer(cfg.status_socket, self.collect_status)

    # -- tasks -----------------------------------------------------------------------

    async def run(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._follow_svids())
            tg.create_task(self._follow_registry())
            tg.create_task(self._publisher())
            tg.create_task(self._watch_key_file())
            tg.create_task(self._reconciler())
            tg.create_task(self.status_server.serve())
            tg.create_task(watch(KernelScope.of(self.cfg.interface, self.cfg.route_table,
                                                self.cfg.rule_priority), self._kernel_drift))
            if self._supervise is not None:
                tg.create_task(self._supervise())
                tg.create_task(self._follow_device_restarts())

    async def _follow_svids(self) -> None:
        async for update in self.svids.updates():
            expected = self.cfg.node_spiffe_id(update.trust_domain)
            if update.spiffe_id != expected:
                metrics.WORKLOAD_API_ERRORS.labels("unexpected_spiffe_id").inc()
                log.error("Workload API served %s, but this node is %s: ignored",
                          update.spiffe_id, expected)
                continue
            self.svid = update
            metrics.DATAPLANE.set_svid_expiry(update.not_after.timestamp())
            self._causes.append(f"SVID serial {update.serial:x}")
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
                self._changed_workloads = None  # everything was verified again
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
                    self._changed_workloads = None  # anything may have changed
                    self._full_needed = True
                    self.listed = True
                    self._causes.append("etcd listed")
                    self._publish_needed.set()  # our record may have vanished meanwhile
                case Put(rel_key=key, value=value, mod_revision=revision):
                    self.view.put(key, value, now, revision)
                    self._note_changed(key)
                    self._causes.append(f"put {excerpt(key)}")
                    if key == self._own_key and value not in self._published:
                        log.warning("%s was overwritten by someone else; republishing", key)
                        self._publish_needed.set()
                case Deleted(rel_key=key):
                    self.view.delete(key)
                    self._note_changed(key)
                    self._causes.append(f"deleted {excerpt(key)}")
                    if key == self._own_key:
                        self._publish_needed.set()
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

    def _note_changed(self, key: str) -> None:
        """Tell the incremental core which workload keys an event touched."""
        if key.startswith(WORKLOADS) and self._changed_workloads is not None:
            self._changed_workloads.add(key)

    async def _publisher(self) -> None:
        """Publish our signed record whenever the SVID, the key or etcd's view changes.

        Not before the device holds its peers (the first apply, or an adopted device): a
        peer that learns of us sends a handshake at once, and one that reaches a device not
        knowing that peer yet is dropped and retried only after WireGuard's 5 s.
        """
        await self._device_ready.wait()
        while True:
            await self._publish_needed.wait()
            self._publish_needed.clear()
            if self.svid is None or self.node_key is None:
                continue
            record = NodeRecord(
                node=self.cfg.node_name, spiffe_id=self.svid.spiffe_id,
                wg_public_key=self.node_key.public_key, endpoint=self.cfg.endpoint,
                workload_subnets=(), epoch=self.node_key.epoch, issued_at=int(time.time()))
            value = sign_envelope(record.to_payload(), self.svid.private_key,
                                  self.svid.chain)
            self._published.append(value)
            try:
                await self.registry.publish(record.key, value, ttl=self.cfg.lease_ttl)
                log.info("published %s (epoch %d, SVID serial %x)", record.key, record.epoch,
                         self.svid.serial)
            except RegistryError as exc:
                log.warning("publishing %s failed, the keeper retries: %s", record.key, exc)

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
        restarted: asyncio.Event = self.wg.backend.restarted  # type: ignore[attr-defined]
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
        ours = self._applying or time.monotonic() < self._own_changes_until
        if not ours or _never_ours(why):
            self._full_needed = True
        self._dirty.set()

    async def _reconciler(self) -> None:
        """Reconcile after events (debounced), when a lingering workload's grace period
        ends (its address is released on time, not at the next resync), and after
        `resync_interval` of quiet as a full resync."""
        while True:
            wait = self.cfg.resync_interval
            expiry_first = False
            if self._next_expiry is not None:
                to_expiry = max(0.0, self._next_expiry - time.monotonic())
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
    def in_sync(self) -> bool:
        return self.svid is not None and self.listed and self.node_key is not None

    def snapshot(self, workloads: Mapping[str, Workload] | None = None) -> Snapshot:
        """The core's input: the verified view, with `workloads` (live plus lingering,
        from `_linger`) in place of the verified workloads when given."""
        assert self.node_key is not None
        return Snapshot(
            own_node=self.cfg.node_name,
            workloads=self.view.of("workloads/") if workloads is None else workloads,
            policies={p.name: p for p in self.view.of("policies/").values()},
            nodes={r.node: r for r in self.view.of("nodes/").values()},
            own_public_key=self.node_key.public_key)

    async def reconcile(self) -> None:
        if not self.in_sync:
            del self._causes[:-50]
            await self._write_status()
            return
        assert self.node_key is not None
        started = time.monotonic()
        now = _utcnow()
        self.view.expire(now)
        changed, self._changed_workloads = self._changed_workloads, set()
        lingered = self._linger(changed)
        if changed is not None:
            changed |= lingered.changed
        # the inventory follows the keys the core is told of; a full reconcile (start,
        # relist, resync, repair) compares every key, so a missed key cannot last
        self._inventory.sync(lingered.effective,
                             None if changed is None or self._full_needed else changed)
        desired = self.core.update(self.snapshot(self._inventory), changed)
        if self.desired is None or desired.conflicts != self.desired.conflicts:
            for conflict in desired.conflicts:
                log.warning("inventory conflict: %s", conflict)
        if desired.missing_peers and (self.desired is None or
                                      desired.missing_peers != self.desired.missing_peers):
            log.warning("selected traffic to %s is dropped: no verified key",
                        ", ".join(sorted(desired.missing_peers)))
        previous, self.desired = self.desired, desired
        causes, self._causes = self._causes, []
        full, self._full_needed = self._full_needed, False
        if full or self.mtu is None:
            await self._pick_mtu()
        assert self.mtu is not None
        self.dataplane.set_desired(desired, private_key_b64=self.node_key.key.private_key_b64,
                                   listen_port=self.cfg.listen_port, mtu=self.mtu,
                                   keepalive=self.cfg.persistent_keepalive)
        self._applying = True
        try:
            result = await self.dataplane.apply(full=full)
        finally:
            self._applying = False
        if "wireguard" not in result.failed:
            self._device_ready.set()
        if result.ops:
            self._own_changes_until = time.monotonic() + OWN_EVENTS_WINDOW
            if full and previous == desired:
                # same inputs, yet the kernel needed changes: someone else changed it
                self.last_repair = {"at": now.isoformat(), "why": _why(causes),
                                    "ops": dict(result.changed)}
                metrics.DRIFT_REPAIRS.inc()
        duration = time.monotonic() - started
        metrics.RECONCILES.labels("error" if result.errors else "ok").inc()
        metrics.RECONCILE_SECONDS.observe(duration)
        metrics.PEERS.set(len(desired.peers))
        metrics.SELECTED_PAIRS.set(desired.selected_pair_count)
        if result.ops:
            log.info("reconciled", extra={"fields": {
                "event": "dataplane_changed", **change_summary(previous, desired),
                "ops": dict(result.changed), "peers_total": len(desired.peers),
                "classes_total": len(desired.class_selectors), "why": _why(causes),
                **({"errors": result.errors} if result.errors else {})}})
        elif result.errors:
            log.warning("reconcile left items pending: %s", "; ".join(result.errors))
        self.last_reconcile = {"at": now.isoformat(), "duration_s": round(duration, 4),
                               "ops": result.ops, "errors": result.errors,
                               "changed": dict(result.changed)}
        await self._write_status()

    def _linger(self, changed: set[str] | None) -> LingerResult:
        """Keep deleted workloads selected for the grace period (tfcrypt/core/linger.py);
        log what started and ended lingering, and why."""
        result = linger(self._inventory, self.view.of("workloads/"), self._lingering,
                        time.monotonic(), self.cfg.workload_grace, changed)
        self._lingering = result.lingering
        self._next_expiry = result.next_expiry
        metrics.LINGERING.set(len(result.lingering))
        grace = self.cfg.workload_grace
        for key in result.started[:MAX_LINGER_LOGGED]:
            ips = list(result.lingering[key].workload.ips)
            log.info("%s deleted: its addresses %s stay selected for %gs unless reused",
                     key, ", ".join(ips), grace, extra={"fields": {
                         "event": "lingering_started", "key": key, "ips": ips,
                         "grace_s": grace}})
        for ended in result.ended[:MAX_LINGER_LOGGED]:
            why = ended.reason.value + (f" ({ended.ip} by {ended.by})"
                                        if ended.reason is EndReason.REUSED else "")
            log.info("%s no longer lingers: %s", ended.key, why, extra={"fields": {
                "event": "lingering_ended", "key": ended.key, "reason": ended.reason.value,
                **({"by": ended.by, "ip": ended.ip} if ended.by else {})}})
            if ended.reason is not EndReason.BACK:
                self._causes.append(f"lingering {ended.key} ended: {ended.reason.value}")
        skipped = (max(0, len(result.started) - MAX_LINGER_LOGGED),
                   max(0, len(result.ended) - MAX_LINGER_LOGGED))
        if any(skipped):
            log.info("lingering: %d more started and %d more ended (not listed)", *skipped,
                     extra={"fields": {"event": "lingering_summary",
                                       "lingering_total": len(result.lingering)}})
        return result

    def _lingering_status(self) -> dict[str, Any]:
        """Count, grace and (when few) each lingering workload with the time it has left."""
        now = time.monotonic()
        doc: dict[str, Any] = {"count": len(self._lingering),
                               "grace_s": self.cfg.workload_grace}
        if len(self._lingering) <= MAX_LINGER_SHOWN:
            doc["entries"] = [{"key": k, "node": e.workload.node, "ips": list(e.workload.ips),
                               "ends_in_s": round(max(0.0, e.until - now), 1)}
                              for k, e in sorted(self._lingering.items())]
        return doc

    async def _pick_mtu(self) -> None:
        """The configured MTU, else the underlay's minus WireGuard's worst-case overhead.

        The underlay is the interface holding the advertise address (what peers send to),
        read again on every full apply, so a changed underlay MTU follows within one resync.
        """
        if self.cfg.mtu:
            mtu, source = self.cfg.mtu, "configured"
        else:
            try:
                underlay = await self.dataplane.netlink.address_mtu(self.cfg.advertise_address)
            except (NetlinkError, OSError) as exc:
                underlay, why = None, f"unreadable ({exc})"
            else:
                why = f"no interface holds {self.cfg.advertise_address}"
            if underlay is not None and mtu_for_underlay(underlay) >= MIN_MTU:
                mtu, source = mtu_for_underlay(underlay), f"underlay MTU {underlay} - 80"
            else:
                if underlay is not None:
                    why = f"underlay MTU {underlay} leaves less than {MIN_MTU}"
                mtu, source = DEFAULT_MTU, f"default: {why}"
        if (mtu, source) != (self.mtu, self.mtu_source):
            log.info("wireguard MTU %d (%s)", mtu, source)
        self.mtu, self.mtu_source = mtu, source

    # -- status --------------------------------------------------------------------

    def _etcd_state(self, now: dt.datetime) -> dict[str, Any]:
        reg = self.registry
        if reg.connected:
            self._etcd_down_since = None
        elif self._etcd_down_since is None:
            self._etcd_down_since = now
        down = self._etcd_down_since
        return {"connected": reg.connected, "last_revision": reg.last_revision,
                "relists": reg.relists, "reconnects": reg.reconnects,
                "last_error": reg.last_error,
                "disconnected_since": down.isoformat() if down else None}

    async def _device_state(self) -> DeviceState | None:
        try:
            return await self.wg.status()
        except (WireGuardError, OSError) as exc:
            log.debug("status: wireguard %s unreadable: %s", self.cfg.interface, exc)
            return None

    async def _counters(self) -> dict[str, tuple[int, int]] | None:
        try:
            return await self.dataplane.nft.counters()
        except Exception as exc:  # status must answer whatever nft says
            log.debug("status: nft counters unreadable: %s", exc)
            return None

    def _peer_rows(self, device: DeviceState | None, now: float) -> list[dict[str, Any]]:
        d = self.desired
        ids = {r.node: r.spiffe_id for r in self.view.of("nodes/").values()}
        rows = []
        for p in sorted(d.peers.values() if d else (), key=lambda p: p.node):
            actual = device.peers.get(p.public_key) if device else None
            shake = actual.last_handshake if actual else None
            age = None if shake is None else max(0.0, now - shake)
            rows.append({
                "node": p.node, "spiffe_id": ids.get(p.node), "public_key": p.public_key,
                "endpoint": (actual.endpoint if actual and actual.endpoint else p.endpoint),
                "allowed_ips": sorted(p.allowed_ips), "allowed_ip_count": len(p.allowed_ips),
                "configured": device is not None and actual is not None,
                "latest_handshake": (dt.datetime.fromtimestamp(shake, dt.UTC).isoformat()
                                     if shake else None),
                "handshake_age_s": None if age is None else round(age, 1),
                "handshake": status_view.handshake_state(age),
                "rx_bytes": actual.rx_bytes if actual else 0,
                "tx_bytes": actual.tx_bytes if actual else 0})
        return rows

    async def collect_status(self) -> dict[str, Any]:
        """The status document (docs/operations.md), with its health verdict."""
        now = _utcnow()
        device = await self._device_state()
        counters = await self._counters()
        peers = self._peer_rows(device, now.timestamp())
        metrics.DATAPLANE.update(
            [metrics.PeerSample(r["node"], device.peers[r["public_key"]].last_handshake,
                                r["rx_bytes"], r["tx_bytes"])
             for r in peers if r["configured"] and device is not None], counters)
        nk = self.node_key
        svid = self.svid
        d = self.desired
        policies = self.view.of("policies/").values()
        status: dict[str, Any] = {
            "generated_at": now.isoformat(),
            "node": self.cfg.node_name,
            "spiffe_id": svid.spiffe_id if svid else None,
            "svid_expires": svid.not_after.isoformat() if svid else None,
            "public_key": nk.public_key if nk else None,
            "public_key_fingerprint": status_view.fingerprint(nk.public_key) if nk else None,
            "epoch": nk.epoch if nk else None,
            "key_problem": nk.key.problem if nk else None,
            "interface": self.cfg.interface,
            "listen_port": device.listen_port if device else self.cfg.listen_port,
            "mtu": self.mtu,
            "mtu_source": self.mtu_source,
            "device_present": device is not None,
            "device_restarts": getattr(self.wg.backend, "restarts", 0),
            "last_repair": self.last_repair,
            "in_sync": self.in_sync,
            "etcd": self._etcd_state(now),
            "etcd_grace_s": self.cfg.etcd_grace,
            "workload_api": {"connected": self.svids.state.connected,
                             "waiting_for_socket": self.svids.state.waiting_for_socket,
                             "errors": dict(self.svids.state.errors),
                             "last_error": self.svids.state.last_error},
            "peers": peers,
            "policies": {"enforce": sorted(p.name for p in policies if p.enforced),
                         "audit": sorted(p.name for p in policies if not p.enforced)},
            "workloads": len(self.view.of("workloads/")),
            "selected_pairs": d.selected_pair_count if d else 0,
            "audit_pairs": d.audit.pair_count if d else 0,
            "lingering_workloads": self._lingering_status(),
            "missing_peers": sorted(d.missing_peers) if d else [],
            "conflicts": list(d.conflicts) if d else [],
            "drops": {DROP_NAMES[name]: {"packets": p, "bytes": b}
                      for name, (p, b) in sorted((counters or {}).items())
                      if name in DROP_NAMES},
            "rejected": dict(self.view.rejections),
            "rejected_unremembered": self.view.unremembered,
            "last_reconcile": self.last_reconcile,
        }
        verdict = status_view.health(status, now)
        metrics.HEALTHY.set(1 if verdict.healthy else 0)
        status["health"] = verdict.to_json()
        return status

    async def _write_status(self) -> None:
        """status.json in the state dir, replaced atomically (for scripts and the lab)."""
        path = self._state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(await self.collect_status(), indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)


def _why(causes: list[str]) -> str:
    """The inputs behind a reconcile, deduplicated, at most a few named."""
    unique = list(dict.fromkeys(causes))
    if not unique:
        return "periodic resync (drift repaired)"
    shown = ", ".join(unique[:4])
    return shown + (f" and {len(unique) - 4} more" if len(unique) > 4 else "")
