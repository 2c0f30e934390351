"""Dual-stack on the wire (issue #14, "What to add"): IPv6 proven by capture on the underlay.

Two nodes, two workloads each, every workload with an IPv4 and an IPv6 (ULA) address,
published with both. One policy selects n1-w1 (application=payments) with anything; n1-w2
is unselected. The module runs twice: on a dual-stack underlay (WireGuard endpoints over
IPv4, the lab's `ipv6=True`) and on an IPv6-only underlay (`underlay="v6"`: etcd, the
controller and the WireGuard endpoints over IPv6, unselected IPv4 routed via IPv6 next
hops). On each: selected pairs cross only inside WireGuard, in both inner families, and
WireGuard itself runs over the underlay's family; unselected pairs cross in plaintext;
killing wireguard-go under IPv6 traffic leaks no plaintext of the selected pair (guard,
fail-closed routes); injected IPv6 plaintext of a selected pair is dropped by the
receiver and never reaches the workload (strict ingress); a peer whose record is gone
gets nothing (prohibit). Tests run in file order on one lab per underlay.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from faults import wireguard_go_pid
from labtools import agent_status, remove_node, wait_for

from netns_lab import Lab, agents, inventory
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).parent.parent / "examples"
TAGS = {"n1-w1": ["application=payments"], "n1-w2": ["application=shop"],
        "n2-w1": ["application=web"], "n2-w2": ["application=shop"]}
SELECTED = [("n1-w1", "n2-w1"), ("n1-w1", "n2-w2")]
UNSELECTED = [("n1-w2", "n2-w1"), ("n1-w2", "n2-w2")]
WG = "udp port 51820"


def ips(lab: Lab) -> dict[str, dict[int, str]]:
    """Workload name -> {4: its IPv4 address, 6: its IPv6 address}."""
    return {w["name"]: {4: w["ip"], 6: w["ip6"]} for w in lab.status()["workloads"]}


def icmp(family: int, a: str, b: str) -> str:
    return f"{'icmp' if family == 4 else 'icmp6'} and host {a} and host {b}"


def converged(lab: Lab) -> bool:
    """Both agents enforce payments with both families: n1 allows n2-w1's
    and n2-w2's two addresses each through n2, n2 allows n1-w1's two through n1."""
    for node, allowed in (("n1", 4), ("n2", 2)):
        st = agent_status(lab, node)
        if not st.get("selected_pairs") or st["last_reconcile"].get("errors"):
            return False
        if [p["allowed_ip_count"] for p in st["peers"]] != [allowed]:
            return False
    return True


@pytest.fixture(scope="module", params=["v4", "v6"], ids=["dual-stack", "ipv6-underlay"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=2, ipv6=True, underlay=request.param) as lab:
        inventory.publish_workloads(lab, TAGS)
        inventory.apply_policy(lab, EXAMPLES / "payments.yaml")
        agents.start_all(lab)
        wait_for("the agents to enforce payments over both families",
                 lambda: converged(lab), timeout=60)
        yield lab


def v6_underlay(lab: Lab) -> bool:
    return bool(lab.status()["underlay_family"] == "v6")


def test_the_lab_is_dual_stack_and_the_agents_report_both_addresses(lab: Lab) -> None:
    st = agent_status(lab, "n1")
    assert st["local_workloads"] == [
        {"name": "n1-w1", "ips": ["10.200.1.11", "fd00:200:1::11"]},
        {"name": "n1-w2", "ips": ["10.200.1.12", "fd00:200:1::12"]}]
    peer = st["peers"][0]
    assert {"10.200.2.11/32", "fd00:200:2::11/128"} <= set(peer["allowed_ips"])
    if v6_underlay(lab):
        assert peer["endpoint"] == "[fd00:77::12]:51820"
        assert st["mtu"] == 1420  # 1500 - 80: WireGuard over IPv6
    else:
        assert peer["endpoint"] == "10.77.0.12:51820"
    out = subprocess.run([*lab.exec_prefix("n1"), sys.executable, "-m", "tfcrypt", "status",
                          "--json"], capture_output=True, text=True, check=True).stdout
    assert '"fd00:200:1::12"' in out
    explained = inventory.tfcrypt(lab, "explain", "fd00:200:1::11", "fd00:200:2::11")
    assert "not selected" not in explained and "payments rule 0: selects" in explained
    assert "not selected" in inventory.tfcrypt(lab, "explain", "fd00:200:1::12",
                                               "fd00:200:2::11")


@pytest.mark.parametrize("family", [6, 4])
def test_selected_pairs_cross_only_inside_wireguard_unselected_in_plaintext(
        lab: Lab, tmp_path: Path, family: int) -> None:
    addr = ips(lab)
    pcap = tmp_path / f"split{family}.pcap"
    with capture(lab, pcap, bpf="ip or ip6"):
        got = {p: ping(lab, p[0], addr[p[1]][family], count=3, interval=0.1)
               for p in SELECTED + UNSELECTED}
        for p in [p for p, n in got.items() if not n]:   # a handshake lost: one slower try
            got[p] = ping(lab, p[0], addr[p[1]][family], count=4, interval=2)
    assert all(got.values()), f"pairs without replies: {got}"
    leaked = {p: n for p in SELECTED
              if (n := count_packets(pcap, icmp(family, addr[p[0]][family],
                                                addr[p[1]][family])))}
    assert not leaked, f"selected pairs seen in plaintext on the underlay: {leaked}"
    for a, b in UNSELECTED:
        assert count_packets(pcap, icmp(family, addr[a][family], addr[b][family])) > 0
    outer, other = ("ip6", "ip") if v6_underlay(lab) else ("ip", "ip6")
    assert count_packets(pcap, f"{outer} and {WG}") > 0
    assert count_packets(pcap, f"{other} and {WG}") == 0, "WireGuard over the wrong family"


@pytest.mark.parametrize("family", [6, 4])
def test_a_full_size_packet_crosses_the_tunnel_unfragmented(
        lab: Lab, tmp_path: Path, family: int) -> None:
    """The tunnel MTU is the underlay's minus 80 (WireGuard over IPv6: 40 + 8 + 32), so
    a packet of exactly the tunnel MTU, DF set, crosses and its WireGuard packet fits the
    underlay whole: no fragment of it on the wire, over either underlay family. (With 60,
    right for an IPv4 underlay only, this fails on the IPv6-only underlay.)"""
    mtu = agent_status(lab, "n1")["mtu"]
    assert mtu == 1420
    addr = ips(lab)
    (a, b) = SELECTED[0]
    header = 48 if family == 6 else 28   # IP + ICMP headers inside the tunnel
    pcap = tmp_path / f"full{family}.pcap"
    with capture(lab, pcap, bpf="ip or ip6"):
        got = subprocess.run([*lab.exec_prefix(a), "ping", f"-{family}", "-c", "3", "-i", "0.2",
                              "-W", "2", "-M", "do", "-s", str(mtu - header), addr[b][family]],
                             capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stdout + got.stderr
    assert count_packets(pcap, f"{WG} and greater 1400") > 0
    fragments = ("ip6[6] == 44" if v6_underlay(lab)
                 else "ip and (ip[6:2] & 0x3fff) != 0")
    assert count_packets(pcap, fragments) == 0, "WireGuard packets were fragmented"


def test_killing_wireguard_go_under_ipv6_traffic_leaks_no_plaintext(
        lab: Lab, tmp_path: Path) -> None:
    addr = ips(lab)
    (sa, sb), (ua, ub) = SELECTED[0], UNSELECTED[0]
    wg_pid = wireguard_go_pid(lab, "n1")
    assert wg_pid is not None
    pcap = tmp_path / "kill6.pcap"

    def pinger(src: str, dst: str) -> subprocess.Popen[str]:
        return subprocess.Popen([*lab.exec_prefix(src), "ping", "-6", "-n", "-q", "-i", "0.05",
                                 "-c", "120", "-W", "1", dst], stdout=subprocess.PIPE,
                                text=True)

    with capture(lab, pcap, bpf="ip6"):
        sel, uns = pinger(sa, addr[sb][6]), pinger(ua, addr[ub][6])
        time.sleep(1)
        subprocess.run(["kill", "-9", str(wg_pid)], check=True)
        uns_out, _ = uns.communicate(timeout=60)
        sel.communicate(timeout=60)
    assert count_packets(pcap, icmp(6, addr[sa][6], addr[sb][6])) == 0, "plaintext leaked"
    assert " 0% packet loss" in uns_out, uns_out
    wait_for("the agent to restore the tunnel",
             lambda: wireguard_go_pid(lab, "n1") not in (None, wg_pid)
             and ping(lab, sa, addr[sb][6]) == 3, timeout=30)


def drops(lab: Lab, node: str) -> dict[str, Any]:
    return dict(agent_status(lab, node)["drops"])


def test_injected_ipv6_plaintext_of_a_selected_pair_is_dropped_by_the_receiver(
        lab: Lab, tmp_path: Path) -> None:
    addr = ips(lab)
    a, b = addr["n1-w1"][6], addr["n2-w1"][6]
    before = drops(lab, "n2")["strict_ingress"]["packets"]
    script = Path(__file__).parent / "lab_scripts" / "inject_icmp.py"
    pcap, seen = tmp_path / "inject-ul.pcap", tmp_path / "inject-wl.pcap"
    with capture(lab, seen, bpf="ip6", target="n2-w1"), capture(lab, pcap, bpf="ip6"):
        subprocess.run([*lab.exec_prefix("n1"), sys.executable, str(script), a, b, "eth0",
                        "5"], check=True, capture_output=True, timeout=30)
        wait_for("n2's strict ingress to count the injected packets",
                 lambda: drops(lab, "n2")["strict_ingress"]["packets"] >= before + 5)
    assert count_packets(pcap, f"icmp6 and src {a} and dst {b}") > 0, "nothing was injected"
    assert count_packets(seen, f"icmp6 and src {a}") == 0, "the workload was handed them"


def test_a_removed_peer_record_drops_selected_ipv6_instead_of_leaking(
        lab: Lab, tmp_path: Path) -> None:
    """Last: it stops n2's agent and deletes its record."""
    addr = ips(lab)
    remove_node(lab, "n2", seen_by="n1")
    (sa, sb), (ua, ub) = SELECTED[0], UNSELECTED[0]
    pcap = tmp_path / "removed6.pcap"
    with capture(lab, pcap, bpf="ip6"):
        assert ping(lab, sa, addr[sb][6]) == 0
        assert ping(lab, ua, addr[ub][6]) == 3
    assert count_packets(pcap, icmp(6, addr[sa][6], addr[sb][6])) == 0
    assert count_packets(pcap, icmp(6, addr[ua][6], addr[ub][6])) > 0
    assert "n2" in agent_status(lab, "n1")["missing_peers"]
