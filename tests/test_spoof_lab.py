"""A workload wearing its neighbour's address (issue #14 item 7), on the wire.

Two nodes, two workloads each. One policy selects n1-w1 (application=pay) with every
workload of n2; n1-w2, on the same node, is unselected. n1-w2 sends UDP with n1-w1's
address as its source (a socket with IP_TRANSPARENT, as any root process in a pod can).
Before, n1 classified the packet by its source, marked it, and carried it inside the
tunnel to n2, which delivered it to n2-w1 as coming from n1-w1. Now the selected path's
reverse-path check (`fib saddr . iif oif missing`, tfcrypt/dataplane/nft_rules.py) drops
it on n1 and counts it: nothing of it crosses the underlay, in plaintext or inside
WireGuard, and the receiver sees nothing. The genuine pair and the unselected workload's
own traffic are controls. The lab is dual-stack and every test runs in both families
(IPv6: IPV6_TRANSPARENT, the same `fib saddr . iif` check in the `ip6` rules).
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
from labtools import wait_for

from netns_lab import Lab, agents, inventory
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

PORT = 40001
BURST = 20
POLICY = """apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: pay}
spec:
  mode: enforce
  rules:
    - endpoint1: {tags: [application=pay]}
      endpoint2: {any: true}
"""
SEND = """
import socket, sys, time
src, dst, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
v6 = ":" in src
s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM)
# IP_TRANSPARENT / IPV6_TRANSPARENT: any source address, as root may
s.setsockopt(*((socket.IPPROTO_IPV6, 75) if v6 else (socket.SOL_IP, 19)), 1)
s.bind((src, 0))
for _ in range(n):
    s.sendto(b"x" * 1000, (dst, port))
    time.sleep(0.02)
"""
# WireGuard data packets carrying our 1,000-byte datagrams; handshakes and keepalives
# are far smaller, so this counts exactly what the sender put in the tunnel
IN_TUNNEL = "udp port 51820 and greater 900"
PLAIN = f"udp port {PORT}"


def workload_ip(lab: Lab, name: str, family: int = 4) -> str:
    return str(next(w["ip" if family == 4 else "ip6"] for w in lab.status()["workloads"]
                    if w["name"] == name))


def send(lab: Lab, workload: str, src: str, dst: str) -> None:
    subprocess.run([*lab.exec_prefix(workload), sys.executable, "-c", SEND, src, dst,
                    str(PORT), str(BURST)], check=True, capture_output=True, timeout=60)


def status(lab: Lab, node: str) -> dict[str, Any] | None:
    out = subprocess.run([*lab.exec_prefix(node), sys.executable, "-m", "tfcrypt", "status",
                          "--json"], capture_output=True, text=True, timeout=60)
    return json.loads(out.stdout) if out.stdout.strip() else None


def spoof_drops(lab: Lab) -> int:
    st = status(lab, "n1") or {}
    return int(st.get("drops", {}).get("spoof", {}).get("packets", 0))


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=2, ipv6=True) as lab:
        inventory.publish_workloads(lab, {"n1-w1": ["application=pay"]})
        policy = tmp_path_factory.mktemp("policy") / "pay.yaml"
        policy.write_text(POLICY)
        inventory.apply_policy(lab, policy)
        agents.start_all(lab)
        for node in ("n1", "n2"):
            wait_for(f"{node} healthy with its selected pairs", lambda n=node: (
                (st := status(lab, n)) and st["health"]["healthy"]
                and st["selected_pairs"] == 8))  # 2 workload pairs x 2 x 2 addresses
        assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=3, interval=0.1) == 3
        yield lab


def burst(lab: Lab, tmp_path: Path, sender: str, src: str) -> tuple[int, int, int]:
    """(plaintext on the underlay, inside WireGuard on the underlay, received by n2-w1)
    for one burst from `sender` with source `src` to n2-w1 (in `src`'s family)."""
    dst = workload_ip(lab, "n2-w1", 6 if ":" in src else 4)
    wire, received = tmp_path / f"{sender}-underlay.pcap", tmp_path / f"{sender}-rx.pcap"
    with capture(lab, wire, "udp"), capture(lab, received, PLAIN, target="n2-w1"):
        send(lab, sender, src, dst)
    return (count_packets(wire, PLAIN), count_packets(wire, IN_TUNNEL),
            count_packets(received, f"src {src} and {PLAIN}"))


FAMILY = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


@FAMILY
def test_a_workload_wearing_its_selected_neighbours_address_gets_nothing_through(
        lab: Lab, tmp_path: Path, family: int) -> None:
    w1 = workload_ip(lab, "n1-w1", family)
    before = spoof_drops(lab)

    plain, tunnel, received = burst(lab, tmp_path, "n1-w2", w1)

    assert (plain, tunnel, received) == (0, 0, 0), (
        f"spoofed from n1-w2 as {w1}: {plain} plaintext, {tunnel} inside WireGuard on the "
        f"underlay, {received} delivered to n2-w1")
    wait_for("n1's status to count the spoofed packets",
             lambda: spoof_drops(lab) >= before + BURST)


@FAMILY
def test_the_genuine_pair_still_crosses_inside_wireguard(lab: Lab, tmp_path: Path,
                                                          family: int) -> None:
    w1 = workload_ip(lab, "n1-w1", family)
    before = spoof_drops(lab)

    plain, tunnel, received = burst(lab, tmp_path, "n1-w1", w1)

    assert plain == 0 and tunnel > 0 and received == BURST, (plain, tunnel, received)
    assert spoof_drops(lab) == before


@FAMILY
def test_the_unselected_workloads_own_traffic_still_crosses_in_plaintext(
        lab: Lab, tmp_path: Path, family: int) -> None:
    w2 = workload_ip(lab, "n1-w2", family)

    plain, tunnel, received = burst(lab, tmp_path, "n1-w2", w2)

    assert plain > 0 and tunnel == 0 and received == BURST, (plain, tunnel, received)
