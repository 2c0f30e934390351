"""nftables reconciler: against FakeNft, then the real `nft` in fresh network namespaces.

The fake tier proves the transaction logic (idempotence, element-level changes, class
lifecycle order, adoption, drift, rebuild, failure kept pending). The lab tier proves that
the kernel accepts the same transactions, lists what the fake predicted, and that on the
wire a marked packet with no tunnel is dropped by the guard and a plaintext packet of a
selected pair is dropped at ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tfcrypt.dataplane.nft_desired import desired_table
from tfcrypt.dataplane.nft_json import FakeNft, NftError, SubprocessNft
from tfcrypt.dataplane.nft_listing import parse_listing
from tfcrypt.dataplane.nft_table import NftDesired
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.errors import ConfigError

MARK = 0x00100000
BASE = {"prerouting", "pre_v4", "pre_v6", "egress_guard", "selected"}
MAPS = {"out_v4", "out_v6", "in_v4", "in_v6"}
INFRA = {"infra_v4", "infra_v6"}


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def desired(local: dict[str, str] | None = None, peers: dict[str, set[str]] | None = None,
            **kw: Any) -> NftDesired:
    local = {"10.1.0.1": "ca", "10.1.0.2": "cb", "fd00:1::1": "ca"} if local is None else local
    if peers is None:
        peers = {"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1"}, "cb": {"10.3.0.1"}}
    # one selector per class, named like it: set names stay `<class>_v4`
    return NftDesired(local, {k: frozenset({k}) for k in peers},
                      {k: frozenset(v) for k, v in peers.items()}, mark=MARK, **kw)


def applied(d: NftDesired) -> tuple[FakeNft, NftManager]:
    fake = FakeNft()
    manager = NftManager(fake)
    manager.set_desired(d)
    assert run(manager.apply()).ok
    return fake, manager


def reapply(manager: NftManager, d: NftDesired, full: bool = False) -> list[dict[str, Any]]:
    manager.set_desired(d)
    report = run(manager.apply(full=full))
    assert report.ok, report.errors
    assert report.ops == len(manager.last_transaction)
    return manager.last_transaction


def what(cmd: dict[str, Any]) -> tuple[str, str, str]:
    ((verb, body),) = cmd.items()
    ((kind, obj),) = body.items()
    return verb, kind, obj.get("name") or obj.get("chain") or ""


def names(listing: dict[str, Any], kind: str) -> set[str]:
    return {e[kind]["name"] for e in listing["nftables"] if kind in e}


# --- against the fake ----------------------------------------------------------------


def test_first_apply_builds_the_table_and_a_second_apply_sends_nothing() -> None:
    fake, manager = applied(desired())
    before = fake.listing()

    assert run(manager.apply()).ops == 0
    assert manager.last_transaction == []
    assert len(fake.transactions) == 1
    assert fake.listing() == before
    assert names(before, "set") == {"ca_v4", "ca_v6", "cb_v4", "cb_v6"} | INFRA
    assert names(before, "map") == MAPS
    assert names(before, "chain") == BASE | {"out_ca", "in_ca", "out_cb", "in_cb"}
    assert names(before, "counter") == {"guard_drops", "ingress_drops", "ingress_audit",
                                        "spoof_drops"}
    assert parse_listing(before).items() == desired_table(desired()).items()
    assert manager.pending == frozenset()


def test_one_remote_ip_change_is_exactly_one_element_command() -> None:
    _, manager = applied(desired())

    added = reapply(manager, desired(peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1",
                                                   "fd00:2::9"}, "cb": {"10.3.0.1"}}))
    removed = reapply(manager, desired(peers={"ca": {"10.2.0.1", "fd00:2::1", "fd00:2::9"},
                                              "cb": {"10.3.0.1"}}))

    assert added == [{"add": {"element": {"family": "inet", "table": "tfcrypt",
                                          "name": "ca_v6", "elem": ["fd00:2::9"]}}}]
    assert removed == [{"delete": {"element": {"family": "inet", "table": "tfcrypt",
                                               "name": "ca_v4", "elem": ["10.2.0.2"]}}}]


def test_local_ip_moving_class_replaces_its_map_elements_only() -> None:
    fake, manager = applied(desired())
    handles = {n: h for n, h in parse_listing(fake.listing()).handles.items() if n[0] == "set"}

    moved = reapply(manager, desired(local={"10.1.0.1": "cb", "10.1.0.2": "cb",
                                            "fd00:1::1": "ca"}))

    assert [what(c) for c in moved] == [
        ("delete", "element", "in_v4"), ("delete", "element", "out_v4"),
        ("add", "element", "in_v4"), ("add", "element", "out_v4"),
    ]
    assert moved[-1]["add"]["element"]["elem"] == [["10.1.0.1", {"jump": {"target": "out_cb"}}]]
    after = parse_listing(fake.listing())
    assert after.elements["out_v4"]["10.1.0.1"] == "out_cb"
    assert {n: h for n, h in after.handles.items() if n[0] == "set"} == handles


def test_new_class_objects_exist_before_the_jump_and_go_after_it() -> None:
    fake, manager = applied(desired())

    added = [what(c) for c in reapply(manager, desired(
        local={"10.1.0.1": "ca", "10.1.0.2": "cb", "fd00:1::1": "ca", "10.1.0.3": "cc"},
        peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1"}, "cb": {"10.3.0.1"},
               "cc": {"10.4.0.1"}}))]
    removed = [what(c) for c in reapply(manager, desired())]

    jump = added.index(("add", "element", "out_v4"))
    for obj in [("add", "set", "cc_v4"), ("add", "set", "cc_v6"), ("add", "chain", "out_cc"),
                ("add", "chain", "in_cc"), ("add", "element", "cc_v4"), ("add", "rule", "out_cc")]:
        assert added.index(obj) < jump
    assert removed.index(("delete", "element", "out_v4")) < removed.index(
        ("delete", "chain", "out_cc")) < removed.index(("delete", "set", "cc_v4"))
    assert all(name in ("out_v4", "in_v4", "out_cc", "in_cc", "cc_v4", "cc_v6")
               for _, _, name in removed)
    assert fake.listing() == applied(desired())[0].listing()


def test_class_removed_entirely_and_empty_desired_keeps_base_chains_and_guard() -> None:
    fake, manager = applied(desired())

    reapply(manager, desired(local={}, peers={}))
    state = parse_listing(fake.listing())

    assert set(state.chains) == BASE
    assert set(state.sets) == MAPS | INFRA
    assert all(not members for members in state.elements.values())
    assert {c for c, _ in state.rules} == BASE
    assert state.chains["egress_guard"] is not None
    assert state.chains["egress_guard"].hook == "postrouting"
    assert run(manager.apply()).ops == 0


def test_table_left_by_a_previous_run_is_adopted_and_only_the_difference_applied() -> None:
    fake, _ = applied(desired())
    restarted = NftManager(fake)

    assert run(restarted.apply()).ops == 0
    assert len(fake.transactions) == 1
    restarted.set_desired(desired())
    assert run(restarted.apply()).ops == 0
    changed = reapply(restarted, desired(peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1"},
                                                "cb": set()}))
    assert [what(c) for c in changed] == [("delete", "element", "cb_v4")]


def test_drift_is_repaired_with_the_smallest_transaction() -> None:
    fake, manager = applied(desired())
    table = fake.table
    assert table is not None
    del table["sets"]["ca_v4"]["elem"]["10.2.0.1"]
    guard = next(r for r in table["rules"] if r["chain"] == "egress_guard")
    table["rules"].remove(guard)
    table["rules"].append({"chain": "prerouting", "handle": 999, "expr": [{"accept": None}]})

    assert reapply(manager, desired()) == []
    repair = [what(c) for c in reapply(manager, desired(), full=True)]

    assert sorted(repair) == [("add", "element", "ca_v4"), ("add", "rule", "egress_guard"),
                              ("delete", "rule", "prerouting")]
    assert parse_listing(fake.listing()).items() == desired_table(desired()).items()
    assert parse_listing(fake.listing()).stray_rules == []


def test_damaged_table_is_rebuilt_in_one_transaction() -> None:
    fake, manager = applied(desired())
    assert fake.table is not None
    fake.table["chains"]["egress_guard"]["hook"] = "forward"

    commands = reapply(manager, desired(), full=True)

    assert [what(c)[:2] for c in commands[:2]] == [("delete", "table"), ("add", "table")]
    assert parse_listing(fake.listing()).chains["egress_guard"].hook == "postrouting"
    assert run(manager.apply()).ops == 0


def test_dormant_table_is_rebuilt_active() -> None:
    fake, manager = applied(desired())
    assert fake.table is not None
    fake.table["flags"] = "dormant"

    commands = reapply(manager, desired(), full=True)

    assert [what(c)[:2] for c in commands[:2]] == [("delete", "table"), ("add", "table")]
    assert "flags" not in fake.listing()["nftables"][1]["table"]


def test_failed_transaction_changes_nothing_stays_pending_and_is_retried() -> None:
    fake, manager = applied(desired())
    before = fake.listing()
    fake.fail_next = "Error: Could not process rule: No buffer space available"

    manager.set_desired(desired(peers={"ca": {"10.2.0.1"}, "cb": {"10.3.0.1", "10.3.0.2"}}))
    failed = run(manager.apply())

    assert failed.ops == 0
    assert [(e.key, e.message) for e in failed.errors] == [
        ("table inet tfcrypt", "Error: Could not process rule: No buffer space available")]
    assert fake.listing() == before
    assert ("element", "cb_v4", "10.3.0.2") in manager.pending
    assert ("element", "ca_v4", "10.2.0.2") in manager.pending
    retried = run(manager.apply())
    assert retried.ok and retried.ops == 3
    assert manager.pending == frozenset()


def test_an_invalid_transaction_is_refused_whole_by_the_fake() -> None:
    fake, _ = applied(desired())
    before = fake.listing()
    bad = [{"add": {"element": {"family": "inet", "table": "tfcrypt", "name": "ca_v4",
                                "elem": ["10.9.9.9"]}}},
           {"add": {"element": {"family": "inet", "table": "tfcrypt", "name": "out_v4",
                                "elem": [["10.1.0.1", {"jump": {"target": "out_cb"}}]]}}}]
    with pytest.raises(NftError, match="File exists"):
        run(fake.run(bad))
    assert fake.listing() == before


def test_audit_mode_swaps_rules_without_touching_sets() -> None:
    fake, manager = applied(desired())

    commands = [what(c) for c in reapply(manager, desired(enforce=False))]
    text = json.dumps(fake.listing())

    assert {(v, k) for v, k, _ in commands} == {("add", "rule"), ("delete", "rule")}
    # the class rules return instead of going to `selected`, which loses its rules
    assert {n for _, _, n in commands} == {"out_ca", "in_ca", "out_cb", "in_cb", "selected"}
    # no mark is set (the tunnel's MSS clamp, a mangle of the TCP option, stays)
    assert '"mangle": {"key": {"meta"' not in text and '"fib"' not in text
    assert '"mangle": {"key": {"tcp option"' in text
    assert text.count('"drop"') == 1
    assert '"ingress_audit"' in text


def test_wider_mask_clears_our_other_bits_when_marking() -> None:
    fake, _ = applied(desired(mask=0x00300000))
    rule = [r for r in fake.table["rules"] if r["chain"] == "selected"][-1]  # type: ignore[index]
    guard = next(r for r in fake.table["rules"] if r["chain"] == "egress_guard")  # type: ignore[index]

    assert rule["expr"][-1]["mangle"]["value"] == {
        "|": [{"&": [{"meta": {"key": "mark"}}, 0xFFCFFFFF]}, MARK]}
    assert guard["expr"][0]["match"]["left"] == {"&": [{"meta": {"key": "mark"}}, 0x00300000]}


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"local": {"10.1.0.300": "ca"}}, "address"),
        ({"peers": {"ca": {"10.2.0.0/24"}}}, "address"),
        ({"local": {"10.1.0.1": "out"}}, "class key"),
        ({"peers": {"bad-key": set()}}, "class key"),
        ({"mask": 0x1}, "outside mask"),
        ({"wg_ifname": "a-very-long-ifname"}, "wg_ifname"),
    ],
)
def test_input_that_cannot_become_nft_names_is_refused(kw: dict[str, Any], message: str) -> None:
    manager = NftManager(FakeNft())
    with pytest.raises(ConfigError, match=message):
        manager.set_desired(desired(**kw))
    assert manager.desired is None


def test_nothing_is_touched_before_desired_state_and_remove_deletes_the_table() -> None:
    fake, _ = applied(desired())
    before = fake.listing()
    fresh = NftManager(fake)

    assert run(fresh.apply()).ops == 0 and fake.listing() == before
    assert run(fresh.remove()).ops == 1
    assert fake.table is None
    assert run(fresh.remove()).ops == 0
    assert run(fresh.apply()).ops == 0 and fake.table is None


def test_counters_and_repr() -> None:
    fake, manager = applied(desired())
    fake.bump("guard_drops", 3, 252)

    counters = run(manager.counters())

    assert counters["guard_drops"] == (3, 252)
    assert counters["ingress_drops"] == (0, 0)
    assert counters["out:ca"] == (0, 0)
    assert repr(manager) == "NftManager(nft=FakeNft(table=present), classes=2, pending=0)"


class CountingNft(FakeNft):
    """FakeNft that counts listings; `during_run` is called inside the next transaction."""

    def __init__(self) -> None:
        super().__init__()
        self.lists = 0
        self.during_run: Callable[[], None] | None = None

    async def list_table(self) -> dict[str, Any] | None:
        self.lists += 1
        return await super().list_table()

    async def run(self, commands: list[dict[str, Any]]) -> None:
        if self.during_run is not None:
            hook, self.during_run = self.during_run, None
            await asyncio.sleep(0)
            hook()
        await super().run(commands)


def counted(d: NftDesired) -> tuple[CountingNft, NftManager]:
    fake = CountingNft()
    manager = NftManager(fake)
    manager.set_desired(d)
    assert run(manager.apply()).ok and manager.last_full
    return fake, manager


def test_incremental_apply_sends_the_changed_element_without_listing() -> None:
    fake, manager = counted(desired())
    assert fake.lists == 1

    assert run(manager.apply()).ops == 0 and not manager.last_full
    assert run(manager.apply(full=True)).ops == 0 and manager.last_full
    assert fake.lists == 2
    one = reapply(manager, desired(peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1",
                                                 "10.2.0.3"}, "cb": {"10.3.0.1"}}))

    assert one == [{"add": {"element": {"family": "inet", "table": "tfcrypt",
                                        "name": "ca_v4", "elem": ["10.2.0.3"]}}}]
    assert fake.lists == 2 and not manager.last_full
    assert run(manager.apply()).ops == 0 and run(manager.apply(full=True)).ops == 0


def test_a_failed_transaction_makes_the_next_apply_list_again() -> None:
    fake, manager = counted(desired())
    fake.fail_next = "Error: Could not process rule: No buffer space available"
    manager.set_desired(desired(peers={"ca": {"10.2.0.1"}, "cb": {"10.3.0.1"}}))

    assert not run(manager.apply()).ok and fake.lists == 1
    fake.table["sets"]["cb_v4"]["elem"].clear()  # type: ignore[index]
    assert run(manager.apply()).ok

    assert manager.last_full and fake.lists == 2
    assert sorted(what(c) for c in manager.last_transaction) == [
        ("add", "element", "cb_v4"), ("delete", "element", "ca_v4"),
        ("delete", "element", "ca_v6")]
    assert parse_listing(fake.listing()).items() == desired_table(
        desired(peers={"ca": {"10.2.0.1"}, "cb": {"10.3.0.1"}})).items()


def test_replacing_a_rule_created_since_the_last_listing_lists_first() -> None:
    fake, manager = counted(desired())

    audit = [what(c) for c in reapply(manager, desired(enforce=False))]

    assert fake.lists == 2 and manager.last_full
    assert {(v, k) for v, k, _ in audit} == {("add", "rule"), ("delete", "rule")}
    assert reapply(manager, desired(enforce=False)) == [] and fake.lists == 2


def test_an_address_spelled_two_ways_stays_while_one_spelling_remains() -> None:
    _, manager = counted(desired(peers={"ca": {"fd00:2::9", "fd00:2:0::9"}}))

    assert reapply(manager, desired(peers={"ca": {"fd00:2:0::9"}})) == []
    assert reapply(manager, desired(peers={"ca": {"fd00:2:0::9", "10.2.0.1"}})) == [
        {"add": {"element": {"family": "inet", "table": "tfcrypt", "name": "ca_v4",
                             "elem": ["10.2.0.1"]}}}]
    assert [what(c) for c in reapply(manager, desired(peers={"ca": {"10.2.0.1"}}))] == [
        ("delete", "element", "ca_v6")]
    assert run(manager.apply(full=True)).ops == 0


def test_refused_desired_state_keeps_the_previous_one() -> None:
    _, manager = counted(desired())
    before = manager.desired

    with pytest.raises(ConfigError, match="address"):
        manager.set_desired(desired(peers={"ca": {"10.2.0.1", "10.2.0.300"}, "cb": set()}))

    assert manager.desired is before
    assert run(manager.apply()).ops == 0 and manager.pending == frozenset()


def test_intent_recorded_during_a_transaction_is_applied_by_the_next_apply() -> None:
    fake, manager = counted(desired())
    later = desired(peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1"}, "cb": {"10.3.0.9"}})
    fake.during_run = lambda: manager.set_desired(later)
    manager.set_desired(desired(peers={"ca": {"10.2.0.1"}, "cb": {"10.3.0.1"}}))

    assert run(manager.apply()).ok
    assert ("element", "cb_v4", "10.3.0.9") in manager.pending
    run(manager.apply())

    assert parse_listing(fake.listing()).items() == desired_table(later).items()
    assert fake.lists == 1 and run(manager.apply(full=True)).ops == 0


def _random_desired(rng: random.Random) -> NftDesired:
    keys = rng.sample(["ca", "cb", "cc", "cd"], rng.randint(0, 4))
    local = {f"10.1.0.{i}": rng.choice(keys) for i in range(1, 4)} if keys else {}
    if keys and rng.random() < 0.5:
        local["fd00:1::1"] = rng.choice(keys)
    pool = [f"10.2.0.{i}" for i in range(1, 7)] + [f"fd00:2::{i}" for i in range(1, 4)]
    peers = {k: set(rng.sample(pool, rng.randint(0, 4))) for k in keys if rng.random() < 0.8}
    return desired(local=local, peers=peers, enforce=rng.random() < 0.8)


def test_incremental_applies_track_the_kernel_through_random_changes() -> None:
    rng = random.Random(1820)
    fake, manager = counted(desired())
    for step in range(80):
        d = _random_desired(rng)
        manager.set_desired(d)
        assert run(manager.apply()).ok
        assert parse_listing(fake.listing()).items() == desired_table(d).items()
        assert manager.pending == frozenset()
        if step % 4 == 3:
            assert run(manager.apply(full=True)).ops == 0, manager.last_transaction


# --- real nft in network namespaces --------------------------------------------------


def sh(*argv: str, stdin: str | None = None,
       check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """`netns(suffix)` -> a fresh namespace named with this run's random prefix."""
    prefix = "h" + secrets.token_hex(3)
    made: list[str] = []

    def make(suffix: str) -> str:
        name = prefix + suffix
        sh("ip", "netns", "add", name)
        made.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    try:
        yield make
    finally:
        for name in made:
            with contextlib.suppress(AssertionError):
                sh("ip", "netns", "del", name)


