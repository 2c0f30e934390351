"""Infrastructure addresses are never selected (issue #14 item 2), in the pure core.

Whatever the inventory and policies say, no address inside an infrastructure prefix (a
node record's address, an etcd endpoint, a configured CIDR) is in a local class, a
selector set or a peer's allowed IPs; each one a workload claims is in `refused` with a
reason; everything else is selected exactly as the pairwise definition says of the
inventory without the refused addresses.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selection import (
    IPS,
    NODES,
    SUBNETS,
    desired_pairs,
    inventories,
    oracle_pairs,
    record,
    snapshot,
)

from tfcrypt.core.compute import compute
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.infrastructure import (
    Infrastructure,
    Reason,
    Screen,
    canonical_prefix,
    infrastructure_of,
    screened,
)
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.workload import Workload

CATCH_ALL = EncryptionPolicy("all", Mode.ENFORCE, (Rule(Endpoint(any=True),
                                                        Endpoint(any=True), ()),))
NODE_ADDR = {n: f"192.0.2.{i}" for i, n in enumerate(NODES, 1)}  # record()'s endpoints

infra_entries = st.dictionaries(
    st.sampled_from([*IPS, *SUBNETS]).map(canonical_prefix),
    st.sampled_from([Reason.ETCD.value, Reason.CONFIGURED.value]), max_size=3)


def in_infra(ip: str, infra: Infrastructure) -> bool:
    return infra.reason_for(ip) is not None


@settings(max_examples=200, deadline=None)
@given(inventories(), infra_entries, st.booleans())
def test_no_infrastructure_address_is_ever_selected_and_the_rest_is_the_definition(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]],
        static: dict[str, str], host_network: bool) -> None:
    workloads, policies, nodes = inv
    if host_network:  # a host-network pod per node: its record holds the node's address
        workloads = [*workloads, *(Workload(f"h-{n}", n, (NODE_ADDR[n],), frozenset())
                                   for n in nodes)]
    policies = [*policies, CATCH_ALL]
    for own in NODES:
        snap = dataclasses.replace(snapshot(own, workloads, policies, nodes),
                                   infrastructure=static)
        d = compute(snap)
        infra = infrastructure_of(static, nodes)
        assert d.infrastructure == infra.prefixes
        chosen = set(d.local_class) | set().union(*d.selector_ips.values())
        allowed = {ip.split("/")[0] for p in d.peers.values() for ip in p.allowed_ips}
        assert not any(in_infra(ip, infra) for ip in chosen | allowed)
        claimed = {ip for w in workloads for ip in w.ips}
        assert set(d.refused) == {ip for ip in claimed if in_infra(ip, infra)}
        assert all(d.refused[ip] == infra.reason_for(ip) for ip in d.refused)
        kept = [dataclasses.replace(w, ips=tuple(ip for ip in w.ips if ip not in d.refused))
                for w in workloads if any(ip not in d.refused for ip in w.ips)]
        assert desired_pairs(d) == oracle_pairs(own, kept, policies)
        assert IncrementalCore(own).update(snap) == d


def test_host_network_pods_and_an_etcd_squatter_are_refused_with_their_reasons() -> None:
    nodes = {n: record(n) for n in ("n1", "n2")}
    workloads = [Workload("w1", "n1", ("10.0.0.1",), frozenset()),
                 Workload("w2", "n2", ("10.0.0.2", "192.0.2.2"), frozenset()),
                 Workload("host-n1", "n1", ("192.0.2.1",), frozenset()),
                 Workload("squatter", "n2", ("10.77.0.2",), frozenset())]
    snap = dataclasses.replace(
        snapshot("n1", workloads, [CATCH_ALL], nodes),
        infrastructure={"10.77.0.2": Reason.ETCD.value, "10.96.0.0/12": "configured"})
    d = compute(snap)
    assert d.refused == {"10.77.0.2": "etcd endpoint", "192.0.2.1": "node address",
                         "192.0.2.2": "node address"}
    assert d.local_class.keys() == {"10.0.0.1"}
    assert d.selected_remote_ips == {"10.0.0.2"}
    assert {p.node: p.allowed_ips for p in d.peers.values()} == {"n2": {"10.0.0.2/32"}}
    assert d.infrastructure == {"10.77.0.2", "10.96.0.0/12", "192.0.2.1", "192.0.2.2"}


def test_the_most_specific_reason_wins_and_prefixes_are_normalised() -> None:
    infra = infrastructure_of({"192.0.2.1": "configured", "10.1.2.3/8": "configured"},
                              {"n1": record("n1")})
    assert infra.entries == {"10.0.0.0/8": "configured", "192.0.2.1": "node address"}
    assert infra.reason_for("10.200.0.1") == "configured"
    assert infra.reason_for("11.0.0.1") is None
    assert infra.reason_for("fd00::1") is None
    with pytest.raises(ValueError):
        canonical_prefix("api.example")


def apply_random_change(rng: random.Random, live: dict[str, Workload]) -> str:
    key = f"workloads/{rng.choice(NODES)}/w{rng.randrange(6)}"
    if key in live and rng.random() < 0.4:
        del live[key]
    else:
        node, name = key.split("/")[1:]
        ips = tuple(sorted(rng.sample([*IPS[:8], *NODE_ADDR.values()], rng.randint(1, 2))))
        live[key] = Workload(name, node, ips, frozenset())
    return key


def plain(m: Mapping[str, Workload]) -> dict[str, Workload]:
    return {k: m[k] for k in m}


def test_the_agents_screen_kept_across_changes_equals_screening_from_scratch() -> None:
    rng = random.Random(14)
    screen = Screen()
    live: dict[str, Workload] = {}
    infra = Infrastructure()
    before: dict[str, Workload] = {}
    for _ in range(400):
        changed: set[str] | None = {apply_random_change(rng, live)
                                    for _ in range(rng.randint(0, 3))}
        if rng.random() < 0.1:
            infra = Infrastructure.of({canonical_prefix(p): "configured"
                                       for p in rng.sample([*IPS[:8], *SUBNETS], 2)})
        if rng.random() < 0.05:
            changed = None
        out, told = screen.update(live, infra, changed)
        want, refused = screened(live, infra)
        assert plain(out) == plain(want) and len(out) == len(want)
        assert screen.refused == refused
        after = plain(out)
        if told is not None:  # every key whose screened value moved is named
            assert {k for k in before.keys() | after.keys()
                    if before.get(k) != after.get(k)} <= told
        before = after


class StubView:
    """What CoreInput reads of the verified view: `of(prefix)`."""

    def __init__(self, workloads: list[Workload], nodes: list[NodeRecord]) -> None:
        self.workloads = {w.key: w for w in workloads}
        self.nodes = {f"nodes/{r.node}": r for r in nodes}

    def of(self, prefix: str) -> dict[str, object]:
        return {"workloads/": self.workloads, "nodes/": self.nodes,
                "policies/": {CATCH_ALL.key: CATCH_ALL}}[prefix]  # type: ignore[return-value]


def test_the_agents_infrastructure_follows_node_records_keeps_expired_ones_and_reaches_nft(
        ) -> None:
    import asyncio

    from test_dataplane import make

    from tfcrypt.agent.snapshot import CoreInput
    from tfcrypt.dataplane.nft_listing import parse_listing

    inputs = CoreInput("n1", 0, {"10.77.0.2": Reason.ETCD.value})
    w = [Workload("w1", "n1", ("10.0.0.1",), frozenset()),
         Workload("w2", "n2", ("10.0.0.2",), frozenset()),
         Workload("host-n2", "n2", ("192.0.2.2",), frozenset()),
         Workload("squatter", "n2", ("10.77.0.2",), frozenset()),
         Workload("w3", "n3", ("192.0.2.3",), frozenset())]
    view = StubView(w, [record("n1"), record("n2")])
    dp, _, _ = make()

    def step(full: bool = False) -> tuple[dict[str, str], set[str], set[str]]:
        d = inputs.desired(view, record("n1").wg_public_key, full, [])  # type: ignore[arg-type]
        dp.set_desired(d, private_key_b64=record("n1").wg_public_key, listen_port=51820,
                       mtu=1420, keepalive=25)
        assert not asyncio.run(dp.apply(full=full)).errors
        fake = dp.nft._nft
        infra = set(parse_listing(fake.listing()).elements["infra_v4"])  # type: ignore[attr-defined]
        return dict(d.refused), set(d.selected_remote_ips), infra

    refused, selected, infra = step()
    assert refused == {"10.77.0.2": "etcd endpoint", "192.0.2.2": "node address"}
    assert selected == {"10.0.0.2", "192.0.2.3"}
    assert infra == {"10.77.0.2", "192.0.2.1", "192.0.2.2"}

    view.nodes.pop("nodes/n2")  # n2's record expired: its address stays infrastructure
    view.nodes["nodes/n3"] = record("n3")  # n3 appears: w3's address is now refused
    refused, selected, infra = step()
    assert refused == {"10.77.0.2": "etcd endpoint", "192.0.2.2": "node address",
                       "192.0.2.3": "node address"}
    assert selected == {"10.0.0.2"}
    assert infra == {"10.77.0.2", "192.0.2.1", "192.0.2.2/31"}  # collapsed

    view.workloads.pop("workloads/n2/squatter")
    inputs.note_changed("workloads/n2/squatter")
    refused, selected, _ = step(full=True)
    assert "10.77.0.2" not in refused and selected == {"10.0.0.2"}
