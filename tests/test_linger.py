"""Lingering (tfcrypt/core/linger.py): a deleted workload stays selected for a grace
period, unless its address is reused; what an operator sees is checked with compute():
the peer keeps the address among its allowed IPs, and a reused address goes to the node
of its new owner, not to nobody."""

from __future__ import annotations

import base64
from collections.abc import Iterator, Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfcrypt.core.compute import Snapshot, compute
from tfcrypt.core.linger import EndReason, Lingering, LingerResult, linger
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.tags import Tag, parse_tags
from tfcrypt.model.workload import Workload

GRACE = 30.0
PAYMENTS = EncryptionPolicy("payments", Mode.ENFORCE, (Rule(
    Endpoint(tags=frozenset(parse_tags(["application=payments"]))), Endpoint(any=True)),))


def wl(name: str, node: str, ip: str, app: str = "payments") -> Workload:
    return Workload(name, node, (ip,), frozenset({Tag("application", app)}))


def inv(*workloads: Workload) -> dict[str, Workload]:
    return {w.key: w for w in workloads}


def record(node: str) -> NodeRecord:
    n = int(node[1:])
    return NodeRecord(node, f"spiffe://lab.tfcrypt/tfcrypt/node/{node}",
                      base64.b64encode(bytes([n]) * 32).decode(), f"192.0.2.{n}:51820", (), 1, 1)


def allowed(own: str, workloads: Mapping[str, Workload]) -> dict[str, set[str]]:
    """Each peer's allowed IPs as `own`'s agent would configure them."""
    nodes = {n: record(n) for n in ("n1", "n2", "n3")}
    desired = compute(Snapshot(own, workloads, {"payments": PAYMENTS}, nodes,
                               nodes[own].wg_public_key))
    return {p.node: {c.split("/")[0] for c in p.allowed_ips} for p in desired.peers.values()}


A = wl("a", "n1", "10.0.0.1")
B = wl("b", "n2", "10.0.0.2", "web")
START = inv(A, B)


def delete_a(now: float = 100.0, grace: float = GRACE) -> LingerResult:
    return linger(START, inv(B), {}, now, grace, changed={A.key})


def test_a_deleted_workload_keeps_its_value_and_the_peer_keeps_its_address() -> None:
    r = delete_a()
    assert r.effective == START
    assert r.lingering == {A.key: Lingering(A, 100.0, 130.0)}
    assert r.started == (A.key,) and r.changed == {A.key}
    assert r.next_expiry == 130.0
    # both ends keep the pair selected: n2 still routes 10.0.0.1 into the tunnel to n1
    assert allowed("n2", r.effective)["n1"] == {"10.0.0.1"}
    assert allowed("n2", inv(B))["n1"] == set()  # what happened before lingering


def test_the_entry_lasts_until_the_grace_period_ends_then_the_address_is_released() -> None:
    r = delete_a()
    still = linger(r.effective, inv(B), r.lingering, 129.9, GRACE, changed=set())
    assert still.effective == START and still.changed == frozenset() and not still.ended
    gone = linger(still.effective, inv(B), still.lingering, 130.0, GRACE, changed=set())
    assert gone.effective == inv(B) and gone.lingering == {}
    assert [(e.key, e.reason) for e in gone.ended] == [(A.key, EndReason.EXPIRED)]
    assert gone.changed == {A.key} and gone.next_expiry is None
    assert allowed("n2", gone.effective)["n1"] == set()


@pytest.mark.parametrize("claimant", [
    wl("new", "n3", "10.0.0.1", "shop"),      # address reused on another node
    wl("a", "n3", "10.0.0.1"),                # the same workload moved to another node
    wl("a2", "n1", "10.0.0.1"),               # recreated under another key
], ids=["reused", "moved", "renamed"])
def test_an_entry_ends_at_once_when_a_live_workload_claims_its_address(
        claimant: Workload) -> None:
    r = delete_a()
    after = linger(r.effective, inv(B, claimant), r.lingering, 101.0, GRACE,
                   changed={claimant.key})
    assert after.lingering == {} and after.effective == inv(B, claimant)
    assert [(e.key, e.reason, e.by, e.ip) for e in after.ended] == [
        (A.key, EndReason.REUSED, claimant.key, "10.0.0.1")]
    assert A.key in after.changed
    # the address belongs to its new owner's node alone: not claimed twice, so not
    # black-holed (compute gives a twice-claimed address on two nodes to no peer)
    peers = allowed("n2", after.effective)
    selected = claimant.tags == A.tags
    assert peers[claimant.node] == ({"10.0.0.1"} if selected else set())


def test_a_deletion_and_a_new_claimant_in_one_batch_do_not_linger() -> None:
    moved = wl("a", "n3", "10.0.0.1")
    r = linger(START, inv(B, moved), {}, 100.0, GRACE, changed={A.key, moved.key})
    assert r.lingering == {} and r.effective == inv(B, moved) and r.started == ()
    assert [(e.key, e.reason) for e in r.ended] == [(A.key, EndReason.REUSED)]


def test_a_claimant_older_than_the_deletion_is_found_though_it_did_not_change() -> None:
    twin = wl("twin", "n3", "10.0.0.1", "shop")  # claimed the address before A went
    before = inv(A, B, twin)
    r = linger(before, inv(B, twin), {}, 100.0, GRACE, changed={A.key})
    assert r.lingering == {} and r.effective == inv(B, twin)
    assert r.ended[0].by == twin.key