def nft_text(ns: str) -> str:
    return sh("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "tfcrypt").stdout


@pytest.mark.lab
def test_real_nft_accepts_what_the_fake_predicts_and_changes_elements_in_place(
    netns: Callable[[str], str],
) -> None:
    ns = netns("n")
    fake_nft = FakeNft()
    real, fake = NftManager(SubprocessNft(ns)), NftManager(fake_nft)
    for manager in (real, fake):
        manager.set_desired(desired(mask=0x00300000))

    first = run(real.apply())
    assert first.ok, first.errors
    assert first.ops == run(fake.apply()).ops
    listing = run(SubprocessNft(ns).list_table())
    assert parse_listing(listing).items() == desired_table(desired(mask=0x00300000)).items()
    assert real.last_transaction == fake.last_transaction
    text = nft_text(ns)
    assert "hook postrouting priority filter" in text
    assert "hook prerouting priority mangle" in text

    assert run(real.apply()).ops == 0 and real.last_transaction == []
    assert nft_text(ns) == text

    handle = parse_listing(listing).handles[("set", "ca_v4")]
    change = desired(mask=0x00300000, peers={"ca": {"10.2.0.1", "10.2.0.7", "fd00:2::1"},
                                             "cb": {"10.3.0.1"}})
    for manager in (real, fake):
        manager.set_desired(change)
    assert run(real.apply()).ops == 2
    assert run(fake.apply()).ops == 2
    after = parse_listing(run(SubprocessNft(ns).list_table()))
    assert after.handles[("set", "ca_v4")] == handle
    assert set(after.elements["ca_v4"]) == {"10.2.0.1", "10.2.0.7"}
    assert after.items() == parse_listing(fake_nft.listing()).items()

    with pytest.raises(NftError, match="No such file or directory"):
        run(SubprocessNft(ns).run([{"add": {"element": {"family": "inet", "table": "tfcrypt",
                                             "name": "nope_v4", "elem": ["10.0.0.1"]}}}]))
    assert nft_text(ns) != text and run(real.apply()).ops == 0

    sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "tfcrypt", "{ flags dormant; }")
    assert "dormant" in nft_text(ns)
    assert run(real.apply()).ops == 0 and "dormant" in nft_text(ns)
    assert run(real.apply(full=True)).ok
    assert "dormant" not in nft_text(ns) and "egress_guard" in nft_text(ns)
    assert run(real.apply()).ops == 0
    assert run(real.remove()).ops == 1
    assert run(SubprocessNft(ns).list_table()) is None


