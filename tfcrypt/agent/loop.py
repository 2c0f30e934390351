"""The agent loop: sources mark the view dirty, one debounced reconcile applies it.

Rules:
- Tasks live in one TaskGroup: the SVID follower, the etcd follower, the publisher, the
  key-file watcher, the device supervisor and the reconciler. Nothing is fire-and-forget.
- No peer, route or rule is removed until the inputs are in sync (an SVID is loaded and
  etcd has been listed once): a restarted agent adopts what the previous one left and
  leaves traffic alone until it knows better.
- Apply order, for security: WireGuard device and peers, then routes into the tunnel,
  then the rule that sends traffic to those routes. Removing a peer's subnets happens in
  the same pass: the route goes when the peer goes, and the rule stays.
- On exit (SIGTERM, SIGINT) the dataplane and the etcd record stay as they are: a
  restart must not disturb traffic; the record's lease lapses if no agent returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tfcrypt import metrics
from tfcrypt.agent.dataplane import Dataplane
from tfcrypt.agent.nodekey import NodeKey, key_file_stamp, load_node_key
from tfcrypt.config import AgentConfig
from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.identity import Authorizer, TrustBundles, sign_envelope
from tfcrypt.identity.svid_source import SvidSource, SvidUpdate
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import families
from tfcrypt.model.node import NodeRecord
from tfcrypt.registry import Registry
from tfcrypt.registry.errors import RegistryError
from tfcrypt.registry.events import Deleted, Listed, Put

log = logging.getLogger(__name__)

DEBOUNCE = 0.05
DEFAULT_MTU = 1420  # 1500-byte underlay minus the 80 bytes of WireGuard over IPv6


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
                                 on_reject=lambda r: metrics.RECORDS_REJECTED.labels(r).inc())
        self.svid: SvidUpdate | None = None
        self.listed = False
        self.node_key: NodeKey | None = None
        self.desired: Desired | None = None
        self.last_reconcile: dict[str, Any] = {}
        self._dirty = asyncio.Event()
        self._publish_needed = asyncio.Event()
        self._state_dir = Path(cfg.state_dir)
        self._own_key = f"nodes/{cfg.node_name}"
        self._published: bytes | None = None

    # -- tasks -----------------------------------------------------------------------

    async def run(self) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fallback = None
        try:
            await self.wg.backend.ensure_device()
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
            metrics.SVID_EXPIRY.set(update.not_after.timestamp())
            authorizer = Authorizer(
                trust_domain=update.trust_domain,
                node_id_template=self.cfg.node_id_template,
                controller_ids=self.cfg.controller_ids)
            self.view.set_trust(TrustBundles(update.bundles), authorizer, _utcnow())
            self._publish_needed.set()
            self._dirty.set()

    async def _follow_registry(self) -> None:
        async for event in self.registry.events():
            now = _utcnow()
            match event:
                case Listed(items=items):
                    self.view.replace_all({k: i.value for k, i in items.items()}, now)
                    self.listed = True
                    self._publish_needed.set()  # our record may have vanished meanwhile
                case Put(rel_key=key, value=value):
                    self.view.put(key, value, now)
                    if key == self._own_key and value != self._published:
                        log.warning("%s was overwritten by someone else; republishing", key)
                        self._publish_needed.set()
                case Deleted(rel_key=key):
                    self.view.delete(key)
                    if key == self._own_key:
                        self._publish_needed.set()
            self._dirty.set()

    async def _publisher(self) -> None:
        """Publish our signed record whenever the SVID, the key or etcd's view changes."""
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
            self._published = value
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
            await self.reconcile()  # the device gets the new key before peers hear of it
            self._publish_needed.set()

    async def _follow_device_restarts(self) -> None:
        """A vanished device took its peers and routes with it: re-apply at once."""
        restarted: asyncio.Event = self.wg.backend.restarted  # type: ignore[attr-defined]
        while True:
            await restarted.wait()
            restarted.clear()
            log.warning("wireguard device %s was restarted; re-applying", self.cfg.interface)
            self._dirty.set()

    async def _reconciler(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.cfg.resync_interval)
            await asyncio.sleep(DEBOUNCE)
            self._dirty.clear()
            await self.reconcile()

    # -- reconcile -----------------------------------------------------------------

    @property
    def in_sync(self) -> bool:
        return self.svid is not None and self.listed and self.node_key is not None

    def snapshot(self) -> Snapshot:
        assert self.node_key is not None
        return Snapshot(
            own_node=self.cfg.node_name,
            workloads=self.view.of("workloads/"),
            policies={p.name: p for p in self.view.of("policies/").values()},
            nodes={r.node: r for r in self.view.of("nodes/").values()},
            own_public_key=self.node_key.public_key)

    async def reconcile(self) -> None:
        if not self.in_sync:
            self._write_status()
            return
        assert self.node_key is not None
        started = time.monotonic()
        now = _utcnow()
        self.view.expire(now)
        desired = compute(self.snapshot())
        if self.desired is None or desired.conflicts != self.desired.conflicts:
            for conflict in desired.conflicts:
                log.warning("inventory conflict: %s", conflict)
        if desired.missing_peers and (self.desired is None or
                                      desired.missing_peers != self.desired.missing_peers):
            log.warning("selected traffic to %s is dropped: no verified key",
                        ", ".join(sorted(desired.missing_peers)))
        self.desired = desired
        self.dataplane.set_desired(desired, private_key_b64=self.node_key.key.private_key_b64,
                                   listen_port=self.cfg.listen_port,
                                   mtu=self.cfg.mtu or DEFAULT_MTU)
        result = await self.dataplane.apply()
        duration = time.monotonic() - started
        metrics.RECONCILES.labels("error" if result.errors else "ok").inc()
        metrics.RECONCILE_SECONDS.observe(duration)
        metrics.PEERS.set(len(desired.peers))
        metrics.SELECTED_PAIRS.set(desired.selected_pair_count)
        if result.ops:
            log.info("reconciled: %s; %d peer(s), %d selected pair(s), %d class(es)%s",
                     ", ".join(f"{n} {c}" for n, c in result.changed.items()),
                     len(desired.peers), desired.selected_pair_count, len(desired.class_peers),
                     f"; errors: {'; '.join(result.errors)}" if result.errors else "")
        elif result.errors:
            log.warning("reconcile left items pending: %s", "; ".join(result.errors))
        self.last_reconcile = {"at": now.isoformat(), "duration_s": round(duration, 4),
                               "ops": result.ops, "errors": result.errors}
        self._write_status()

    # -- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        nk = self.node_key
        svid = self.svid
        d = self.desired
        reg = self.registry
        return {
            "node": self.cfg.node_name,
            "spiffe_id": svid.spiffe_id if svid else None,
            "svid_expires": svid.not_after.isoformat() if svid else None,
            "public_key": nk.public_key if nk else None,
            "epoch": nk.epoch if nk else None,
            "key_problem": nk.key.problem if nk else None,
            "in_sync": self.in_sync,
            "etcd": {"connected": reg.connected, "last_revision": reg.last_revision,
                     "relists": reg.relists, "reconnects": reg.reconnects,
                     "last_error": reg.last_error},
            "workload_api": {"connected": self.svids.state.connected,
                             "waiting_for_socket": self.svids.state.waiting_for_socket,
                             "errors": dict(self.svids.state.errors),
                             "last_error": self.svids.state.last_error},
            "peers": [{"node": p.node, "public_key": p.public_key, "endpoint": p.endpoint,
                       "allowed_ips": sorted(p.allowed_ips)}
                      for p in (d.peers.values() if d else ())],
            "policies": {
                "enforce": sorted(p.name for p in self.view.of("policies/").values()
                                  if p.enforced),
                "audit": sorted(p.name for p in self.view.of("policies/").values()
                                if not p.enforced)},
            "workloads": len(self.view.of("workloads/")),
            "selected_pairs": d.selected_pair_count if d else 0,
            "audit_pairs": d.audit.pair_count if d else 0,
            "missing_peers": sorted(d.missing_peers) if d else [],
            "conflicts": list(d.conflicts) if d else [],
            "rejected": dict(self.view.rejections),
            "last_reconcile": self.last_reconcile,
        }

    def _write_status(self) -> None:
        """status.json in the state dir, replaced atomically (read by `tfcrypt status`)."""
        path = self._state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status(), indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)
