"""Infrastructure addresses can never be selected (issue #14 item 2), proven in the lab.

A workload record may claim an address that is not a workload's: a host-network pod's
address is its node's underlay address, and nothing stops a careless (or hostile)
inventory from naming the etcd endpoint. With a catch-all enforce policy, selecting such
an address used to black-hole node-to-node traffic (strict ingress dropped the underlay's
plaintext, WireGuard's own UDP included) and cut nodes off etcd for good. Now every
verified node's addresses, the agent's own and the etcd endpoints are infrastructure:
refused by the core, and never marked by the ruleset whatever its sets hold.

3 nodes x 1 workload, one etcd member (10.77.0.2), underlay 10.77.0.1x; tests run in
file order on one lab. Agents run with a 1 s workload grace so a deleted record's
addresses are released quickly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import running_lab
from labtools import agent_status, run_in, wait_for, workload_ip

from netns_lab import Lab, agents, inventory
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).parent.parent / "examples"
NODES = ("n1", "n2", "n3")
TAGS = {"n1-w1": ["application=shop"], "n2-w1": ["application=shop"],
        "n3-w1": ["application=shop"]}


def node_ip(lab: Lab, node: str) -> str:
    return next(n["underlay_ip"] for n in lab.status()["nodes"] if n["name"] == node)


def etcd_ip(lab: Lab) -> str:
    return lab.status()["etcd"]["endpoints"][0].split("//")[1].split(":")[0]


def etcd_healthy_from(lab: Lab, node: str) -> bool:
    """etcd answers the node itself (its own traffic, from its underlay address)."""
    endpoints = ",".join(lab.status()["etcd"]["endpoints"])
    out = run_in(lab, node, ["etcdctl", f"--endpoints={endpoints}", "--dial-timeout=2s",
                             "--command-timeout=3s", "endpoint", "health"], check=False,
                 timeout=15)
    return out.returncode == 0


def workloads_seen(lab: Lab, node: str) -> int:
    return int(agent_status(lab, node).get("workloads", -1))


def start_agents(lab: Lab) -> None:
    for node in lab.layout.all_nodes():
        agents.state_dir(lab, node.name).mkdir(parents=True, exist_ok=True, mode=0o700)
        agents.start_agent_argv(lab, node.name, [*agents.agent_argv(lab, node),
                                                 "--workload-grace", "1"])


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=3, workloads_per_node=1) as lab:
        inventory.publish_workloads(lab, TAGS)
        inventory.apply_policy(lab, EXAMPLES / "encrypt-all.yaml")
        start_agents(lab)
        wait_for("every agent to select its pairs", lambda: all(
            agent_status(lab, n).get("selected_pairs") == 2 for n in NODES), timeout=30)
        yield lab


def test_workloads_holding_node_addresses_never_cut_node_to_node_traffic(
        lab: Lab, tmp_path: Path) -> None:
    """Host-network pods' records (each node's underlay address) under encrypt-all:
    nodes still reach each other and etcd in plaintext, and the ordinary workload pairs
    still cross only inside WireGuard."""
    for node in NODES:
        said = inventory.set_workload(lab, f"{node}-host", ["application=shop"], node=node,
                                      ips=[node_ip(lab, node)])
        assert (f"{node_ip(lab, node)} is infrastructure (node address): agents refuse it "
                "for selection") in said, said
    wait_for("every agent to see the host-network records",
             lambda: all(workloads_seen(lab, n) == 6 for n in NODES), timeout=20)
    wait_for("every agent to reconcile after them", lambda: all(
        not agent_status(lab, n)["last_reconcile"].get("errors") for n in NODES))
    pcap = tmp_path / "nodes.pcap"
    a, b = workload_ip(lab, "n1-w1"), workload_ip(lab, "n2-w1")
    with capture(lab, pcap):
        node_pings = {(x, y): ping(lab, x, node_ip(lab, y), count=3, interval=0.1)
                      for x in NODES for y in NODES if x != y}
        etcd_ok = {n: etcd_healthy_from(lab, n) for n in NODES}
        pair = ping(lab, "n1-w1", b, count=3, interval=0.1)
    assert all(r == 3 for r in node_pings.values()), f"node-to-node replies: {node_pings}"
    assert all(etcd_ok.values()), f"etcd health from each node: {etcd_ok}"
    assert pair == 3, "the selected workload pair lost its traffic"
    assert count_packets(pcap, f"icmp and host {a} and host {b}") == 0, "plaintext leaked"
    assert count_packets(pcap, "udp port 51820") > 0
    n1, n2 = node_ip(lab, "n1"), node_ip(lab, "n2")
    assert count_packets(pcap, f"icmp and host {n1} and host {n2}") > 0, (
        "node-to-node traffic was carried in the tunnel: infrastructure was selected")
    refused = agent_status(lab, "n1").get("refused", {})
    assert refused.get("by_reason") == {"node address": 3}, refused
    out = inventory.tfcrypt(lab, "explain", a, n2)
    assert f"{n2} is infrastructure (node address): refused for selection" in out, out


def test_a_workload_holding_the_etcd_address_never_cuts_nodes_off_etcd(lab: Lab) -> None:
    """With the host-network records still there, a record claiming etcd's address:
    every node keeps etcd while it exists (before, strict ingress dropped etcd's
    replies to the node addresses), and after it is deleted every agent keeps hearing
    updates."""
    before = {n: agent_status(lab, n)["last_reconcile"].get("at") for n in NODES}
    inventory.set_workload(lab, "squatter", ["application=shop"], node="n2",
                           ips=[etcd_ip(lab)])
    wait_for("every agent to see the squatter and reconcile", lambda: all(
        workloads_seen(lab, n) == 7
        and agent_status(lab, n)["last_reconcile"].get("at") != before[n] for n in NODES),
        timeout=20)
    etcd_ok = {n: etcd_healthy_from(lab, n) for n in NODES}
    assert all(etcd_ok.values()), f"etcd health from each node: {etcd_ok}"
    assert agent_status(lab, "n1")["refused"]["by_reason"] == {
        "etcd endpoint": 1, "node address": 3}
    out = inventory.tfcrypt(lab, "explain", workload_ip(lab, "n1-w1"), etcd_ip(lab))
    assert f"{etcd_ip(lab)} is infrastructure (etcd endpoint)" in out, out
    inventory.tfcrypt(lab, "workload", "delete", "squatter")
    inventory.set_workload(lab, "latecomer", ["application=shop"], node="n3",
                           ips=["10.200.3.99"])
    wait_for("every agent to hear the deletion and the next record", lambda: all(
        workloads_seen(lab, n) == 7 and agent_status(lab, n)["etcd"]["connected"]
        and agent_status(lab, n)["refused"]["by_reason"] == {"node address": 3}
        for n in NODES), timeout=20)
    assert all(etcd_healthy_from(lab, n) for n in NODES)
