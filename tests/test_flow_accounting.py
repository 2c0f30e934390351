# ruff: noqa: F811  (the netns fixture is test_nftables's, imported; tests name it)
"""Flow accounting (issue #19): the kernel's flow sets, read back into flow records.

The pure tier proves the flow table's arithmetic (deltas, priming, re-created elements,
verdicts, bounds, retention, restore). The lab tier runs the real tfcrypt table in real
namespaces (W - A - B of tests/test_nftables.py): the kernel counts each flow in the set
of where it went, the agent's collector reads exactly those flows with the verdict the
packets met on the wire, and a full apply afterwards changes nothing (the kernel's
elements are not drift). A dummy interface named like the tunnel stands in for
WireGuard here (the lab tests of tests/test_flows_lab.py use the real one).
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from test_nftables import desired, netns, ping, sh, w_a_b  # noqa: F401 (fixture)

from tfcrypt.agent.flows import Addresses, FlowCollector
from tfcrypt.core.flow_table import FlowTable
from tfcrypt.dataplane.flow_listing import parse_flow_set
from tfcrypt.dataplane.nft_json import FakeNft, SubprocessNft
from tfcrypt.dataplane.nft_table import FlowAccounting
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.model.flow import FlowSample, Verdict
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload

WG = "tfcrypt0"
W, R1, R2 = "10.77.1.2", "10.77.2.2", "10.77.2.3"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def sample(kind: str, src: str, dst: str, packets: int, *, proto: int = 17,
           dport: int | None = 80, iface: str | None = WG) -> FlowSample:
    return FlowSample(kind, src, dst, proto, dport, iface, packets, packets * 100)


def keep_all(src: str, dst: str) -> bool:
    return True


def test_a_read_adds_what_each_element_counted_since_the_last_and_priming_counts_nothing(
) -> None:
    table = FlowTable()
    assert table.ingest([sample("sel", W, R1, 5)], 1.0, WG, keep_all) == []  # primes
    deltas = table.ingest([sample("sel", W, R1, 8)], 2.0, WG, keep_all)
    assert [(d.key.verdict, d.packets, d.bytes) for d in deltas] == [
        (Verdict.WIREGUARD, 3, 300)]
    table.ingest([sample("sel", W, R1, 2)], 3.0, WG, keep_all)  # re-created: counts whole
    (record,) = table.records()
    assert (record.packets, record.bytes, record.first_seen, record.last_seen) == (
        5, 500, 2.0, 3.0)
    table.ingest([sample("sel", W, R1, 2)], 4.0, WG, keep_all)  # nothing new: unchanged
    assert table.records()[0].last_seen == 3.0


def test_a_records_times_are_its_packets_not_the_reads() -> None:
    """The element's remaining timeout says how long ago its last packet was: a flow that
    stopped 30 s before the read is last seen 30 s before it, not at the read."""
    table = FlowTable()
    table.ingest([], 0.0, WG, keep_all)
    idle = FlowSample("uns", W, R2, 17, 80, "eth0", 4, 400, idle=30.0)
    table.ingest([idle], 100.0, WG, keep_all)
    (record,) = table.records()
    assert (record.first_seen, record.last_seen) == (70.0, 70.0)
    assert parse_flow_set("seen_uns_np_v4", LISTING).samples[0].idle == 1.0  # 120 - 119


def test_the_verdict_is_where_the_kernel_counted_the_packet() -> None:
    table = FlowTable()
    table.ingest([], 0.0, WG, keep_all)
    table.ingest([sample("sel", W, R1, 1), sample("sel", W, R1, 1, iface="eth0", dport=81),
                  sample("uns", R1, W, 1), sample("uns", R2, W, 1, iface="eth0"),
                  sample("drop", R1, W, 1, iface=None, dport=82)], 1.0, WG, keep_all)
    got = {(r.key.src, r.key.dst, r.key.dport): r.key.verdict for r in table.records()}
    assert got == {(W, R1, 80): Verdict.WIREGUARD, (W, R1, 81): Verdict.GUARD_DROP,
                   (R1, W, 80): Verdict.WIREGUARD, (R2, W, 80): Verdict.PLAINTEXT,
                   (R1, W, 82): Verdict.INGRESS_DROP}


def test_flows_not_between_a_local_and_a_remote_workload_are_counted_and_forgotten() -> None:
    table = FlowTable()
    table.ingest([], 0.0, WG, keep_all)
    table.ingest([sample("uns", W, "192.0.2.1", 4)], 1.0, WG,
                 lambda s, d: "192.0.2.1" not in (s, d))
    assert table.records() == [] and table.unmatched == 1


def test_the_oldest_records_are_folded_into_totals_beyond_the_bound_and_retention() -> None:
    table = FlowTable(max_records=100, retention=60.0)
    table.ingest([], 0.0, WG, keep_all)
    for i in range(150):
        table.ingest([sample("uns", W, R1, 1, dport=i)], float(i + 1), WG, keep_all)
        assert len(table) <= 100
    ports = {r.key.dport for r in table.records()}
    assert max(ports) == 149 and min(ports) > 49  # the oldest went first
    folded = table.folded[Verdict.WIREGUARD]
    assert folded[0] + len(table) == 150 and folded[1] == folded[0]
    table.ingest([], 500.0, WG, keep_all)  # everything is older than the retention now
    assert len(table) == 0 and table.folded[Verdict.WIREGUARD][0] == 150


def test_records_survive_a_restart_through_the_state_file(tmp_path: Path) -> None:
    table = FlowTable()
    table.ingest([], 0.0, WG, keep_all)
    table.ingest([sample("uns", R2, W, 3, iface="eth0")], 100.0, WG, keep_all)
    doc = json.loads(json.dumps(table.to_json()))
    again = FlowTable()
    assert again.restore(doc, 200.0) == 1
    assert again.records() == table.records()
    assert FlowTable(retention=60.0).restore(doc, 200.0) == 0  # older than retention
    assert FlowTable().restore({"records": [{"src": "x"}], "folded": []}, 1.0) == 0


LISTING = {"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {
    "family": "inet", "name": "seen_uns_np_v4", "table": "tfcrypt",
    "type": ["ipv4_addr", "ipv4_addr", "inet_proto", "ifname"], "handle": 4, "size": 3,
    "flags": ["timeout"], "timeout": 120, "elem": [
        {"elem": {"val": {"concat": ["10.9.1.2", "10.9.2.2", "icmp", "veth0"]},
                  "expires": 119, "counter": {"packets": 3, "bytes": 252}}},
        {"elem": {"val": {"concat": ["10.9.2.2", "10.9.1.2", "icmp"]},
                  "counter": {"packets": 1, "bytes": 84}}},
        {"elem": {"val": {"concat": ["10.9.2.2", "10.9.1.2", "vrrp", "veth1"]},
                  "counter": {"packets": 1, "bytes": 84}}}]}}]}


def test_the_listing_reader_takes_the_elements_of_the_sets_shape_and_counts_the_rest() -> None:
    found = parse_flow_set("seen_uns_np_v4", LISTING)
    assert found.samples == [FlowSample("uns", "10.9.1.2", "10.9.2.2", 1, None, "veth0", 3,
                                        252, idle=1.0)]
    assert found.skipped == 2 and found.full  # 3 elements in a set of size 3


def test_flow_objects_are_in_the_table_only_when_flows_are_on_and_a_resync_keeps_them() -> None:
    fake = FakeNft()
    manager = NftManager(fake)
    on = desired(flows=FlowAccounting(size=4096))
    manager.set_desired(on)
    assert run(manager.apply()).ok
    listing = run(fake.list_table())
    sets = {e["set"]["name"]: e["set"] for e in listing["nftables"] if "set" in e}
    assert {n for n in sets if n.startswith("seen_")} == {
        f"seen_{k}{p}_{f}" for k in ("sel", "uns", "drop") for p in ("", "_np")
        for f in ("v4", "v6")}
    assert sets["seen_sel_v4"]["size"] == 4096 and sets["seen_sel_v4"]["timeout"] == 120
    assert run(manager.apply(full=True)).ops == 0
    manager.set_desired(desired())
    assert run(manager.apply()).ok
    listing = run(fake.list_table())
    assert not [e for e in listing["nftables"]
                if "set" in e and e["set"]["name"].startswith("seen_")]
    assert not [e for e in listing["nftables"]
                if "chain" in e and e["chain"]["name"] in ("forward", "fwd_v4", "drop_v4")]


UDP = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
for _ in range(int(sys.argv[4])):
    s.sendto(b"x" * 100, (sys.argv[2], int(sys.argv[3])))
"""


