"""The class-based selection equals the pairwise definition, on random inventories.

Also: the incremental core equals compute after every step of random change sequences;
audit never touches enforced state, union semantics, allowed IPs, class keys that
remote changes cannot move, explain and plan agreeing with the definition, and sequences
of snapshots replayed forward, reversed, with empties and squashed (STYLE.md point 10).
"""

from __future__ import annotations

import base64
import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from tfcrypt.core.compute import Desired, Snapshot, compute, host_cidr
from tfcrypt.core.explain import diff_selection, explain
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.postings import planned_keys
from tfcrypt.core.remote_index import RemoteIndex
from tfcrypt.core.selection import (
    classify,
    is_selected_pairwise,
    rules_of,
)
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload

NODES = ("n1", "n2", "n3", "n4")
IPS = (*(f"10.0.0.{i}" for i in range(1, 17)), "fd00::1", "fd00::2", "fd00::9")
SUBNETS = ("10.0.0.0/29", "10.0.0.8/29", "10.0.0.0/24", "10.0.0.4/30", "fd00::/125",
           "fd00::/64")
SINGLE = {"application": ("a", "b"), "site": ("x", "y"), "tier": ("web", "db")}
LABELS = ("p", "q", "r")


def key_of(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def record(node: str) -> NodeRecord:
    n = NODES.index(node) + 1
    return NodeRecord(node, f"spiffe://lab.tfcrypt/tfcrypt/node/{node}", key_of(n),
                      f"192.0.2.{n}:51820", (), 1, 1)


@st.composite
def tag_sets(draw: st.DrawFn, min_size: int = 0) -> frozenset[Tag]:
    tags = {Tag(t, draw(st.sampled_from(vals)))
            for t, vals in SINGLE.items() if draw(st.booleans())}
    tags |= {Tag("label", v) for v in draw(st.sets(st.sampled_from(LABELS), max_size=2))}
    if len(tags) < min_size:
        tags.add(Tag("application", draw(st.sampled_from(SINGLE["application"]))))
    return frozenset(tags)


@st.composite
def workload_sets(draw: st.DrawFn, nodes: Sequence[str]) -> list[Workload]:
    count = draw(st.integers(0, 12))
    return [Workload(f"w{i}", draw(st.sampled_from(nodes)),
                     tuple(draw(st.sets(st.sampled_from(IPS), min_size=1, max_size=2))),
                     draw(tag_sets()))
            for i in range(count)]


endpoints = st.one_of(
    st.builds(lambda t: Endpoint(tags=t), tag_sets(min_size=1).filter(lambda t: len(t) <= 2)),
    st.builds(lambda s: Endpoint(subnet=s), st.sampled_from(SUBNETS)),
    st.just(Endpoint(any=True)),
)
rules = st.builds(Rule, endpoints, endpoints,
                  st.lists(st.sampled_from(sorted(SINGLE)), max_size=2).map(tuple))


@st.composite
def policy_sets(draw: st.DrawFn, max_size: int = 3) -> list[EncryptionPolicy]:
    count = draw(st.integers(0, max_size))
    return [EncryptionPolicy(f"p{i}", draw(st.sampled_from(Mode)),
                             tuple(draw(st.lists(rules, min_size=1, max_size=3))))
            for i in range(count)]


@st.composite
def inventories(draw: st.DrawFn) -> tuple[list[Workload], list[EncryptionPolicy],
                                          dict[str, NodeRecord]]:
    nodes = NODES[:draw(st.integers(2, 4))]
    with_records = draw(st.sets(st.sampled_from(nodes)))
    return (draw(workload_sets(nodes)), draw(policy_sets()),
            {n: record(n) for n in sorted(with_records)})


def snapshot(own: str, workloads: Iterable[Workload], policies: Iterable[EncryptionPolicy],
             nodes: Mapping[str, NodeRecord]) -> Snapshot:
    return Snapshot(own, {w.key: w for w in workloads}, {p.name: p for p in policies},
                    dict(nodes), key_of(NODES.index(own) + 1))


def oracle_pairs(own: str, workloads: Sequence[Workload],
                 policies: Sequence[EncryptionPolicy],
                 mode: Mode = Mode.ENFORCE) -> set[tuple[str, str]]:
    return {(x, y) for a in workloads if a.node == own for x in a.ips
            for b in workloads if b.node != own for y in b.ips
            if is_selected_pairwise(a, x, b, y, policies, mode)}


def desired_pairs(d: Desired) -> set[tuple[str, str]]:
    return {(x, y) for x, c in d.local_class.items() for y in d.class_peers[c]}


def enforced_part(d: Desired) -> Desired:
    return dataclasses.replace(d, audit=None)  # type: ignore[arg-type]


def assert_compute_equals_the_definition(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]]) -> None:
    """Pairs, their count, class key form and audit count of every node's compute()."""
    workloads, policies, nodes = inv
    for own in NODES:
        d = compute(snapshot(own, workloads, policies, nodes))
        assert desired_pairs(d) == oracle_pairs(own, workloads, policies)
        assert d.selected_pair_count == len(desired_pairs(d))
        assert all(re.fullmatch(r"c[0-9a-f]{10}(_\d+)?", c) for c in d.class_peers)
        audit_only = oracle_pairs(own, workloads, policies, Mode.AUDIT) - desired_pairs(d)
        assert d.audit.pair_count == len(audit_only)