@pytest.mark.lab
def test_real_nft_hand_drift_is_left_by_incremental_and_repaired_by_full_apply(
    netns: Callable[[str], str],
) -> None:
    ns = netns("d")
    manager = NftManager(SubprocessNft(ns))
    manager.set_desired(desired())
    assert run(manager.apply()).ok
    text = nft_text(ns)
    sh("ip", "netns", "exec", ns, "nft", "delete", "element", "inet", "tfcrypt", "ca_v4",
       "{ 10.2.0.1 }")
    sh("ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "tfcrypt", "prerouting",
       "accept")

    changed = reapply(manager, desired(peers={"ca": {"10.2.0.1", "10.2.0.2", "fd00:2::1"},
                                              "cb": {"10.3.0.1", "10.3.0.2"}}))

    assert [what(c) for c in changed] == [("add", "element", "cb_v4")]
    drifted = parse_listing(run(SubprocessNft(ns).list_table()))
    assert "10.2.0.1" not in drifted.elements["ca_v4"] and drifted.stray_rules
    repair = [what(c) for c in reapply(manager, desired(), full=True)]
    assert sorted(repair) == [("add", "element", "ca_v4"), ("delete", "element", "cb_v4"),
                              ("delete", "rule", "prerouting")]
    assert nft_text(ns) == text
    assert run(manager.apply()).ops == 0 and run(manager.apply(full=True)).ops == 0


