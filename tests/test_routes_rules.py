"""Route and rule reconcilers: against the in-memory kernel, then in a real namespace.

The fake tier proves the reconciler logic (idempotence, drift repair, ownership, partial
failure, IPv6); the lab tier proves the same against the kernel through pyroute2 and
checks the result with `ip`, the tool an operator would use.
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tfcrypt.dataplane.netlink import (
    FakeNetlink,
    Family,
    KernelRoute,
    KernelRule,
    PyRoute2Netlink,
    RouteType,
)
from tfcrypt.dataplane.routes import DEFAULT_PROTO, DEFAULT_TABLE, RouteManager, RouteSpec
from tfcrypt.dataplane.rules import DEFAULT_PRIORITY, RuleManager
from tfcrypt.errors import ConfigError

DEV = "tfcrypt0"
T = DEFAULT_TABLE
P = DEFAULT_PROTO
PRIO = DEFAULT_PRIORITY
WANTED = ["10.0.1.0/24", "10.0.2.7", "fd00:1::/64", "fd00:2::7"]


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def fake_with_dev() -> tuple[FakeNetlink, int]:
    fake = FakeNetlink()
    return fake, fake.add_link(DEV)


def ours(fake: FakeNetlink) -> set[str]:
    return {r.dst for r in fake.route_table if r.table == T and r.proto == P}


# --- routes against the fake ---------------------------------------------------------


def test_routes_install_both_families_and_second_apply_changes_nothing() -> None:
    fake, index = fake_with_dev()
    routes = RouteManager(fake, DEV)
    routes.set_desired(frozenset(WANTED))

    first = run(routes.apply())
    snapshot = list(fake.route_table)
    second = run(routes.apply())

    assert (first.ops, first.ok) == (4, True)
    assert (second.ops, second.ok) == (0, True)
    assert fake.route_table == snapshot
    assert ours(fake) == {"10.0.1.0/24", "10.0.2.7/32", "fd00:1::/64", "fd00:2::7/128"}
    assert {(r.family, r.metric, r.oif) for r in fake.route_table} == {
        (Family.V4, 0, index),
        (Family.V6, 1024, index),
    }
    assert routes.pending == frozenset()


def test_routes_drift_is_repaired() -> None:
    fake, _ = fake_with_dev()
    routes = RouteManager(fake, DEV)
    routes.set_desired(WANTED)
    run(routes.apply())
    gone = next(r for r in fake.route_table if r.dst == "fd00:1::/64")
    fake.route_table.remove(gone)
    hijacked = next(r for r in fake.route_table if r.dst == "10.0.1.0/24")
    fake.route_table[fake.route_table.index(hijacked)] = KernelRoute(
        Family.V4, "10.0.1.0/24", T, P, RouteType.BLACKHOLE, None, 0, 0
    )

    report = run(routes.apply())

    assert report.ops == 2
    assert gone in fake.route_table and hijacked in fake.route_table
    assert run(routes.apply()).ops == 0


def test_stale_routes_removed_only_when_ours() -> None:
    fake, index = fake_with_dev()
    unicast = RouteType.UNICAST
    foreign_in_table = KernelRoute(Family.V4, "10.9.0.0/24", T, 4, unicast, index, 0, 253)
    ours_other_table = KernelRoute(Family.V6, "fd00:9::/64", 100, P, unicast, index, 1024, 0)
    fake.route_table += [foreign_in_table, ours_other_table]
    routes = RouteManager(fake, DEV)
    routes.set_desired(WANTED)
    run(routes.apply())

    routes.set_desired(["10.0.1.0/24"])
    report = run(routes.apply())

    assert report.ops == 3
    assert ours(fake) == {"10.0.1.0/24"}
    assert foreign_in_table in fake.route_table and ours_other_table in fake.route_table


def test_leftovers_from_a_previous_run_are_adopted_or_removed() -> None:
    fake, index = fake_with_dev()
    adopted = KernelRoute(Family.V4, "10.0.1.0/24", T, P, RouteType.UNICAST, index, 0, 253)
    duplicate = KernelRoute(Family.V4, "10.0.1.0/24", T, P, RouteType.UNICAST, index, 7, 253)
    stale = KernelRoute(Family.V6, "fd00:8::/64", T, P, RouteType.UNICAST, index, 1024, 0)
    fake.route_table += [duplicate, adopted, stale]
    routes = RouteManager(fake, DEV)
    routes.set_desired(["10.0.1.0/24"])

    report = run(routes.apply())

    assert report.ops == 2
    assert fake.route_table == [adopted]


def test_failed_route_stays_pending_and_the_rest_is_applied() -> None:
    fake, _ = fake_with_dev()
    fake.failure = lambda op, obj: errno.EIO if getattr(obj, "dst", "") == "fd00:1::/64" else None
    routes = RouteManager(fake, DEV)
    routes.set_desired(WANTED)

    report = run(routes.apply())

    assert report.ops == 3
    assert [e.key for e in report.errors] == ["fd00:1::/64"]
    assert "Input/output error" in report.errors[0].message
    assert routes.pending == {"fd00:1::/64"}

    fake.failure = None
    assert run(routes.apply()).ops == 1
    assert routes.pending == frozenset()
    assert len(ours(fake)) == 4


def test_missing_device_is_reported_pending_and_reject_routes_still_go_in() -> None:
    fake = FakeNetlink()
    routes = RouteManager(fake, DEV)
    routes.set_desired(
        {
            "10.0.1.0/24": RouteSpec(),
            "0.0.0.0/0": RouteSpec(RouteType.PROHIBIT, metric=4000),
            "::/0": RouteSpec(RouteType.UNREACHABLE, metric=4000),
        }
    )

    report = run(routes.apply())

    assert report.ops == 2
    assert [(e.key, e.message) for e in report.errors] == [
        ("10.0.1.0/24", "device tfcrypt0 does not exist; route pending")
    ]
    assert routes.pending == {"10.0.1.0/24"}
    assert {(r.dst, r.type) for r in fake.route_table} == {
        ("0.0.0.0/0", RouteType.PROHIBIT),
        ("::/0", RouteType.UNREACHABLE),
    }

    fake.add_link(DEV)
    assert (run(routes.apply()).ops, routes.pending) == (1, frozenset())


def test_vanished_device_takes_its_routes_and_next_apply_restores_them() -> None:
    fake, _ = fake_with_dev()
    routes = RouteManager(fake, DEV)
    routes.set_desired({**{d: RouteSpec() for d in WANTED}, "::/0": RouteSpec(RouteType.PROHIBIT)})
    run(routes.apply())

    fake.del_link(DEV)
    assert ours(fake) == {"::/0"}
    new_index = fake.add_link(DEV)
    report = run(routes.apply())

    assert (report.ops, report.ok) == (4, True)
    assert {r.oif for r in fake.route_table if r.type == RouteType.UNICAST} == {new_index}


def test_metric_change_adds_the_new_route_before_deleting_the_old() -> None:
    fake, _ = fake_with_dev()
    routes = RouteManager(fake, DEV)
    routes.set_desired({"fd00:1::/64": RouteSpec(metric=10)})
    run(routes.apply())
    seen: list[tuple[str, int]] = []
    fake.failure = lambda op, obj: seen.append((op, obj.metric)) or None  # type: ignore[attr-defined, func-returns-value]

    routes.set_desired({"fd00:1::/64": RouteSpec(metric=20)})
    report = run(routes.apply())

    assert report.ops == 2
    assert seen == [("route_add", 20), ("route_del", 10)]
    assert [r.metric for r in fake.route_table] == [20]


def test_type_change_is_one_replace() -> None:
    fake, _ = fake_with_dev()
    routes = RouteManager(fake, DEV)
    routes.set_desired(["10.0.1.0/24"])
    run(routes.apply())

    routes.set_desired({"10.0.1.0/24": RouteSpec(RouteType.PROHIBIT)})
    assert run(routes.apply()).ops == 1
    assert [(r.type, r.oif) for r in fake.route_table] == [(RouteType.PROHIBIT, None)]


def test_clash_with_a_foreign_route_is_reported_not_overwritten() -> None:
    fake, index = fake_with_dev()
    foreign = KernelRoute(Family.V4, "10.0.1.0/24", T, 4, RouteType.UNICAST, index, 0, 253)
    fake.route_table.append(foreign)
    routes = RouteManager(fake, DEV)
    routes.set_desired(["10.0.1.0/24"])

    report = run(routes.apply())

    assert report.ops == 0
    assert "File exists" in report.errors[0].message
    assert fake.route_table == [foreign]


@pytest.mark.parametrize(
    "desired",
    [
        ["10.0.1.1/24"],
        ["not-a-cidr"],
        {"10.0.0.0/8": RouteSpec(RouteType.PROHIBIT, dev="eth0")},
        {"10.0.0.0/8": RouteSpec(RouteType.LOCAL)},
    ],
)
def test_unusable_desired_routes_are_config_errors(desired: object) -> None:
    with pytest.raises(ConfigError):
        RouteManager(FakeNetlink(), DEV).set_desired(desired)  # type: ignore[arg-type]


def test_route_manager_repr_names_table_and_counts() -> None:
    routes = RouteManager(FakeNetlink(), DEV)
    routes.set_desired(WANTED)
    run(routes.apply())
    assert repr(routes) == (
        f"RouteManager(ifname='tfcrypt0', table={T}, proto={P}, desired=4, pending=4)"
    )


# --- rules against the fake ----------------------------------------------------------


def rule(family: Family = Family.V4, **kw: object) -> KernelRule:
    fields: dict[str, object] = {"priority": PRIO, "table": T, "proto": P, **kw}
    return KernelRule(family, **fields)  # type: ignore[arg-type]


def test_rule_installed_per_family_and_idempotent() -> None:
    fake = FakeNetlink()
    rules = RuleManager(fake)

    assert run(rules.apply()).ops == 2
    assert run(rules.apply()).ops == 0
    assert fake.rule_list == [rule(Family.V4), rule(Family.V6)]


def test_foreign_rule_at_our_priority_is_replaced_make_before_break() -> None:
    fake = FakeNetlink()
    foreign = rule(table=100, proto=4)
    elsewhere = rule(priority=500, table=100, proto=4)
    fake.rule_list += [foreign, elsewhere]
    seen: list[str] = []
    fake.failure = lambda op, obj: seen.append(op) or None  # type: ignore[func-returns-value]
    rules = RuleManager(fake, fwmark=0x100, mask=0x100, families=[Family.V4])

    report = run(rules.apply())

    assert report.ops == 2
    assert seen == ["rule_add", "rule_del"]
    assert fake.rule_list == [elsewhere, rule(fwmark=0x100, mask=0x100)]


def test_rule_with_extra_selectors_at_our_priority_is_not_mistaken_for_ours() -> None:
    fake = FakeNetlink()
    lookalike = rule(extra=(("FRA_IIFNAME", "eth0"),))
    fake.rule_list.append(lookalike)
    rules = RuleManager(fake, families=[Family.V4])

    assert run(rules.apply()).ops == 2
    assert fake.rule_list == [rule()]


def test_our_rules_left_by_another_configuration_and_duplicates_are_removed() -> None:
    fake = FakeNetlink()
    old_priority = rule(Family.V6, priority=900)
    fake.rule_list += [old_priority, rule(), rule()]
    rules = RuleManager(fake, families=[Family.V4])

    assert run(rules.apply()).ops == 2
    assert fake.rule_list == [rule()]


def test_fwmark_without_mask_matches_what_the_kernel_reports() -> None:
    fake = FakeNetlink()
    fake.rule_list.append(rule(fwmark=0x4, mask=0xFFFFFFFF))
    rules = RuleManager(fake, fwmark=0x4, families=[Family.V4])
    assert run(rules.apply()).ops == 0


def test_kernel_without_rule_protocol_owns_by_priority() -> None:
    fake = FakeNetlink()
    fake.rule_list.append(rule(proto=None))
    rules = RuleManager(fake, families=[Family.V4])
    assert run(rules.apply()).ops == 0


def test_set_desired_false_removes_our_rules_only() -> None:
    fake = FakeNetlink()
    foreign = rule(priority=500, table=100, proto=4)
    fake.rule_list.append(foreign)
    rules = RuleManager(fake)
    run(rules.apply())

    rules.set_desired(False)
    assert run(rules.apply()).ops == 2
    assert fake.rule_list == [foreign]


def test_failed_rule_stays_pending() -> None:
    fake = FakeNetlink()
    fake.failure = lambda op, obj: errno.EPERM if obj.family == Family.V6 else None  # type: ignore[attr-defined]
    rules = RuleManager(fake)

    report = run(rules.apply())

    assert report.ops == 1
    assert report.errors[0].key == f"V6 {PRIO}: lookup {T}"
    assert rules.pending == {rule(Family.V6)}
    fake.failure = None
    assert run(rules.apply()).ops == 1
    assert rules.pending == frozenset()


@pytest.mark.parametrize(
    "kwargs",
    [{"priority": 0}, {"priority": 32766}, {"mask": 0xFF}, {"families": []}],
)
def test_unusable_rule_configuration_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        RuleManager(FakeNetlink(), **kwargs)  # type: ignore[arg-type]


def test_rule_manager_repr_reads_like_ip_rule() -> None:
    rules = RuleManager(FakeNetlink(), fwmark=0x100, mask=0x100)
    assert repr(rules) == (
        f"RuleManager({PRIO}: from all fwmark 0x100/0x100 lookup {T} proto {P}, present=True)"
    )


# --- lab: a real network namespace ---------------------------------------------------

needs_lab = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"
)


def ip(ns: str, *args: str) -> str:
    return subprocess.run(
        ["ip", "-n", ns, *args], check=True, capture_output=True, text=True
    ).stdout


def table_dump(ns: str) -> str:
    return ip(ns, "route", "show", "table", str(T)) + ip(ns, "-6", "route", "show", "table", str(T))


def shown(ns: str, family: str, proto: int | str) -> str:
    """`ip route show table T proto X`: the view an operator has of who owns what."""
    return ip(ns, family, "route", "show", "table", str(T), "proto", str(proto))


@pytest.fixture
def netns() -> Iterator[tuple[str, str]]:
    """A private namespace with an up tun device (the kind wireguard-go creates).

    The kernel here has no dummy module; a tun without a reader is the closest stand-in.
    """
    tag = secrets.token_hex(3)
    ns, dev = f"tfF{tag}", f"tfF{tag}d"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        add_dev(ns, dev)
        yield ns, dev
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def add_dev(ns: str, dev: str) -> None:
    ip(ns, "tuntap", "add", "mode", "tun", "name", dev)
    ip(ns, "link", "set", dev, "up")


@pytest.mark.lab
@needs_lab
def test_lab_routes_installed_idempotent_and_foreign_kept(netns: tuple[str, str]) -> None:
    ns, dev = netns
    ip(ns, "route", "add", "10.99.0.0/24", "dev", dev, "table", str(T), "proto", "static")
    ip(ns, "-6", "route", "add", "fd00:99::/64", "dev", dev, "table", str(T), "proto", "static")

    async def scenario() -> None:
        netlink = PyRoute2Netlink(netns=ns)
        try:
            routes = RouteManager(netlink, dev)
            fail_closed = RouteSpec(RouteType.PROHIBIT, metric=4000)
            routes.set_desired({**{d: RouteSpec() for d in WANTED}, "::/0": fail_closed})
            assert (await routes.apply()).ops == 5
            before = table_dump(ns)
            assert (await routes.apply()).ops == 0
            assert table_dump(ns) == before

            assert sorted(shown(ns, "-4", P).splitlines()) == [
                f"10.0.1.0/24 dev {dev} scope link linkdown ",
                f"10.0.2.7 dev {dev} scope link linkdown ",
            ]
            v6 = shown(ns, "-6", P)
            assert f"fd00:1::/64 dev {dev} metric 1024" in v6
            assert f"fd00:2::7 dev {dev} metric 1024" in v6
            assert "prohibit default dev lo metric 4000" in v6

            prohibit, metric_9 = RouteSpec(RouteType.PROHIBIT), RouteSpec(metric=9)
            changed = {"fd00:1::/64": prohibit, "10.0.2.7": metric_9}
            routes.set_desired({**{d: RouteSpec() for d in WANTED}, **changed})
            assert (await routes.apply()).ops == 4  # replace, add+delete, delete "::/0"
            assert (await routes.apply()).ops == 0
            assert "prohibit fd00:1::/64 dev lo metric 1024" in shown(ns, "-6", P)
            assert f"10.0.2.7 dev {dev} scope link metric 9 linkdown" in shown(ns, "-4", P)

            routes.set_desired(["10.0.1.0/24"])
            assert (await routes.apply()).ops == 3
            assert shown(ns, "-4", P).split()[0] == "10.0.1.0/24"
            assert shown(ns, "-6", P) == ""
            assert shown(ns, "-4", "static").split()[0] == "10.99.0.0/24"
            assert shown(ns, "-6", "static").split()[0] == "fd00:99::/64"
        finally:
            await netlink.aclose()

    run(scenario())


@pytest.mark.lab
@needs_lab
def test_lab_recreated_device_gets_its_routes_back(netns: tuple[str, str]) -> None:
    ns, dev = netns

    async def scenario() -> None:
        netlink = PyRoute2Netlink(netns=ns)
        try:
            routes = RouteManager(netlink, dev)
            routes.set_desired(WANTED)
            assert (await routes.apply()).ops == 4
            full = table_dump(ns)

            ip(ns, "link", "del", dev)
            assert table_dump(ns) == ""
            missing = await routes.apply()
            assert missing.ops == 0
            assert {e.message for e in missing.errors} == {
                f"device {dev} does not exist; route pending"
            }
            assert routes.pending == {"10.0.1.0/24", "10.0.2.7/32", "fd00:1::/64", "fd00:2::7/128"}

            add_dev(ns, dev)
            back = await routes.apply()
            assert (back.ops, back.ok) == (4, True)
            assert table_dump(ns) == full
        finally:
            await netlink.aclose()

    run(scenario())


def rules_at(ns: str, family: str, priority: int) -> list[str]:
    return [
        line
        for line in ip(ns, family, "rule", "show").splitlines()
        if line.startswith(f"{priority}:")
    ]


@pytest.mark.lab
@needs_lab
def test_lab_rule_exactly_one_at_our_priority_replacing_a_foreign_one(
    netns: tuple[str, str],
) -> None:
    ns, _ = netns
    ip(ns, "rule", "add", "priority", str(PRIO), "table", "100")
    ip(ns, "-6", "rule", "add", "priority", str(PRIO), "table", "100")
    ip(ns, "-6", "rule", "add", "priority", str(PRIO), "iif", "lo", "table", str(T))

    async def scenario() -> None:
        netlink = PyRoute2Netlink(netns=ns)
        try:
            rules = RuleManager(netlink)
            assert (await rules.apply()).ops == 5
            expected = [f"{PRIO}:\tfrom all lookup {T} proto {P}"]
            assert rules_at(ns, "-4", PRIO) == expected
            assert rules_at(ns, "-6", PRIO) == expected
            before = ip(ns, "-4", "rule") + ip(ns, "-6", "rule")
            assert (await rules.apply()).ops == 0
            assert ip(ns, "-4", "rule") + ip(ns, "-6", "rule") == before

            marked = RuleManager(netlink, fwmark=0x100, mask=0x100, families=[Family.V6])
            assert (await marked.apply()).ops == 3
            assert rules_at(ns, "-6", PRIO) == [
                f"{PRIO}:\tfrom all fwmark 0x100/0x100 lookup {T} proto {P}"
            ]
            assert rules_at(ns, "-4", PRIO) == []

            marked.set_desired(False)
            assert (await marked.apply()).ops == 1
            assert rules_at(ns, "-6", PRIO) == []
            assert rules_at(ns, "-4", 32766) == ["32766:\tfrom all lookup main"]
        finally:
            await netlink.aclose()

    run(scenario())


def test_sibling_managers_sharing_the_proto_do_not_sweep_each_other() -> None:
    nl = FakeNetlink()
    siblings = (1820, 1821)
    tunnel = RuleManager(nl, priority=1820, table=29798, fwmark=0x100000, siblings=siblings)
    failclosed = RuleManager(nl, priority=1821, table=29799, fwmark=0x100000,
                             siblings=siblings)

    async def both() -> int:
        return (await tunnel.apply()).ops + (await failclosed.apply()).ops

    assert asyncio.run(both()) == 4
    assert asyncio.run(both()) == 0
    assert sorted(r.priority for f in Family for r in asyncio.run(nl.rules(f))) == \
        [1820, 1820, 1821, 1821]