def test_a_key_that_comes_back_replaces_its_entry() -> None:
    r = delete_a()
    back = wl("a", "n1", "10.0.0.1", "shop")
    after = linger(r.effective, inv(back, B), r.lingering, 105.0, GRACE, changed={A.key})
    assert after.effective == inv(back, B) and after.lingering == {}
    assert [(e.key, e.reason) for e in after.ended] == [(A.key, EndReason.BACK)]


def test_a_lingering_key_deleted_again_is_not_restarted() -> None:
    r = delete_a()
    again = linger(r.effective, inv(B), r.lingering, 110.0, GRACE, changed={A.key})
    assert again.lingering == r.lingering and again.started == () and not again.ended


def test_grace_zero_disables_lingering() -> None:
    current = inv(B)
    r = linger(START, current, {}, 100.0, 0.0, changed={A.key})
    assert r.effective is current and r.lingering == {} and r.changed == frozenset()
    assert r.next_expiry is None


def test_unknown_changes_find_the_deleted_keys_by_comparison() -> None:
    r = linger(START, inv(B), {}, 100.0, GRACE, changed=None)
    assert r.started == (A.key,) and r.effective == START


class NoFullPass(dict[str, Workload]):
    """A mapping that fails the test if anything iterates over all of it."""

    def _refuse(self, *_: object) -> Iterator[object]:
        raise AssertionError("iterated over every workload")

    __iter__ = keys = values = items = _refuse  # type: ignore[assignment]


class NoScan(dict[str, Workload]):
    """A mapping that may be copied (the one copy lingering needs) but not scanned."""

    def _refuse(self, *_: object) -> Iterator[object]:
        raise AssertionError("scanned every workload")

    values = items = _refuse  # type: ignore[assignment]


def test_at_100000_workloads_no_entries_means_no_copy_and_no_full_pass() -> None:
    w = wl("w", "n2", "10.9.0.1", "web")
    live = {f"workloads/n2/w{i}": w for i in range(100_000)}
    current = NoFullPass(live)
    r = linger(live, current, {}, 100.0, GRACE, changed={"workloads/n2/w7"})
    assert r.effective is current  # passed through, not copied
    assert r.lingering == {} and r.changed == frozenset()


def test_at_100000_workloads_entries_copy_once_and_later_reconciles_look_at_changes() -> None:
    w = wl("w", "n2", "10.9.0.1", "web")
    live = {f"workloads/n2/w{i}": w for i in range(100_000)}
    previous = {**live, A.key: A}
    r = linger(previous, live, {}, 100.0, GRACE, changed={A.key})
    assert len(r.effective) == 100_001 and r.effective[A.key] == A
    assert r.effective is not live and live.get(A.key) is None  # input left alone
    guarded = NoScan(live)
    nxt = linger(r.effective, guarded, r.lingering, 101.0, GRACE,
                 changed={"workloads/n2/w7"})
    assert nxt.lingering == r.lingering


# -- property: random inventories over time ----------------------------------------------

IPS = ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4")
NAMES = ("a", "b", "c", "d")


@st.composite
def inventories(draw: st.DrawFn) -> dict[str, Workload]:
    out = {}
    for name in draw(st.sets(st.sampled_from(NAMES))):
        w = Workload(name, draw(st.sampled_from(("n1", "n2"))),
                     tuple(draw(st.sets(st.sampled_from(IPS), min_size=1, max_size=2))),
                     frozenset({Tag("application", draw(st.sampled_from(("x", "y"))))}))
        out[w.key] = w
    return out


def changed_keys(a: Mapping[str, Workload], b: Mapping[str, Workload]) -> set[str]:
    return {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(st.tuples(inventories(), st.floats(0, 20)), min_size=1, max_size=8),
       grace=st.sampled_from((0.0, 5.0, 30.0)))
def test_lingering_rules_hold_on_random_sequences(
        steps: list[tuple[dict[str, Workload], float]], grace: float) -> None:
    effective: Mapping[str, Workload] = {}
    live: Mapping[str, Workload] = {}
    entries: Mapping[str, Lingering] = {}
    now = 0.0
    for current, dt in steps:
        now += dt
        told = linger(effective, current, entries, now, grace, changed_keys(live, current))
        found = linger(effective, current, entries, now, grace, None)
        # naming the changed keys is an optimisation, never a different answer
        assert (told.effective, told.lingering, told.changed) == (
            found.effective, found.lingering, found.changed)
        r = told
        # live workloads are always there with their live value
        assert all(r.effective[k] == w for k, w in current.items())
        live_ips = {ip for w in current.values() for ip in w.ips}
        for key, entry in r.lingering.items():
            assert key not in current and r.effective[key] == entry.workload
            assert not live_ips & set(entry.workload.ips), "an address claimed twice"
            assert entry.since <= now < entry.until == entry.since + grace
        # nothing is released early: a vanished key whose addresses no one claims lingers
        for key, w in effective.items():
            if key in current or live_ips & set(w.ips) or grace == 0:
                continue
            old = entries.get(key)
            if old is None or now < old.until:
                assert key in r.lingering
        # IncrementalCore hears of every key whose effective value moved
        moved = changed_keys(effective, r.effective) - changed_keys(live, current)
        assert moved <= r.changed
        assert r.next_expiry == min((e.until for e in r.lingering.values()), default=None)
        effective, live, entries = r.effective, current, r.lingering