PROBE = """table inet probe {
    chain seen {
        type filter hook prerouting priority raw;
        ip saddr 10.77.1.2 ip daddr 10.77.2.2 counter comment "selected"
        ip saddr 10.77.1.2 ip daddr 10.77.2.3 counter comment "unselected"
    }
}
"""
"""B's own count of what arrives from W, read before any filtering in B."""


def link(a: str, a_if: str, a_ip: str, b: str, b_if: str, b_ip: str) -> None:
    sh("ip", "-n", a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)
    for ns, ifname, ip in ((a, a_if, a_ip), (b, b_if, b_ip)):
        sh("ip", "-n", ns, "addr", "add", ip, "dev", ifname)
        sh("ip", "-n", ns, "link", "set", ifname, "up")


def w_a_b(netns: Callable[[str], str]) -> tuple[str, str, str]:
    """W (a workload, 10.77.1.2) routed by A (the node, forwarding) to B (two remote
    addresses, 10.77.2.2 and 10.77.2.3): the namespaces of the guard and infra tests."""
    w, a, b = netns("w"), netns("a"), netns("b")
    prefix = w[:-1]
    link(w, prefix + "wa", "10.77.1.2/24", a, prefix + "aw", "10.77.1.1/24")
    link(a, prefix + "ab", "10.77.2.1/24", b, prefix + "ba", "10.77.2.2/24")
    sh("ip", "-n", b, "addr", "add", "10.77.2.3/24", "dev", prefix + "ba")
    sh("ip", "-n", w, "route", "add", "default", "via", "10.77.1.1")
    sh("ip", "-n", b, "route", "add", "10.77.1.0/24", "via", "10.77.2.1")
    sh("ip", "netns", "exec", a, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return w, a, b


def ping(ns: str, dst: str, src: str | None = None) -> bool:
    extra = ["-I", src] if src else []
    return sh("ip", "netns", "exec", ns, "ping", "-n", "-c1", "-W1", *extra, dst,
              check=False).returncode == 0


@pytest.mark.lab
def test_guard_drops_marked_packets_without_tunnel_and_ingress_drops_plaintext(
    netns: Callable[[str], str],
) -> None:
    """W (local workload) - A (node, tfcrypt table, no tfcrypt0) - B (remote workloads)."""
    w, a, b = w_a_b(netns)
    sh("ip", "netns", "exec", b, "nft", "-f", "-", stdin=PROBE)
    assert ping(w, "10.77.2.2") and ping(b, "10.77.1.2", src="10.77.2.2")

    manager = NftManager(SubprocessNft(a))
    manager.set_desired(desired(local={"10.77.1.2": "cw"}, peers={"cw": {"10.77.2.2"}}))
    assert run(manager.apply()).ok
    seen_before = probe(b)

    assert not ping(w, "10.77.2.2")
    assert ping(w, "10.77.2.3")
    seen = probe(b)
    assert seen["selected"] == seen_before["selected"]
    assert seen["unselected"] == seen_before["unselected"] + 1
    assert not ping(b, "10.77.1.2", src="10.77.2.2")
    assert ping(b, "10.77.1.2", src="10.77.2.3")

    counters = run(manager.counters())
    assert counters["guard_drops"][0] == 1
    assert counters["out:cw"][0] == 1
    assert counters["ingress_drops"][0] == 1


SPOOF = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT: send with an address not ours
s.bind((sys.argv[1], 0))
s.sendto(b"spoof", (sys.argv[2], 9))
"""


@pytest.mark.lab
def test_a_neighbour_wearing_a_selected_address_is_dropped_before_it_is_marked(
    netns: Callable[[str], str],
) -> None:
    """W (selected) and V (unselected) behind A; V sends with W's address to B. The
    selected path's `fib saddr . iif` check drops it and counts `spoof_drops`; before,
    it was marked (here, with no tunnel, the guard dropped it; with one, it was carried
    inside). W's own packets pass the check; the listing reads back as desired."""
    w, v, a, b = netns("w"), netns("v"), netns("a"), netns("b")
    prefix = w[:-1]
    link(w, prefix + "wa", "10.77.1.2/24", a, prefix + "aw", "10.77.1.1/24")
    link(v, prefix + "va", "10.77.3.2/24", a, prefix + "av", "10.77.3.1/24")
    link(a, prefix + "ab", "10.77.2.1/24", b, prefix + "ba", "10.77.2.2/24")
    for ns, gw in ((w, "10.77.1.1"), (v, "10.77.3.1")):
        sh("ip", "-n", ns, "route", "add", "default", "via", gw)
    sh("ip", "-n", b, "route", "add", "10.77.0.0/16", "via", "10.77.2.1")
    sh("ip", "netns", "exec", a, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    manager = NftManager(SubprocessNft(a))
    want = desired(local={"10.77.1.2": "cw"}, peers={"cw": {"10.77.2.2"}})
    manager.set_desired(want)
    assert run(manager.apply()).ok
    assert parse_listing(run(SubprocessNft(a).list_table())).items() == \
        desired_table(want).items()
    assert run(manager.apply(full=True)).ops == 0  # a resync is a no-op

    sh("ip", "netns", "exec", v, sys.executable, "-c", SPOOF, "10.77.1.2", "10.77.2.2")
    counters = run(manager.counters())
    assert counters["spoof_drops"][0] == 1 and counters["guard_drops"][0] == 0

    assert not ping(w, "10.77.2.2")  # W's own: passes the check, marked, guard drops it
    counters = run(manager.counters())
    assert counters["spoof_drops"][0] == 1 and counters["guard_drops"][0] == 1


def probe(ns: str) -> dict[str, int]:
    listing = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet",
                            "probe").stdout)
    return {e["rule"]["comment"]: next(s["counter"]["packets"] for s in e["rule"]["expr"]
                                       if "counter" in s)
            for e in listing["nftables"] if "rule" in e}


