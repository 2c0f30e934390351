"""Seen traffic in the lab (issue #19): what the agents record is what the underlay saw.

3 nodes x 3 workloads, the payments policy enforced (application=payments to anything:
n1-w1 and n2-w2 with every workload on another node). Workloads send UDP to chosen
ports; tcpdump on the underlay says which flows crossed in plaintext, and each node's
`tfcrypt flows` must list exactly those flows, with the same verdict and the packet
counts that were sent. Tests run in file order on one lab.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from labtools import agent_status, etcdctl, run_in, wait_for

from netns_lab import Lab, agents, inventory
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).parent.parent / "examples"
TAGS = {
    "n1-w1": ["application=payments", "site=a"],
    "n1-w2": ["application=shop", "tier=api", "site=a"],
    "n1-w3": ["application=shop", "tier=db", "label=pci"],
    "n2-w1": ["application=shop", "tier=db", "site=a"],
    "n2-w2": ["application=payments", "site=b"],
    "n2-w3": ["application=web", "site=a"],
    "n3-w1": ["application=shop", "tier=api", "site=b"],
    "n3-w2": ["application=shop", "tier=db", "site=b"],
    "n3-w3": ["application=web", "label=pci"],
}


def ip(name: str) -> str:
    """n<i>-w<j> has 10.200.i.(10+j) (netns_lab/layout.py)."""
    node, w = name.split("-w")
    return f"10.200.{node[1:]}.{10 + int(w)}"


SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
spread = len(sys.argv) > 5
for i in range(int(sys.argv[4])):
    s.sendto(b"x" * 64, (sys.argv[2], int(sys.argv[3]) + (i if spread else 0)))
    if not spread or i % 500 == 499:
        time.sleep(0.002)  # paced: a burst would overrun a queue on the way, not tfcrypt
"""


def send(lab: Lab, src: str, dst: str, port: int, count: int, spread: bool = False) -> None:
    """`count` UDP datagrams from workload `src` to `dst` port `port` (or to `count`
    distinct ports from `port` with `spread`)."""
    run_in(lab, src, [sys.executable, "-c", SEND, ip(src), ip(dst), str(port), str(count),
                      *(["spread"] if spread else [])], timeout=120)


def flows(lab: Lab, node: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, "-m", "tfcrypt", "flows", "--json",
                          "--status-socket", str(agents.status_socket(lab, node)), *args],
                         capture_output=True, text=True, check=True, timeout=60)
    rows: list[dict[str, Any]] = json.loads(out.stdout)
    return rows


def udp_flows(lab: Lab, node: str, ports: range) -> dict[tuple[str, str, int, str], int]:
    """(src, dst, dport, verdict) -> packets of `node`'s UDP records on `ports`."""
    return {(r["src"], r["dst"], r["dport"], r["verdict"]): r["packets"]
            for r in flows(lab, node) if r["proto"] == "udp" and r["dport"] in ports}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=3, workloads_per_node=3) as lab:
        inventory.publish_workloads(lab, TAGS)
        inventory.apply_policy(lab, EXAMPLES / "payments.yaml")
        agents.start_all(lab)
        pairs = {"n1": 8, "n2": 8, "n3": 6}  # (local, remote) pairs each node selects
        wait_for("the agents to enforce the payments policy",
                 lambda: all(agent_status(lab, n).get("selected_pairs") == k
                             for n, k in pairs.items()), timeout=60)
        yield lab


def test_each_node_lists_exactly_the_flows_it_carried_with_the_verdict_the_wire_shows(
    lab: Lab, tmp_path: Path,
) -> None:
    pcap = tmp_path / "underlay.pcap"
    ports = range(5100, 5110)
    for a, b in (("n1-w1", "n2-w1"), ("n1-w2", "n3-w1"), ("n3-w2", "n2-w2")):
        assert ping(lab, a, ip(b), count=1), f"{a} cannot reach {b}"  # neighbours learnt
    with capture(lab, pcap):
        send(lab, "n1-w1", "n2-w1", 5101, 20)   # selected: payments to anything
        send(lab, "n1-w2", "n3-w1", 5102, 15)   # unselected: shop api to shop api
        send(lab, "n3-w2", "n2-w2", 5103, 10)   # selected: anything to payments
    assert count_packets(pcap, "udp and dst port 5101") == 0
    # each frame shows on two bridge ports (netns_lab/wire.py `capture`)
    assert count_packets(pcap, f"udp and dst port 5102 and src host {ip('n1-w2')}") == 2 * 15
    assert count_packets(pcap, "udp and dst port 5103") == 0
    assert count_packets(pcap, "udp port 51820") >= 30

    want = {
        "n1": {(ip("n1-w1"), ip("n2-w1"), 5101, "wireguard"): 20,
               (ip("n1-w2"), ip("n3-w1"), 5102, "plaintext"): 15},
        "n2": {(ip("n1-w1"), ip("n2-w1"), 5101, "wireguard"): 20,
               (ip("n3-w2"), ip("n2-w2"), 5103, "wireguard"): 10},
        "n3": {(ip("n1-w2"), ip("n3-w1"), 5102, "plaintext"): 15,
               (ip("n3-w2"), ip("n2-w2"), 5103, "wireguard"): 10},
    }
    for node, expected in want.items():
        wait_for(f"{node}'s flow records", lambda n=node, e=expected: udp_flows(lab, n, ports) == e,
                 timeout=60)

    (row,) = [r for r in flows(lab, "n1", "--workload", "n1-w1") if r["dport"] == 5101]
    assert (row["direction"], row["local"], row["remote"], row["remote_node"], row["rules"]) == (
        "out", "n1-w1", "n2-w1", "n2", ["payments#0"])
    plain = flows(lab, "n1", "--verdict", "plaintext", "--tag", "tier=api", "--since", "10m")
    assert {(r["local"], r["remote"]) for r in plain if r["proto"] == "udp"} == {
        ("n1-w2", "n3-w1")}
    text = subprocess.run([sys.executable, "-m", "tfcrypt", "flows", "--status-socket",
                           str(agents.status_socket(lab, "n2")), "--workload", "n2-w2"],
                          capture_output=True, text=True, check=True).stdout
    assert "n2-w2 10.200.2.12" in text and "udp/5103" in text and "wireguard" in text


