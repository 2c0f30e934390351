# ruff: noqa: F811  (the netns fixture is test_nftables's, imported; tests name it)
"""Native-syntax transactions (tfcrypt/dataplane/nft_text.py): the renderer, its fallback
to JSON, and their equivalence proven against the real nft.

The unit tier pins what the renderer writes (quoting, prefixes, intervals, verdict maps,
IPv6, one line per command, elements split across lines) and what it refuses: anything
outside the shapes tfcrypt emits sends the whole transaction as JSON. The lab tier applies
the same desired tables through the JSON path (`SubprocessNft(native=False)`) and the
native one, each in its own network namespace, and requires identical
`nft -j list table inet tfcrypt` listings after a first apply and after every kind of
change; and shows nft's own error text for a bad element, with nothing applied.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from test_compute import PAYMENTS_SITE, W, run, wl
from test_nftables import _random_desired, desired, netns, sh  # noqa: F401 (fixture)

from tfcrypt.dataplane.nft_json import FakeNft, NftError, SubprocessNft, transaction
from tfcrypt.dataplane.nft_table import NftDesired
from tfcrypt.dataplane.nft_text import ELEMENTS_PER_LINE, Unrenderable, render
from tfcrypt.dataplane.nftables import NftManager

Json = dict[str, Any]
BASE = {"family": "inet", "table": "tfcrypt"}
INFRA = frozenset({"10.77.0.0/24", "10.9.0.1", "fd00:77::/64", "fd00:9::1"})


def arun(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def first_transaction(d: NftDesired) -> list[Json]:
    manager = NftManager(FakeNft())
    manager.set_desired(d)
    assert arun(manager.apply()).ok
    return manager.last_transaction


def rich(**kw: Any) -> NftDesired:
    """Two classes, IPv6 on both sides, 40 remote IPv4 addresses in a set (more than a line
    of elements), infrastructure prefixes and a mask wider than the mark; `kw` overrides."""
    many = {f"10.2.1.{i}" for i in range(1, 41)} | {f"fd00:2::{i:x}" for i in range(1, 20)}
    base: dict[str, Any] = {"local": {"10.1.0.1": "ca", "10.1.0.2": "cb", "fd00:1::1": "ca"},
                            "peers": {"ca": many, "cb": {"10.3.0.1", "fd00:3::1"}},
                            "mask": 0x00300000, "infrastructure": INFRA}
    return desired(**{**base, **kw})


# --- the renderer --------------------------------------------------------------------


def test_a_first_transaction_renders_one_line_per_command_in_nft_syntax() -> None:
    cmds = first_transaction(rich())
    text = render(cmds)
    lines = text.splitlines()

    assert lines[0] == "add table inet tfcrypt"
    assert text.count("\nadd ") + 1 == len(cmds)  # element lines continue inside the braces
    assert "add counter inet tfcrypt guard_drops" in lines
    assert "add set inet tfcrypt infra_v4 { type ipv4_addr; flags interval; }" in lines
    assert "add map inet tfcrypt out_v6 { type ipv6_addr : verdict; }" in lines
    assert ("add chain inet tfcrypt prerouting { type filter hook prerouting priority -150; "
            "policy accept; }") in lines
    assert "add chain inet tfcrypt selected" in lines
    assert "add element inet tfcrypt infra_v4 { 10.77.0.0/24, 10.9.0.1 }" in lines
    assert "add element inet tfcrypt infra_v6 { fd00:77::/64, fd00:9::1 }" in lines
    assert ("add element inet tfcrypt out_v4 { 10.1.0.1 : jump out_ca, "
            "10.1.0.2 : jump out_cb }") in lines
    assert "add element inet tfcrypt in_v6 { fd00:1::1 : jump in_ca }" in lines
    rules = [ln for ln in lines if ln.startswith("add rule")]
    assert all(ln.endswith('"') and ' comment "tfcrypt:' in ln for ln in rules)
    assert any(ln.startswith("add rule inet tfcrypt prerouting ip6 saddr != @infra_v6 "
                             "ip6 daddr != @infra_v6 jump pre_v6 ") for ln in rules)
    assert any(ln.startswith("add rule inet tfcrypt pre_v6 ip6 saddr vmap @out_v6 ")
               for ln in rules)
    assert any(" fib saddr . iif oif == missing counter name \"spoof_drops\" drop " in ln
               for ln in rules)
    assert any(" meta mark set meta mark & 0xffcfffff | 0x00100000 " in ln for ln in rules)
    assert any(" meta mark & 0x00300000 == 0x00100000 meta oifname != \"tfcrypt0\" counter "
               "name \"guard_drops\" drop " in ln for ln in rules)
    assert any(" meta oifname == \"tfcrypt0\" tcp flags & (syn | rst) == syn tcp option "
               "maxseg size set rt mtu " in ln for ln in rules)
    assert any(" ip6 daddr == @ca_v6 counter packets 0 bytes 0 goto selected " in ln
               for ln in rules)


def test_a_long_element_list_is_split_across_lines_inside_one_command() -> None:
    ips = [f"10.2.1.{i}" for i in range(1, 41)]
    text = render([{"add": {"element": {**BASE, "name": "ca_v4", "elem": ips}}}])

    lines = text.splitlines()
    assert len(lines) == -(-len(ips) // ELEMENTS_PER_LINE)
    assert lines[0].startswith("add element inet tfcrypt ca_v4 { 10.2.1.1, ")
    assert all(ln.endswith(",") for ln in lines[:-1]) and lines[-1].endswith(" }")
    assert [e.strip(" ,}") for ln in lines for e in ln.split("{ ")[-1].split(", ")] == ips


def test_deletes_by_handle_and_by_name_and_raw_prefix_elements() -> None:
    text = render([
        {"delete": {"rule": {**BASE, "chain": "prerouting", "handle": 42}}},
        {"delete": {"element": {**BASE, "name": "infra_v6",
                                "elem": [{"prefix": {"addr": "fd00:77::", "len": 64}}]}}},
        {"delete": {"element": {**BASE, "name": "in_v4",
                                "elem": [["10.1.0.1", {"jump": {"target": "in_ca"}}]]}}},
        {"flush": {"chain": {**BASE, "name": "out_cb"}}},
        {"delete": {"map": {**BASE, "name": "out_v4"}}},
        {"delete": {"chain": {**BASE, "name": "out_cb"}}},
        {"delete": {"set": {**BASE, "name": "cb_v4"}}},
        {"delete": {"counter": {**BASE, "name": "spoof_drops"}}},
        {"delete": {"table": {"family": "inet", "name": "tfcrypt"}}},
    ])
    assert text.splitlines() == [
        "delete rule inet tfcrypt prerouting handle 42",
        "delete element inet tfcrypt infra_v6 { fd00:77::/64 }",
        "delete element inet tfcrypt in_v4 { 10.1.0.1 : jump in_ca }",
        "flush chain inet tfcrypt out_cb",
        "delete map inet tfcrypt out_v4",
        "delete chain inet tfcrypt out_cb",
        "delete set inet tfcrypt cb_v4",
        "delete counter inet tfcrypt spoof_drops",
        "delete table inet tfcrypt",
    ]


def _rule(*expr: Json, comment: str = "tfcrypt:0123456789ab") -> Json:
    return {"add": {"rule": {**BASE, "chain": "out_ca", "comment": comment,
                             "expr": list(expr)}}}


_DROP = {"drop": None}
_OIF = {"meta": {"key": "oifname"}}


@pytest.mark.parametrize(
    ("command", "why"),
    [
        (_rule(_DROP, comment='say "hi"'), "a quote ends nft's string"),
        (_rule(_DROP, comment="line\nbreak"), "a newline"),
        (_rule({"match": {"op": "==", "left": _OIF, "right": "veth*"}}, _DROP),
         "a trailing * makes an interface name a wildcard in nft syntax"),
        ({"add": {"chain": {**BASE, "name": "counter"}}}, "a name that is a keyword"),
        ({"add": {"chain": {**BASE, "name": "out-ca"}}}, "a name nft would split"),
        ({"add": {"element": {**BASE, "name": "ca_v6", "elem": ["::ffff:10.0.0.1"]}}},
         "IPv4 inside IPv6"),
        ({"add": {"element": {**BASE, "name": "ca_v4", "elem": ["10.0.0"]}}}, "no address"),
        ({"add": {"element": {**BASE, "name": "ca_v4", "elem": []}}}, "no elements"),
        ({"add": {"element": {**BASE, "name": "pairs", "elem": [
            {"concat": ["10.0.0.1", "10.0.0.2"]}]}}}, "a concatenation"),
        ({"add": {"set": {**BASE, "name": "pairs", "type": ["ipv4_addr", "ipv4_addr"]}}},
         "a concatenated type"),
        ({"add": {"set": {**BASE, "name": "ca_v4", "type": "ipv4_addr",
                          "elem": ["10.0.0.1"]}}}, "elements inside add set"),
        ({"add": {"quota": {**BASE, "name": "q_1", "bytes": 1}}}, "a kind tfcrypt never makes"),
        ({"add": {"table": {"family": "inet", "name": "tfcrypt", "flags": ["dormant"]}}},
         "a field the renderer does not know"),
        (_rule({"log": {"prefix": "x"}}), "a statement tfcrypt never emits"),
        (_rule({"match": {"op": "in", "left": _OIF, "right": "tfcrypt0"}}), "another operator"),
        (_rule({"mangle": {"key": {"meta": {"key": "mark"}}, "value": {"&": [
            {"|": [{"meta": {"key": "mark"}}, 1]}, 2]}}}), "an OR under an AND"),
    ],
)
def test_what_cannot_be_rendered_faithfully_sends_the_whole_transaction_as_json(
    command: Json, why: str,
) -> None:
    good = first_transaction(desired())
    with pytest.raises(Unrenderable):
        render([command])

    args, payload = transaction([*good, command])

    assert args == ["-j", "-f", "-"], why
    assert json.loads(payload) == {"nftables": [*good, command]}


def test_renderable_transactions_go_as_text_unless_json_is_asked_for() -> None:
    cmds = first_transaction(rich())

    assert transaction(cmds) == (["-f", "-"], render(cmds).encode())
    assert transaction(cmds, native=False) == (["-j", "-f", "-"],
                                                json.dumps({"nftables": cmds}).encode())


def test_every_transaction_of_the_change_sequences_renders() -> None:
    """The manager's transactions through the equivalence tests' changes and through the
    reconcile tests' 80 random desired states all take the native path."""
    rng = random.Random(1820)
    for sequence in ([rich(), *changes()], [_random_desired(rng) for _ in range(80)]):
        fake = FakeNft()
        manager = NftManager(fake)
        for d in sequence:
            manager.set_desired(d)
            assert arun(manager.apply(full=len(fake.transactions) % 3 == 2)).ok
            if manager.last_transaction:
                assert transaction(manager.last_transaction)[0] == ["-f", "-"]
        assert len(fake.transactions) > len(sequence) // 2