def test_classes_share_selector_sets_one_rule_per_selector_and_family() -> None:
    d = NftDesired({"10.1.0.1": "ca", "10.1.0.2": "cb"},
                   {"ca": frozenset({"sx", "sy"}), "cb": frozenset({"sy"})},
                   {"sx": frozenset({"10.2.0.1"}), "sy": frozenset({"10.3.0.1", "fd00:3::1"})},
                   mark=MARK)
    state = desired_table(d)
    assert set(state.sets) == MAPS | INFRA | {"sx_v4", "sx_v6", "sy_v4", "sy_v6"}
    assert state.elements["sy_v4"] == {"10.3.0.1": None}  # once, though two classes use it
    per_chain: dict[str, int] = {}
    for chain, _ in state.rules:
        per_chain[chain] = per_chain.get(chain, 0) + 1
    assert per_chain["out_ca"] == per_chain["in_ca"] == 4
    assert per_chain["out_cb"] == per_chain["in_cb"] == 2
    _, manager = applied(d)
    # a remote change is one element in one selector set, whatever classes use it
    moved = NftDesired(d.local_class, d.class_selectors,
                       {**d.selector_ips, "sy": frozenset({"10.3.0.1", "10.3.0.2", "fd00:3::1"})},
                       mark=MARK)
    assert [what(c) for c in reapply(manager, moved)] == [("add", "element", "sy_v4")]