@settings(max_examples=200, deadline=None)
@given(inventories())
def test_classes_equal_the_pairwise_definition(inv: tuple[list[Workload],
                                                          list[EncryptionPolicy],
                                                          dict[str, NodeRecord]]) -> None:
    assert_compute_equals_the_definition(inv)


@st.composite
def unique_address_inventories(draw: st.DrawFn) -> tuple[list[Workload],
                                                        list[EncryptionPolicy],
                                                        dict[str, NodeRecord]]:
    """Inventories where no address is claimed twice: compute's planned index then
    counts unions on rows by slot (with a shared address it falls back to lookups)."""
    workloads, policies, nodes = draw(inventories())
    seen: set[str] = set()
    unique = []
    for w in workloads:
        if seen.isdisjoint(w.ips):
            seen.update(w.ips)
            unique.append(w)
    return unique, policies, nodes


@settings(max_examples=200, deadline=None)
@given(unique_address_inventories())
def test_counts_on_unique_addresses_equal_the_pairwise_definition(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]]) -> None:
    assert_compute_equals_the_definition(inv)


@settings(max_examples=150, deadline=None)
@given(st.one_of(inventories(), unique_address_inventories()))
def test_a_planned_index_selects_what_a_full_one_does_and_its_bitmaps_hold_it(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]]) -> None:
    workloads, policies, _ = inv
    rules = rules_of(policies, Mode.ENFORCE) + rules_of(policies, Mode.AUDIT)
    for own in NODES:
        local = [w for w in workloads if w.node == own]
        planned = RemoteIndex(own, workloads, keys=planned_keys([rules], local))
        full = classify(own, workloads, rules, RemoteIndex(own, workloads))
        assert classify(own, local, rules, planned) == full
        remote_ips = {ip for w in workloads if w.node != own for ip in w.ips}
        for name, key in full.selector_keys.items():
            bits = planned.bitmap(key)
            holds = planned.holds(bits)
            assert {ip for ip in remote_ips if holds(ip)} == full.selector_ips[name]
            assert bits.bit_count() == len(full.selector_ips[name])


@settings(max_examples=100, deadline=None)
@given(inventories())
def test_audit_policies_never_change_enforced_state(inv: tuple[list[Workload],
                                                               list[EncryptionPolicy],
                                                               dict[str, NodeRecord]]) -> None:
    workloads, policies, nodes = inv
    enforce_only = [p for p in policies if p.mode is Mode.ENFORCE]
    for own in NODES:
        with_audit = compute(snapshot(own, workloads, policies, nodes))
        without = compute(snapshot(own, workloads, enforce_only, nodes))
        assert enforced_part(with_audit) == enforced_part(without)