# --- against the real nft ------------------------------------------------------------


def changes() -> list[NftDesired]:
    """Each step after `rich()`, one kind of change at a time."""
    adds_and_deletes = rich(peers={"ca": {f"10.2.1.{i}" for i in range(5, 61)}
                                   | {"fd00:2::1", "fd00:2::ab"},
                                   "cb": {"10.3.0.1", "10.3.0.2", "fd00:3::1"}})
    return [
        adds_and_deletes,
        # a local address changes class: its map elements are deleted and added
        rich(local={"10.1.0.1": "cb", "10.1.0.2": "cb", "fd00:1::1": "ca"},
             peers={"ca": {"10.2.1.5"}, "cb": {"10.3.0.1"}}),
        # observe-only: every class rule replaced (deleted by handle), `selected` emptied
        rich(enforce=False, peers={"ca": {"10.2.1.5"}, "cb": {"10.3.0.1"}}),
        # class cb vanishes: its chains flushed and deleted, its sets deleted
        rich(enforce=False, local={"10.1.0.1": "ca", "fd00:1::1": "ca"},
             peers={"ca": {"10.2.1.5", "fd00:2::1"}}),
        # infrastructure prefixes deleted and a wider one added
        rich(enforce=False, local={"10.1.0.1": "ca"}, peers={"ca": {"10.2.1.5"}},
             infrastructure=frozenset({"10.77.0.0/16", "fd00:9::1"})),
        # back to enforcing, a new class, a mask equal to the mark
        rich(mask=None, local={"10.1.0.1": "ca", "10.1.0.3": "cc"},
             peers={"ca": {"10.2.1.5"}, "cc": {"10.4.0.1", "fd00:4::1"}}),
    ]


