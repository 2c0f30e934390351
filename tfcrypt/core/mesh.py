"""The node mesh: which verified nodes become WireGuard peers, with which allowed IPs.

This is the "encrypt everything between nodes" stepping stone (TF's encryption-mode
all): every verified remote node is a peer, its allowed IPs are the workload subnets its
own signed record declares, and those subnets are routed into the tunnel.

Rules:
- The own node is never a peer, and its own subnets are never routed into the tunnel.
- Two records with the same WireGuard public key cannot both be peers (WireGuard keys
  peers by public key): neither is configured, and the conflict is reported.
- A subnet that overlaps a subnet declared by another node is given to neither
  (WireGuard would silently move an exact duplicate to whichever peer was written last,
  and route an overlap by longest prefix: either lets one node take another's traffic).
- A record whose chain expired by `now` is stale and ignored.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tfcrypt.model.node import NodeRecord


@dataclass(frozen=True)
class MeshPeer:
    node: str
    public_key: str
    endpoint: str
    allowed_ips: frozenset[str]


@dataclass(frozen=True)
class MeshSnapshot:
    """Verified inputs: node records by node name, and when each one's signer expires."""

    own_node: str
    own_public_key: str
    records: Mapping[str, NodeRecord]
    not_after: Mapping[str, float]  # unix seconds, per node
    now: float


@dataclass(frozen=True)
class DesiredMesh:
    peers: Mapping[str, MeshPeer]  # by public key
    routes: frozenset[str]
    conflicts: tuple[str, ...]


def compute_mesh(snap: MeshSnapshot) -> DesiredMesh:
    conflicts: list[str] = []
    live = {
        name: rec for name, rec in sorted(snap.records.items())
        if name != snap.own_node and snap.not_after.get(name, 0) > snap.now
    }
    key_count = Counter(rec.wg_public_key for rec in live.values())
    key_count[snap.own_public_key] += 1
    for key, n in sorted(key_count.items()):
        if n > 1:
            holders = sorted(r.node for r in live.values() if r.wg_public_key == key)
            conflicts.append(f"public key shared by {', '.join(holders)}")
    live = {n: r for n, r in live.items() if key_count[r.wg_public_key] == 1}

    own_subnets = set(snap.records[snap.own_node].workload_subnets) \
        if snap.own_node in snap.records else set()
    contested = _contested_subnets(live, own_subnets)
    conflicts += [f"subnet {s} overlaps another node's subnet" for s in sorted(contested)]
    peers = {}
    for rec in live.values():
        allowed = frozenset(s for s in rec.workload_subnets if s not in contested)
        peers[rec.wg_public_key] = MeshPeer(rec.node, rec.wg_public_key, rec.endpoint, allowed)
    routes = frozenset(s for p in peers.values() for s in p.allowed_ips)
    return DesiredMesh(peers, routes, tuple(conflicts))


def _contested_subnets(live: Mapping[str, NodeRecord], own: Iterable[str]) -> set[str]:
    """Subnets of remote nodes that overlap a subnet of any other node (ours included).

    Quadratic in the number of subnets, which is fine for one subnet per node; the
    policy-driven core of later issues takes allowed IPs from the signed inventory.
    """
    owned = [(None, ipaddress.ip_network(s)) for s in own]
    owned += [(rec.node, ipaddress.ip_network(s))
              for rec in live.values() for s in rec.workload_subnets]
    contested = set()
    for i, (node_a, net_a) in enumerate(owned):
        for node_b, net_b in owned[i + 1:]:
            if node_a != node_b and net_a.version == net_b.version and net_a.overlaps(net_b):
                contested.update(str(n) for who, n in ((node_a, net_a), (node_b, net_b))
                                 if who is not None)
    return contested