@settings(max_examples=100, deadline=None)
@given(inventories())
def test_same_node_is_never_selected(inv: tuple[list[Workload], list[EncryptionPolicy],
                                                dict[str, NodeRecord]]) -> None:
    workloads, policies, nodes = inv
    for own in NODES:
        d = compute(snapshot(own, workloads, policies, nodes))
        remote_ips = {ip for w in workloads if w.node != own for ip in w.ips}
        assert d.selected_remote_ips <= remote_ips


@settings(max_examples=100, deadline=None)
@given(inventories(), st.lists(rules, min_size=1, max_size=2))
def test_adding_a_policy_never_removes_a_pair(inv: tuple[list[Workload],
                                                         list[EncryptionPolicy],
                                                         dict[str, NodeRecord]],
                                              extra: list[Rule]) -> None:
    workloads, policies, nodes = inv
    added = [*policies, EncryptionPolicy("zz-extra", Mode.ENFORCE, tuple(extra))]
    for own in NODES:
        before = compute(snapshot(own, workloads, policies, nodes))
        after = compute(snapshot(own, workloads, added, nodes))
        assert desired_pairs(before) <= desired_pairs(after)


@settings(max_examples=100, deadline=None)
@given(inventories())
def test_allowed_ips_are_the_selected_ips_of_that_node(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]]) -> None:
    workloads, policies, nodes = inv
    for own in NODES:
        d = compute(snapshot(own, workloads, policies, nodes))
        owners = {ip: {w.node for w in workloads if ip in w.ips} for ip in IPS}
        assert {p.node for p in d.peers.values()} == set(nodes) - {own}
        for peer in d.peers.values():
            assert peer.allowed_ips == {host_cidr(y) for y in d.selected_remote_ips
                                        if owners[y] == {peer.node}}
        assert d.missing_peers == {n for y in d.selected_remote_ips for n in owners[y]
                                   if n != own and n not in nodes}


@settings(max_examples=100, deadline=None)
@given(inventories(), st.data())
def test_class_keys_do_not_move_with_remote_changes(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]],
        data: st.DataObject) -> None:
    workloads, policies, nodes = inv
    own = "n1"
    local = [w for w in workloads if w.node == own]
    remote = [dataclasses.replace(w, name=f"r{i}") for i, w in
              enumerate(data.draw(workload_sets(("n2", "n3"))))]
    before = compute(snapshot(own, workloads, policies, nodes))
    after = compute(snapshot(own, local + remote, policies, nodes))
    assert after.local_class == before.local_class


@settings(max_examples=100, deadline=None)
@given(inventories(), st.sampled_from(IPS), st.sampled_from(IPS))
def test_explain_agrees_with_the_definition(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]],
        x: str, y: str) -> None:
    workloads, policies, nodes = inv
    e = explain(snapshot("n1", workloads, policies, nodes), x, y)
    expected = any(is_selected_pairwise(a, x, b, y, policies)
                   for a in workloads if x in a.ips for b in workloads if y in b.ips)
    assert e.selected == expected
    assert all(v.reasons for v in e.verdicts if not v.matched)


@settings(max_examples=100, deadline=None)
@given(inventories(), policy_sets())
def test_plan_diff_equals_the_definition(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]],
        after: list[EncryptionPolicy]) -> None:
    workloads, before, nodes = inv

    def pairs(policies: list[EncryptionPolicy]) -> set[frozenset[str]]:
        return {frozenset((x, y)) for own in NODES
                for x, y in oracle_pairs(own, workloads, policies)}

    plan = diff_selection({p.name: p for p in before}, {p.name: p for p in after},
                          {w.key: w for w in workloads}, nodes)
    assert {frozenset(p) for p in plan.added} == pairs(after) - pairs(before)
    assert {frozenset(p) for p in plan.removed} == pairs(before) - pairs(after)