def test_injected_plaintext_of_a_selected_pair_is_recorded_as_a_strict_ingress_drop(
    lab: Lab,
) -> None:
    script = Path(__file__).parent / "lab_scripts" / "inject_icmp.py"
    subprocess.run([*lab.exec_prefix("n1"), sys.executable, str(script), ip("n1-w1"),
                    ip("n2-w3"), "eth0", "5"], check=True, capture_output=True, timeout=30)

    def dropped() -> int:
        return sum(r["packets"] for r in flows(lab, "n2", "--verdict", "ingress_drop")
                   if (r["src"], r["dst"], r["proto"]) == (ip("n1-w1"), ip("n2-w3"), "icmp"))

    wait_for("n2 to record the injected packets as strict-ingress drops",
             lambda: dropped() >= 5, timeout=60)
    assert dropped() == 5
    assert not [r for r in flows(lab, "n1") if r["verdict"] == "ingress_drop"]


def test_each_agent_publishes_its_signed_report_beside_the_watched_prefix(lab: Lab) -> None:
    wait_for("every node's flow report in etcd", lambda: all(
        etcdctl(lab, "get", f"/tfcrypt/v1-seen/flows/{n}", "--print-value-only").strip()
        for n in ("n1", "n2", "n3")), timeout=90)
    value = json.loads(etcdctl(lab, "get", "/tfcrypt/v1-seen/flows/n3", "--print-value-only"))
    payload = json.loads(value["payload"])
    assert payload["kind"] == "FlowReport" and payload["node"] == "n3"
    assert {(f["src"], f["dst"], f["dport"], f["verdict"]) for f in payload["flows"]} >= {
        (ip("n1-w2"), ip("n3-w1"), 5102, "plaintext"),
        (ip("n3-w2"), ip("n2-w2"), 5103, "wireguard")}
    assert set(payload["handshakes"]) == {"n1", "n2"}
    assert not etcdctl(lab, "get", "/tfcrypt/v1/flows/", "--prefix", "--keys-only").strip()


def test_a_flood_of_distinct_flows_stays_within_the_bounds_and_the_agent_keeps_working(
    lab: Lab,
) -> None:
    """100,000 one-packet flows from n1-w2 to n3-w1 and n3-w2 (50,000 ports each): the
    kernel's set holds what it can, the agent keeps at most flows_max_records records and
    keeps reconciling."""
    for dst in ("n3-w1", "n3-w2"):
        send(lab, "n1-w2", dst, 10000, 50000, spread=True)
    wait_for("n3's flow sets to be read after the flood",
             lambda: agent_status(lab, "n3")["flows"]["records"] > 15000, timeout=90)
    st = agent_status(lab, "n3")["flows"]
    assert st["records"] <= 20000 and st["last_error"] is None
    assert st["full_sets"] == ["seen_uns_v4"]  # 65,536 flows: the rest went uncounted
    pid = agents.running_agent(lab, "n3").pid  # type: ignore[union-attr]
    rss_kib = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text()
                       .splitlines() if line.startswith("VmRSS:")))
    assert rss_kib < 400 * 1024, f"agent RSS {rss_kib // 1024} MiB after the flood"

    reconciled = agent_status(lab, "n3")["last_reconcile"]["at"]
    inventory.set_workload(lab, "n3-w1", ["application=payments", "site=b"])
    wait_for("n3 to reconcile the workload change after the flood",
             lambda: agent_status(lab, "n3")["last_reconcile"]["at"] != reconciled
             and agent_status(lab, "n3")["selected_pairs"] == 10, timeout=60)
    inventory.set_workload(lab, "n3-w1", TAGS["n3-w1"])