def test_an_unknown_selector_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="selector"):
        desired_table(NftDesired({"10.1.0.1": "ca"}, {"ca": frozenset({"out"})}, {},
                                 mark=MARK))


def test_a_class_gaining_a_selector_gets_its_rules_on_an_incremental_apply() -> None:
    d = NftDesired({"10.1.0.1": "ca"}, {"ca": frozenset({"sx"})},
                   {"sx": frozenset({"10.2.0.1"}), "sy": frozenset({"10.3.0.1"})}, mark=MARK)
    _, manager = applied(d)
    assert reapply(manager, d) == []
    more = NftDesired(d.local_class, {"ca": frozenset({"sx", "sy"})}, d.selector_ips, mark=MARK)
    changed = reapply(manager, more)
    assert sorted(what(c) for c in changed) == [("add", "rule", "in_ca")] * 2 + [
        ("add", "rule", "out_ca")] * 2
    assert reapply(manager, more) == []


# --- infrastructure addresses (issue #14 item 2) -------------------------------------


def test_infrastructure_sets_hold_collapsed_prefixes_and_every_dispatch_excludes_them() -> None:
    d = desired(infrastructure=frozenset({"10.77.0.0/24", "10.77.0.2", "10.9.0.1",
                                          "192.168.0.0/25", "192.168.0.128/25",
                                          "fd00:77::5/64", "fd00:77::9"}))
    fake, manager = applied(d)
    state = parse_listing(fake.listing())
    assert state.sets["infra_v4"].flags == ("interval",)
    assert set(state.elements["infra_v4"]) == {"10.77.0.0/24", "10.9.0.1", "192.168.0.0/24"}
    assert set(state.elements["infra_v6"]) == {"fd00:77::/64"}
    rules = [r["rule"] for r in fake.listing()["nftables"] if "rule" in r]
    dispatch = [r for r in rules if r["chain"] == "prerouting"]
    assert len(dispatch) == 2  # one a family: the infrastructure test, then its lookups
    for r in dispatch:
        refs = [s["match"]["right"] for s in r["expr"] if "match" in s]
        fam = "v6" if "ip6" in json.dumps(r) else "v4"
        assert refs == [f"@infra_{fam}", f"@infra_{fam}"]
        assert all(s["match"]["op"] == "!=" for s in r["expr"] if "match" in s)
        assert r["expr"][-1] == {"jump": {"target": f"pre_{fam}"}}
    # the lookups are reached only through that test: no other rule jumps to them
    for fam in ("v4", "v6"):
        lookups = [r for r in rules if r["chain"] == f"pre_{fam}"]
        assert sorted(r["expr"][-1]["vmap"]["data"] for r in lookups) == [
            f"@in_{fam}", f"@out_{fam}"]
        assert [r for r in rules if f"pre_{fam}" in json.dumps(r["expr"])] == [
            d for d in dispatch if d["expr"][-1]["jump"]["target"] == f"pre_{fam}"]
    assert run(manager.apply()).ops == 0 and run(manager.apply(full=True)).ops == 0

    moved = desired(infrastructure=frozenset({"10.77.0.0/16", "fd00:77::9"}))
    cmds = reapply(manager, moved)
    assert sorted(what(c) for c in cmds) == [
        ("add", "element", "infra_v4"), ("add", "element", "infra_v6"),
        ("delete", "element", "infra_v4"), ("delete", "element", "infra_v6")]
    assert set(parse_listing(fake.listing()).elements["infra_v4"]) == {"10.77.0.0/16"}
    assert run(manager.apply(full=True)).ops == 0