def listing(ns: str) -> Json:
    """`nft -j list table inet tfcrypt`, set elements sorted (the kernel's hash order is
    per namespace) and nft's version dropped; everything else as nft prints it."""
    out = json.loads(sh("ip", "netns", "exec", ns, "nft", "-j", "list", "table", "inet",
                        "tfcrypt").stdout)
    for entry in out["nftables"]:
        body = entry.get("set") or entry.get("map")
        if body and "elem" in body:
            body["elem"] = sorted(body["elem"], key=json.dumps)
    return {"nftables": [e for e in out["nftables"] if "metainfo" not in e]}


def applied_both(ns_json: str, ns_text: str) -> tuple[NftManager, NftManager]:
    return NftManager(SubprocessNft(ns_json, native=False)), NftManager(SubprocessNft(ns_text))


def step(managers: tuple[NftManager, NftManager], d: NftDesired, full: bool = False) -> None:
    for manager in managers:
        manager.set_desired(d)
        report = arun(manager.apply(full=full))
        assert report.ok, report.errors
    by_json, by_text = managers
    assert by_json.last_transaction == by_text.last_transaction
    assert transaction(by_text.last_transaction)[0] == ["-f", "-"]


@pytest.mark.lab
def test_real_nft_lists_the_same_table_whether_it_was_sent_as_json_or_as_text(
    netns: Callable[[str], str],
) -> None:
    ns_json, ns_text = netns("j"), netns("t")
    managers = applied_both(ns_json, ns_text)

    step(managers, rich())
    first = listing(ns_text)
    assert first == listing(ns_json)
    kinds = {k for e in first["nftables"] for k in e}
    assert kinds == {"table", "counter", "set", "map", "chain", "rule"}
    assert sum(len(e["set"].get("elem", [])) for e in first["nftables"] if "set" in e) > 60
    assert all(e["rule"]["comment"].startswith("tfcrypt:")
               for e in first["nftables"] if "rule" in e)

    for i, d in enumerate(changes()):
        step(managers, d, full=i % 2 == 1)
        assert listing(ns_text) == listing(ns_json), f"after change {i + 1}"
        assert arun(managers[1].apply(full=True)).ops == 0  # the text path reads back as desired

    for manager in managers:
        assert arun(manager.remove()).ops == 1
    assert arun(SubprocessNft(ns_text).list_table()) is None