# --- sequences of snapshots (STYLE.md point 10) ---------------------------------------------

def W(name: str, node: str, ip: str, *tags: str) -> Workload:
    return Workload(name, node, (ip,), frozenset(Tag.parse(t) for t in tags))


PAYMENTS = EncryptionPolicy("payments", Mode.ENFORCE, (
    Rule(Endpoint(tags=frozenset({Tag("application", "pay")})), Endpoint(any=True), ("site",)),))
DB = EncryptionPolicy("db", Mode.ENFORCE, (
    Rule(Endpoint(tags=frozenset({Tag("tier", "db")})), Endpoint(subnet="10.0.0.0/24")),))
DRAFT = EncryptionPolicy("draft", Mode.AUDIT, (Rule(Endpoint(any=True), Endpoint(any=True)),))

STATES: dict[str, dict[str, object]] = {
    "empty": {},
    "one-pair": {"w:a": W("a", "n1", "10.0.0.1", "application=pay", "site=x"),
                 "w:b": W("b", "n2", "10.0.0.2", "site=x"), "p:payments": PAYMENTS,
                 "n:n2": record("n2")},
    "moved-tags": {"w:a": W("a", "n1", "10.0.0.1", "application=pay", "site=y"),
                   "w:b": W("b", "n2", "10.0.0.2", "site=y", "tier=db"),
                   "w:c": W("c", "n3", "10.0.0.3", "site=x"), "p:payments": PAYMENTS,
                   "p:db": DB, "p:draft": DRAFT, "n:n3": record("n3")},
    "conflict": {"w:a": W("a", "n1", "10.0.0.1", "tier=db"),
                 "w:b": W("b", "n2", "10.0.0.2"), "w:b2": W("b2", "n3", "10.0.0.2"),
                 "p:db": DB, "n:n2": record("n2"), "n:n3": record("n3")},
}
SEQUENCES = [
    ["one-pair", "moved-tags", "conflict"],
    ["conflict", "one-pair", "empty", "moved-tags"],
    ["moved-tags", "moved-tags", "one-pair"],
]


def snapshot_of(store: Mapping[str, object]) -> Snapshot:
    return Snapshot(
        "n1",
        {v.key: v for v in store.values() if isinstance(v, Workload)},
        {v.name: v for v in store.values() if isinstance(v, EncryptionPolicy)},
        {v.node: v for v in store.values() if isinstance(v, NodeRecord)},
        key_of(1))


def replay(sequence: Sequence[str]) -> list[Desired]:
    """Apply each state as the events a watch would deliver (deletes, then upserts)."""
    store: dict[str, object] = {}
    outputs = []
    for name in sequence:
        state = STATES[name]
        for gone in [k for k in store if k not in state]:
            del store[gone]
        for k, v in reversed(list(state.items())):
            if store.get(k) != v:
                store.pop(k, None)
                store[k] = v
        outputs.append(compute(snapshot_of(store)))
    return outputs


def expected(name: str) -> Desired:
    return compute(snapshot_of(STATES[name]))


def test_each_state_has_its_own_output() -> None:
    outputs = {name: expected(name) for name in STATES}
    assert len({repr(d) for d in outputs.values()}) == len(STATES)
    assert outputs["one-pair"].selected_pair_count == 1
    assert "ip 10.0.0.2 claimed by n2/b, n3/b2: given to no peer" in \
        outputs["conflict"].conflicts


def test_sequences_forward_reversed_with_empties_and_squashed() -> None:
    for sequence in SEQUENCES:
        variants = [sequence, sequence[::-1],
                    [s for name in sequence for s in ("empty", name)],
                    sequence[-1:]]
        for variant in variants:
            outputs = replay(variant)
            assert outputs == [expected(name) for name in variant], variant


