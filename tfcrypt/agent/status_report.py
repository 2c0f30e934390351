"""The status document: what the agent reports of itself, built when asked.

Rules:
- Computed when asked (the status API, tfcrypt/agent/status_api.py) and after every
  reconcile (status.json in the state dir, metrics samples). It reads the device and the
  nft counters, never changes them; either being unreadable gives a document saying so,
  never an error.
- One row per desired peer (sorted by node), joined with what the device reports of that
  peer: endpoint, handshake age and state, bytes. A desired peer the device lacks is
  `configured: false`.
- The fields are documented in docs/operations.md; the health verdict is
  tfcrypt/status_view.py's, from the document alone.
- status.json is written 0600, atomically (`write_private`).
- `local_workloads` lists this node's own workloads with every address each has (`ips`,
  IPv4 before IPv6): bounded by the pods a node runs, unlike the cluster's workloads,
  which are only counted (`workloads`).
- `trust` names X509 authorities as SPIRE does (subject key IDs in hex): those in our
  trust domain's bundle, the one that issued our SVID, and how many believed records of
  each family each signed. Before an operator revokes an old authority, no node may
  count records under it (docs/operations.md, "Rotating SPIRE's CA").
- etcd's `disconnected_since` is when the report first saw the connection down (from the
  start until the first connection, too), cleared when it is back.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from tfcrypt import metrics, status_view
from tfcrypt.agent.dataplane import Dataplane
from tfcrypt.agent.flows import FlowCollector
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.agent.nodekey import NodeKey
from tfcrypt.agent.reconcile import Reconciler
from tfcrypt.config import AgentConfig
from tfcrypt.identity.svid_source import SvidSource, SvidUpdate, svid_authority
from tfcrypt.identity.verify import authority_id
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.workload import Workload
from tfcrypt.privatefile import write_private
from tfcrypt.registry import Registry
from tfcrypt.wireguard.errors import WireGuardError
from tfcrypt.wireguard.model import DeviceState

DROP_NAMES = {"guard_drops": "guard", "ingress_drops": "strict_ingress",
              "ingress_audit": "strict_ingress_audit", "spoof_drops": "spoof"}


MAX_REFUSED_SHOWN = 20  # status lists refused addresses only when there are this few


def refused_status(refused: dict[str, str] | Any) -> dict[str, Any]:
    """Count, count by reason and (when few) each workload address refused as
    infrastructure with its reason."""
    by_reason: dict[str, int] = {}
    for why in refused.values():
        by_reason[why] = by_reason.get(why, 0) + 1
    doc: dict[str, Any] = {"count": len(refused), "by_reason": dict(sorted(by_reason.items()))}
    if len(refused) <= MAX_REFUSED_SHOWN:
        doc["entries"] = [{"ip": ip, "reason": why} for ip, why in refused.items()]
    return doc


class AgentState(Protocol):
    """What the report reads of the agent (tfcrypt/agent/loop.py)."""

    @property
    def cfg(self) -> AgentConfig: ...
    @property
    def registry(self) -> Registry: ...
    @property
    def svids(self) -> SvidSource: ...
    @property
    def dataplane(self) -> Dataplane: ...
    @property
    def view(self) -> VerifiedView: ...
    @property
    def reconciler(self) -> Reconciler: ...
    @property
    def svid(self) -> SvidUpdate | None: ...
    @property
    def node_key(self) -> NodeKey | None: ...
    @property
    def in_sync(self) -> bool: ...
    @property
    def epochs_problem(self) -> str | None: ...
    @property
    def flows(self) -> FlowCollector | None: ...


class StatusReport:
    def __init__(self, agent: AgentState) -> None:
        self.agent = agent
        self._etcd_down_since: dt.datetime | None = dt.datetime.now(dt.UTC)

    async def collect(self) -> dict[str, Any]:
        """The status document (docs/operations.md), with its health verdict."""
        a, rec = self.agent, self.agent.reconciler
        cfg = a.cfg
        now = dt.datetime.now(dt.UTC)
        device = await self._device_state()
        counters = await self._counters()
        peers = self._peer_rows(device, now.timestamp())
        metrics.DATAPLANE.update(
            [metrics.PeerSample(r["node"], device.peers[r["public_key"]].last_handshake,
                                r["rx_bytes"], r["tx_bytes"])
             for r in peers if r["configured"] and device is not None], counters)
        nk = a.node_key
        svid = a.svid
        d = rec.desired
        policies = a.view.of("policies/").values()
        svids = a.svids.state
        own_key = f"nodes/{cfg.node_name}"
        refused = a.view.rejected.get(own_key)
        rollbacks = {k.removeprefix("nodes/"): m
                     for k, m in a.view.rollbacks("nodes/").items() if k != own_key}
        metrics.PEER_ROLLBACK.clear()
        for node in rollbacks:
            metrics.PEER_ROLLBACK.labels(node).set(1)
        metrics.OWN_RECORD_REFUSED.set(1 if refused else 0)
        metrics.OWN_RECORD_REASSERTED.set(a.registry.reasserted)
        wls = a.view.of("workloads/")
        status: dict[str, Any] = {
            "generated_at": now.isoformat(),
            "node": cfg.node_name,
            "spiffe_id": svid.spiffe_id if svid else None,
            "svid_expires": svid.not_after.isoformat() if svid else None,
            "public_key": nk.public_key if nk else None,
            "public_key_fingerprint": status_view.fingerprint(nk.public_key) if nk else None,
            "epoch": nk.epoch if nk else None,
            "key_problem": nk.key.problem if nk else None,
            "interface": cfg.interface,
            "listen_port": device.listen_port if device else cfg.listen_port,
            "mtu": rec.mtu,
            "mtu_source": rec.mtu_source,
            "device_present": device is not None,
            "device_restarts": getattr(a.dataplane.wireguard.backend, "restarts", 0),
            "last_repair": rec.last_repair,
            "in_sync": a.in_sync,
            "etcd": self._etcd_state(now),
            "etcd_grace_s": cfg.etcd_grace,
            "workload_api": {"connected": svids.connected,
                             "waiting_for_socket": svids.waiting_for_socket,
                             "errors": dict(svids.errors),
                             "last_error": svids.last_error,
                             "last_refusal": (svids.last_refusal.to_json()
                                              if svids.last_refusal else None)},
            "peers": peers,
            "trust": trust_status(a.view, svid),
            "policies": {"enforce": sorted(p.name for p in policies if p.enforced),
                         "audit": sorted(p.name for p in policies if not p.enforced)},
            "workloads": len(wls),
            "local_workloads": local_workloads(wls.values(), cfg.node_name),
            "selected_pairs": d.selected_pair_count if d else 0,
            "audit_pairs": d.audit.pair_count if d else 0,
            "lingering_workloads": rec.inputs.lingering.status(),
            "missing_peers": sorted(d.missing_peers) if d else [],
            "conflicts": list(d.conflicts) if d else [],
            "refused": refused_status(d.refused if d else {}),
            "infrastructure": {"count": len(d.infrastructure) if d else 0,
                               **({"prefixes": sorted(d.infrastructure)}
                                  if d and len(d.infrastructure) <= MAX_REFUSED_SHOWN
                                  else {})},
            "drops": {DROP_NAMES[name]: {"packets": p, "bytes": b}
                      for name, (p, b) in sorted((counters or {}).items())
                      if name in DROP_NAMES},
            "rejected": dict(a.view.rejections),
            "own_record": {"refused": refused.message if refused else None,
                           "refused_reason": refused.reason.value if refused else None,
                           "reasserted": a.registry.reasserted},
            "rollbacks": rollbacks,
            "epochs": {"remembered": len(a.view.epochs), "problem": a.epochs_problem},
            "rejected_unremembered": a.view.unremembered,
            "last_reconcile": rec.last_reconcile,
            "flows": a.flows.status() if a.flows is not None else None,
        }
        verdict = status_view.health(status, now)
        metrics.HEALTHY.set(1 if verdict.healthy else 0)
        status["health"] = verdict.to_json()
        return status

    async def write(self, state_dir: Path) -> None:
        """status.json in the state dir, replaced atomically (for scripts and the lab).

        Mode 0600 from its first byte (created so, never widened by the umask), like the
        status socket: status names peers, addresses and policies, not for every user."""
        path = state_dir / STATUS_FILE
        text = json.dumps(await self.collect(), indent=1, sort_keys=True)
        try:
            write_private(path, text.encode(), durable=False)
        except OSError as exc:
            log.warning("cannot write %s: %s", path, exc)

    def _etcd_state(self, now: dt.datetime) -> dict[str, Any]:
        reg = self.agent.registry
        if reg.connected:
            self._etcd_down_since = None
        elif self._etcd_down_since is None:
            self._etcd_down_since = now
        down = self._etcd_down_since
        return {"connected": reg.connected, "last_revision": reg.last_revision,
                "relists": reg.relists, "reconnects": reg.reconnects,
                "tls": reg.tls, "credential_rotations": reg.status().credential_rotations,
                "last_error": reg.last_error,
                "disconnected_since": down.isoformat() if down else None}

    async def handshakes(self) -> dict[str, float | None]:
        """Peer node -> its last handshake (UNIX time; None: never or not configured),
        for this node's flow report."""
        device = await self._device_state()
        d = self.agent.reconciler.desired
        out: dict[str, float | None] = {}
        for p in d.peers.values() if d else ():
            actual = device.peers.get(p.public_key) if device else None
            out[p.node] = actual.last_handshake if actual and actual.last_handshake else None
        return out

    async def _device_state(self) -> DeviceState | None:
        try:
            return await self.agent.dataplane.wireguard.status()
        except (WireGuardError, OSError) as exc:
            log.debug("status: wireguard %s unreadable: %s", self.agent.cfg.interface, exc)
            return None

    async def _counters(self) -> dict[str, tuple[int, int]] | None:
        try:
            return await self.agent.dataplane.nft.counters()
        except Exception as exc:  # status must answer whatever nft says
            log.debug("status: nft counters unreadable: %s", exc)
            return None

    def _peer_rows(self, device: DeviceState | None, now: float) -> list[dict[str, Any]]:
        d = self.agent.reconciler.desired
        view = self.agent.view
        ids = {r.node: r.spiffe_id for r in view.of("nodes/").values()}
        rows = []
        for p in sorted(d.peers.values() if d else (), key=lambda p: p.node):
            actual = device.peers.get(p.public_key) if device else None
            shake = actual.last_handshake if actual else None
            age = None if shake is None else max(0.0, now - shake)
            rows.append({
                "node": p.node, "spiffe_id": ids.get(p.node), "public_key": p.public_key,
                "authority": view.authority.get(f"nodes/{p.node}"),
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


def trust_status(view: VerifiedView, svid: SvidUpdate | None) -> dict[str, Any]:
    """The X509 authorities in play (module rules): bundle, our SVID's, the records'."""
    by: dict[str, dict[str, int]] = {}
    for key, authority in view.authority.items():
        family = key.split("/", 1)[0]
        counts = by.setdefault(authority or "unknown", {})
        counts[family] = counts.get(family, 0) + 1
    cas = svid.bundles.get(svid.trust_domain, ()) if svid else ()
    return {"bundle_authorities": sorted(authority_id(ca) for ca in cas),
            "svid_authority": svid_authority(svid) if svid else None,
            "records_by_authority": {k: dict(sorted(v.items())) for k, v in sorted(by.items())}}


def local_workloads(workloads: Iterable[Workload], node: str) -> list[dict[str, Any]]:
    """This node's workloads, by name, each with all its addresses (both families)."""
    return [{"name": w.name, "ips": list(w.ips)}
            for w in sorted(workloads, key=lambda w: w.name) if w.node == node]


STATUS_FILE = "status.json"


