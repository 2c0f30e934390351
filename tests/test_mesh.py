"""The mesh stepping stone: which verified nodes become peers, with what allowed IPs."""

from __future__ import annotations

import base64

import pytest

from tfcrypt.core.mesh import MeshSnapshot, compute_mesh
from tfcrypt.model.node import NodeRecord

NOW = 1_750_000_000.0


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def rec(node: str, n: int, *subnets: str, k: int | None = None) -> NodeRecord:
    return NodeRecord(node=node, spiffe_id=f"spiffe://lab.tfcrypt/tfcrypt/node/{node}",
                      wg_public_key=key(k if k is not None else n),
                      endpoint=f"10.77.0.{10 + n}:51820", workload_subnets=subnets,
                      epoch=1, issued_at=1)


def snap(*records: NodeRecord, own: str = "n1", expired: tuple[str, ...] = ()) -> MeshSnapshot:
    recs = {r.node: r for r in records}
    return MeshSnapshot(
        own_node=own, own_public_key=recs[own].wg_public_key if own in recs else key(99),
        records=recs,
        not_after={n: NOW - 1 if n in expired else NOW + 3600 for n in recs}, now=NOW)


def test_every_other_verified_node_is_a_peer_with_its_subnets() -> None:
    mesh = compute_mesh(snap(rec("n1", 1, "10.200.1.0/24"), rec("n2", 2, "10.200.2.0/24"),
                             rec("n3", 3, "10.200.3.0/24")))
    assert {p.node: sorted(p.allowed_ips) for p in mesh.peers.values()} == {
        "n2": ["10.200.2.0/24"], "n3": ["10.200.3.0/24"]}
    assert mesh.peers[key(2)].endpoint == "10.77.0.12:51820"
    assert mesh.routes == {"10.200.2.0/24", "10.200.3.0/24"}
    assert mesh.conflicts == ()


def test_expired_record_is_not_a_peer() -> None:
    mesh = compute_mesh(snap(rec("n1", 1), rec("n2", 2, "10.200.2.0/24"), expired=("n2",)))
    assert mesh.peers == {}
    assert mesh.routes == frozenset()


@pytest.mark.parametrize("shared_with_own", [False, True])
def test_shared_public_key_gives_no_peer(shared_with_own: bool) -> None:
    records = [rec("n1", 1), rec("n2", 2, "10.200.2.0/24", k=1 if shared_with_own else 7),
               rec("n3", 3, "10.200.3.0/24", k=7)]
    mesh = compute_mesh(snap(*records))
    expected = {"n3"} if shared_with_own else set()
    assert {p.node for p in mesh.peers.values()} == expected
    assert mesh.conflicts


def test_subnet_claimed_twice_goes_to_nobody() -> None:
    mesh = compute_mesh(snap(rec("n1", 1, "10.200.1.0/24"),
                             rec("n2", 2, "10.200.2.0/24", "10.200.9.0/24"),
                             rec("n3", 3, "10.200.9.0/24")))
    assert mesh.peers[key(2)].allowed_ips == {"10.200.2.0/24"}
    assert mesh.peers[key(3)].allowed_ips == frozenset()
    assert "10.200.9.0/24" not in mesh.routes


def test_a_node_claiming_our_subnet_does_not_get_it() -> None:
    mesh = compute_mesh(snap(rec("n1", 1, "10.200.1.0/24"),
                             rec("n2", 2, "10.200.2.0/24", "10.200.1.0/24")))
    assert mesh.peers[key(2)].allowed_ips == {"10.200.2.0/24"}
    assert mesh.routes == {"10.200.2.0/24"}


def test_same_inputs_same_output() -> None:
    s = snap(rec("n1", 1, "10.200.1.0/24"), rec("n2", 2, "10.200.2.0/24"))
    assert compute_mesh(s) == compute_mesh(s)


def test_a_wider_subnet_overlapping_another_nodes_is_refused() -> None:
    mesh = compute_mesh(snap(rec("n1", 1, "10.200.1.0/24"), rec("n2", 2, "10.200.2.0/24"),
                             rec("n3", 3, "10.200.0.0/16")))
    assert mesh.peers[key(3)].allowed_ips == frozenset()
    assert mesh.peers[key(2)].allowed_ips == frozenset()
    assert mesh.routes == frozenset()
    assert len(mesh.conflicts) == 2