# --- the incremental core equals compute after every step ------------------------------------

def one_workload() -> st.SearchStrategy[Workload]:
    return st.builds(lambda name, node, ips, tags: Workload(name, node, tuple(ips), tags),
                     st.sampled_from(("w0", "w1", "w2", "w3", "w4")), st.sampled_from(NODES),
                     st.sets(st.sampled_from(IPS), min_size=1, max_size=2), tag_sets())


steps = st.one_of(
    st.tuples(st.just("put"), one_workload()),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("record"), st.sampled_from(NODES), st.integers(0, 5)),
    st.tuples(st.just("policies"), policy_sets(max_size=2)),
)


@settings(max_examples=150, deadline=None)
@given(inventories(), st.sampled_from(NODES[:2]), st.lists(st.tuples(steps, st.booleans()),
                                                           max_size=10))
def test_incremental_core_equals_compute_after_every_change(
        inv: tuple[list[Workload], list[EncryptionPolicy], dict[str, NodeRecord]], own: str,
        sequence: list[tuple[tuple[object, ...], bool]]) -> None:
    workloads, policies, nodes = inv
    core = IncrementalCore(own)
    snap = snapshot(own, workloads, policies, nodes)
    assert core.update(snap) == compute(snap)
    for step, tell_keys in sequence:
        wmap, pmap, rmap = dict(snap.workloads), dict(snap.policies), dict(snap.nodes)
        changed: set[str] = set()
        match step:
            case ("put", Workload() as w):
                wmap[w.key] = w
                changed.add(w.key)
            case ("delete", int(i)) if wmap:
                gone = sorted(wmap)[i % len(wmap)]
                del wmap[gone]
                changed.add(gone)
            case ("record", str(node), 0):
                rmap.pop(node, None)
            case ("record", str(node), int(k)):
                rmap[node] = dataclasses.replace(record(node), wg_public_key=key_of(k))
            case ("policies", list(ps)):
                pmap = {p.name: p for p in ps}
        snap = Snapshot(own, wmap, pmap, rmap, snap.own_public_key)
        got = core.update(snap, changed if tell_keys else None)
        assert got == compute(snap), step


def test_audit_missing_peer_clears_when_its_last_workload_moves_to_us() -> None:
    """Found by hypothesis (tests/test_inventory.py): a local change re-examined only the
    nodes that still had workloads, so a node whose last workload left stayed reported."""
    app_a = Endpoint(tags=frozenset({Tag("application", "a")}))
    audit = {"p0": EncryptionPolicy("p0", Mode.AUDIT,
                                    (Rule(Endpoint(subnet="10.0.0.0/29"), app_a),))}
    local = Workload("w0", "n1", ("10.0.0.1",), frozenset())
    remote = Workload("w0", "n2", ("10.0.0.2",), frozenset({Tag("application", "a")}))
    core = IncrementalCore("n1")
    before = Snapshot("n1", {local.key: local, remote.key: remote}, audit, {}, key_of(1))
    assert core.update(before).audit.missing_peers == {"n2"}
    taken = Workload("w0", "n1", ("10.0.0.2",), frozenset())
    after = Snapshot("n1", {taken.key: taken}, audit, {}, key_of(1))
    got = core.update(after, {local.key, remote.key})
    assert got == compute(after)
    assert got.audit.missing_peers == frozenset()


def test_incremental_core_applies_a_workload_change_without_rebuilding() -> None:
    core = IncrementalCore("n1")
    store = dict(STATES["moved-tags"])
    core.update(snapshot_of(store))
    store["w:b"] = W("b", "n2", "10.0.0.2", "site=y")
    store["w:d"] = W("d", "n1", "10.0.0.4", "application=pay", "site=x")
    snap = snapshot_of(store)
    assert core.update(snap, {"workloads/n2/b", "workloads/n1/d"}) == compute(snap)
    assert core.rebuilds == 1