@pytest.mark.lab
def test_real_nft_lists_the_same_table_through_both_paths_over_random_changes(
    netns: Callable[[str], str],
) -> None:
    """The reconcile tests' random desired states (classes appearing and vanishing, local
    addresses moving, enforce and observe-only), incremental and every third one full."""
    ns_json, ns_text = netns("j"), netns("t")
    managers = applied_both(ns_json, ns_text)
    rng = random.Random(1820)
    for i in range(30):
        step(managers, _random_desired(rng), full=i % 3 == 2)
        assert listing(ns_text) == listing(ns_json), f"after step {i + 1}"


@pytest.mark.lab
def test_real_nft_lists_a_table_from_the_core_the_same_through_both_paths(
    netns: Callable[[str], str],
) -> None:
    """A desired table computed by the core from workloads and a policy (as the agent
    does), then the same after a remote workload appears."""
    ns_json, ns_text = netns("j"), netns("t")
    managers = applied_both(ns_json, ns_text)
    for workloads in (W, [*W, wl("n2-w9", "n2", "10.200.2.99", "fd00:200:2::99",
                                 tags="application=db site=a")]):
        core = run("n1", workloads, [PAYMENTS_SITE])
        step(managers, NftDesired(core.local_class, core.class_selectors, core.selector_ips,
                                  mark=0x00100000, infrastructure=core.infrastructure))
        assert listing(ns_text) == listing(ns_json)
    assert "elem" in json.dumps(listing(ns_text))


@pytest.mark.lab
def test_a_bad_element_is_nfts_error_and_nothing_of_the_transaction_applies(
    netns: Callable[[str], str],
) -> None:
    ns = netns("e")
    manager = NftManager(SubprocessNft(ns))
    manager.set_desired(rich())
    assert arun(manager.apply()).ok
    before = listing(ns)
    nft = SubprocessNft(ns)
    add = {"add": {"element": {**BASE, "name": "cb_v4", "elem": ["10.3.0.9"]}}}

    ipv6_in_ipv4 = {"add": {"element": {**BASE, "name": "cb_v4", "elem": ["fd00::1"]}}}
    with pytest.raises(NftError) as wrong_family:
        arun(nft.run([add, ipv6_in_ipv4]))
    other_verdict = {"add": {"element": {**BASE, "name": "out_v4", "elem": [
        ["10.1.0.1", {"jump": {"target": "out_cb"}}]]}}}
    with pytest.raises(NftError) as exists:
        arun(nft.run([add, other_verdict]))

    assert "Error: Could not resolve hostname" in str(wrong_family.value)
    assert "fd00::1" in str(wrong_family.value)  # nft quotes the line at fault
    assert str(wrong_family.value).startswith("/dev/stdin:")  # it was sent as text
    assert "Error: Could not process rule: File exists" in str(exists.value)
    assert "10.1.0.1 : jump out_cb" in str(exists.value)
    assert listing(ns) == before  # 10.3.0.9 came in neither transaction
    assert arun(manager.apply(full=True)).ops == 0


@pytest.mark.lab
def test_real_nft_applies_a_transaction_the_renderer_refuses_as_json_whole(
    netns: Callable[[str], str],
) -> None:
    ns = netns("f")
    cmds = first_transaction(rich())
    odd = copy.deepcopy(next(c for c in cmds if "rule" in c["add"]))
    odd["add"]["rule"]["comment"] = 'say "hi"'
    assert transaction([*cmds, odd])[0] == ["-j", "-f", "-"]

    arun(SubprocessNft(ns).run([*cmds, odd]))

    got = listing(ns)
    comments = [e["rule"]["comment"] for e in got["nftables"] if "rule" in e]
    assert 'say "hi"' in comments
    assert len(comments) == sum(1 for c in cmds if "rule" in c["add"]) + 1
    elements = {e["set"]["name"]: len(e["set"].get("elem", [])) for e in got["nftables"]
                if "set" in e}
    assert elements["ca_v4"] == 40 and elements["infra_v4"] == 2