def test_a_table_from_before_infrastructure_sets_is_upgraded_in_one_transaction() -> None:
    fake = FakeNft()
    old = NftManager(fake)
    old.set_desired(desired())
    assert run(old.apply()).ok
    assert fake.table is not None
    del fake.table["sets"]["infra_v4"], fake.table["sets"]["infra_v6"]  # as main built it
    # main's dispatch then: the 4 vmaps alone in prerouting, other comments, no pre_ chains
    for r in [r for r in fake.table["rules"] if r["chain"].startswith("pre_")]:
        r["chain"], r["comment"] = "prerouting", "tfcrypt:" + "0" * 11 + r["comment"][-1]
    fake.table["rules"] = [r for r in fake.table["rules"]
                           if r["chain"] != "prerouting" or "vmap" in r["expr"][-1]]
    for name in ("pre_v4", "pre_v6"):
        del fake.table["chains"][name]
    manager = NftManager(fake)
    manager.set_desired(desired(infrastructure=frozenset({"10.2.0.1"})))
    report = run(manager.apply())
    assert report.ok and len(fake.transactions) == 2
    verbs = sorted(what(c) for c in manager.last_transaction)
    assert verbs.count(("delete", "rule", "prerouting")) == 4
    assert verbs.count(("add", "rule", "prerouting")) == 2
    assert verbs.count(("add", "chain", "pre_v4")) == verbs.count(("add", "rule", "pre_v4")) / 2
    assert parse_listing(fake.listing()).items() == desired_table(
        desired(infrastructure=frozenset({"10.2.0.1"}))).items()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "host.example", "fd00::/129"])