def udp(ns: str, src: str, dst: str, port: int, count: int) -> None:
    sh("ip", "netns", "exec", ns, sys.executable, "-c", UDP, src, dst, str(port), str(count))


def workload(name: str, node: str, ip: str) -> Workload:
    return Workload(name, node, (ip,), frozenset({Tag.parse("application=shop")}))


@pytest.mark.lab
def test_the_kernel_counts_each_flow_where_it_went_and_the_collector_reads_it(
    netns: Callable[[str], str], tmp_path: Path,
) -> None:
    """W's UDP to R1 (selected) goes to the stand-in tunnel; W's ping to R2 (unselected)
    and its reply are plaintext; R1's plaintext to W is dropped by strict ingress; with
    the tunnel's route gone, W's next UDP to R1 is dropped by the guard."""
    w, a, b = w_a_b(netns)
    sink = netns("t")  # the stand-in tunnel: a veth named like it, into a namespace
    sh("ip", "-n", a, "link", "add", WG, "type", "veth", "peer", "name", "sink", "netns", sink)
    sh("ip", "-n", a, "link", "set", WG, "up")
    sh("ip", "-n", sink, "link", "set", "sink", "up")
    sh("ip", "-n", a, "route", "add", "default", "dev", WG, "table", "100")
    sh("ip", "-n", a, "rule", "add", "fwmark", "0x100000", "lookup", "100", "priority", "100")
    manager = NftManager(SubprocessNft(a))
    manager.set_desired(desired(local={W: "cw"}, peers={"cw": {R1}}, flows=FlowAccounting()))
    assert run(manager.apply()).ok
    addresses = Addresses(lambda: [workload("w", "a", W), workload("r1", "b", R1),
                                   workload("r2", "b", R2)], "a")
    collector = FlowCollector(manager, addresses, wg_ifname=WG, state_dir=tmp_path,
                              interval=1.0, publish_interval=30.0, table=FlowTable())
    run(collector.read_once())  # primes

    udp(w, W, R1, 5000, 7)
    assert ping(w, R2)
    udp(b, R1, W, 7000, 3)
    sh("ip", "-n", a, "rule", "del", "priority", "100")
    udp(w, W, R1, 5001, 2)
    run(collector.read_once())

    got = {(r.key.src, r.key.dst, r.key.proto, r.key.dport, r.key.verdict): r.packets
           for r in collector.table.records()}
    assert got == {
        (W, R1, "udp", 5000, Verdict.WIREGUARD): 7,
        (W, R2, "icmp", None, Verdict.PLAINTEXT): 1,
        (R2, W, "icmp", None, Verdict.PLAINTEXT): 1,
        (R1, W, "udp", 7000, Verdict.INGRESS_DROP): 3,
        (W, R1, "udp", 5001, Verdict.GUARD_DROP): 2,
    }
    counters = run(manager.counters())
    assert counters["ingress_drops"][0] == 3 and counters["guard_drops"][0] == 2
    assert run(manager.apply(full=True)).ops == 0  # the kernel's elements are not drift

    doc = collector.records_doc([])
    row = next(r for r in doc["flows"] if r["verdict"] == "ingress_drop")
    assert (row["direction"], row["local"], row["remote"], row["remote_node"]) == (
        "in", "w", "r1", "b")
    collector.save()
    again = FlowCollector(manager, addresses, wg_ifname=WG, state_dir=tmp_path,
                          interval=1.0, publish_interval=30.0, table=FlowTable())
    again.restore()
    run(again.read_once())  # a restart: primes on the kernel's counters, counts nothing twice
    udp(w, W, R2, 5002, 1)  # R2 answers with an ICMP port unreachable: plaintext too
    run(again.read_once())
    after = {(r.key.src, r.key.dst, r.key.proto, r.key.dport, r.key.verdict): r.packets
             for r in again.table.records()}
    assert after == {**got, (W, R2, "udp", 5002, Verdict.PLAINTEXT): 1,
                     (R2, W, "icmp", None, Verdict.PLAINTEXT): 2}