def test_an_infrastructure_entry_that_is_no_prefix_is_refused(bad: str) -> None:
    manager = NftManager(FakeNft())
    with pytest.raises(ConfigError, match="infrastructure"):
        manager.set_desired(desired(infrastructure=frozenset({bad})))
    assert manager.desired is None


@pytest.mark.lab
def test_real_nft_reads_the_infrastructure_sets_back_so_a_resync_changes_nothing(
    netns: Callable[[str], str],
) -> None:
    ns = netns("i")
    fake_nft = FakeNft()
    real, fake = NftManager(SubprocessNft(ns)), NftManager(fake_nft)
    infra = frozenset({"10.77.0.0/24", "10.9.0.1", "10.9.0.2", "fd00:77::/64", "fd00:9::1"})
    for manager in (real, fake):
        manager.set_desired(desired(infrastructure=infra))
        assert run(manager.apply()).ok
    assert real.last_transaction == fake.last_transaction
    text = nft_text(ns)
    assert "flags interval" in text and "ip saddr != @infra_v4 ip daddr != @infra_v4" in text
    assert run(real.apply(full=True)).ops == 0 and nft_text(ns) == text
    change = frozenset({"10.77.0.0/16", "10.9.0.2", "fd00:9::1"})
    for manager in (real, fake):
        manager.set_desired(desired(infrastructure=change))
        assert run(manager.apply()).ok
    assert real.last_transaction == fake.last_transaction
    after = parse_listing(run(SubprocessNft(ns).list_table()))
    assert set(after.elements["infra_v4"]) == {"10.77.0.0/16", "10.9.0.2"}
    assert set(after.elements["infra_v6"]) == {"fd00:9::1"}
    assert run(real.apply(full=True)).ops == 0


@pytest.mark.lab
def test_an_infrastructure_address_in_every_set_is_neither_marked_nor_dropped(
    netns: Callable[[str], str],
) -> None:
    """W - A - B as in the guard test, with B's addresses selected and W's class; one of
    B's addresses is infrastructure: it crosses in plaintext both ways (no tunnel
    exists, so a marked packet would be dropped by the guard and a plaintext reply by
    strict ingress), the other stays dropped."""
    w, a, b = w_a_b(netns)
    manager = NftManager(SubprocessNft(a))
    manager.set_desired(desired(local={"10.77.1.2": "cw"},
                                peers={"cw": {"10.77.2.2", "10.77.2.3"}},
                                infrastructure=frozenset({"10.77.2.2"})))
    assert run(manager.apply()).ok
    assert ping(w, "10.77.2.2")
    assert ping(b, "10.77.1.2", src="10.77.2.2")
    assert not ping(w, "10.77.2.3")
    assert not ping(b, "10.77.1.2", src="10.77.2.3")
    counters = run(manager.counters())
    assert counters["guard_drops"][0] == 1 and counters["ingress_drops"][0] == 1
