"""`python -m netns_lab demo`: bring up a lab with tfcrypt agents and prove on the wire
that traffic between workloads on different nodes crosses the underlay only inside
WireGuard.

This is the demo of the identity-bound mesh (every cross-node flow encrypted, TF's
encryption-mode all). The tag-selective demo replaces the expectation column once
policies exist. Exit status is non-zero if any row's observation differs from its
expectation.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import agents, inventory
from .errors import LabError
from .lab import Lab, down
from .layout import Layout
from .wire import capture, count_packets, ping

PINGS = 3
ENCRYPT_ALL = Path(__file__).resolve().parent.parent / "examples" / "encrypt-all.yaml"


TUNNEL = "inside WireGuard"
PLAINTEXT = "plaintext"


@dataclass(frozen=True)
class Row:
    """One flow: what tfcrypt should do with it and what the underlay capture saw."""

    src: str
    dst: str
    expected: str
    received: int
    plaintext: int
    tunnel: int

    @property
    def observed(self) -> str:
        if self.received == 0:
            return "no traffic"
        if self.plaintext:
            return PLAINTEXT
        return TUNNEL if self.tunnel else "not seen"

    @property
    def ok(self) -> bool:
        return self.observed == self.expected and self.received == PINGS


class Progress:
    def __init__(self, steps: int) -> None:
        self.steps, self.n, self.t0 = steps, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.steps} +{time.monotonic() - self.t0:5.1f}s] {what}",
              flush=True)


def _agent_status(lab: Lab, node: str) -> dict[str, Any]:
    try:
        return json.loads((agents.state_dir(lab, node) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_for_enforcement(lab: Lab, timeout: float = 30.0) -> None:
    """Every agent has every other node as a verified peer and has classified traffic."""
    nodes = [n["name"] for n in lab.status()["nodes"]]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [_agent_status(lab, n) for n in nodes]
        if all(len(st.get("peers", ())) == len(nodes) - 1 and st.get("selected_pairs")
               and not st.get("last_reconcile", {}).get("errors", True) for st in states):
            return
        time.sleep(0.3)
    raise LabError(f"the agents did not converge in {timeout:.0f}s: "
                   f"{json.dumps({n: _agent_status(lab, n) for n in nodes})[:2000]}")


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    target: str  # the lab target that sends the ping
    src_ip: str
    dst_ip: str
    src_node_ip: str
    dst_node_ip: str
    expected: str


def _flows(status: dict[str, Any]) -> list[Flow]:
    """Every cross-node workload pair, plus node-to-node as a control that the capture
    does see plaintext when there is some."""
    node_ip = {n["name"]: n["underlay_ip"] for n in status["nodes"]}
    flows = [Flow(a["name"], b["name"], a["name"], a["ip"], b["ip"], node_ip[a["node"]],
                  node_ip[b["node"]], TUNNEL)
             for a, b in itertools.combinations(status["workloads"], 2)
             if a["node"] != b["node"]]
    n1, n2 = status["nodes"][:2]
    flows.append(Flow(f"{n1['name']} (node)", f"{n2['name']} (node)", n1["name"],
                      n1["underlay_ip"], n2["underlay_ip"], n1["underlay_ip"],
                      n2["underlay_ip"], PLAINTEXT))
    return flows


def _measure(lab: Lab, workdir: Path) -> list[Row]:
    flows = _flows(lab.status())
    pcap = workdir / "underlay.pcap"
    with capture(lab, pcap):
        received = [ping(lab, f.target, f.dst_ip, PINGS) for f in flows]
    return [Row(f.src, f.dst, f.expected, got,
                plaintext=count_packets(pcap, f"icmp and host {f.src_ip} and host {f.dst_ip}"),
                tunnel=count_packets(pcap, f"udp port 51820 and host {f.src_node_ip} "
                                           f"and host {f.dst_node_ip}"))
            for f, got in zip(flows, received, strict=True)]


def _table(rows: list[Row]) -> str:
    head = ("source", "destination", "expected", "observed on the underlay", "verdict")
    lines = [(r.src, r.dst, r.expected, r.observed, "ok" if r.ok else "MISMATCH")
             for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*line) for line in lines)])


def run(name: str, nodes: int, workloads_per_node: int, keep: bool) -> int:
    progress = Progress(5)
    lab = Lab(Layout(name, nodes, workloads_per_node))
    try:
        progress.step(f"bringing up lab {name}: {nodes} nodes, {workloads_per_node} "
                      "workloads each, etcd, the SPIFFE Workload API")
        lab.up()
        progress.step("starting a tfcrypt agent in every node (SVID, signed record in etcd); "
                      "publishing the workloads and the encrypt-all policy")
        agents.start_all(lab)
        inventory.publish_workloads(lab)
        inventory.apply_policy(lab, ENCRYPT_ALL)
        progress.step("waiting for every node to verify the others and configure them")
        _wait_for_enforcement(lab)
        progress.step("pinging every pair of workloads on different nodes while "
                      "capturing the underlay")
        with tempfile.TemporaryDirectory(prefix="tfcrypt-demo-") as tmp:
            rows = _measure(lab, Path(tmp))
        progress.step("result")
        print(_table(rows))
        bad = sum(not r.ok for r in rows)
        print(f"\n{len(rows) - bad} of {len(rows)} flows as expected: every cross-node "
              f"workload pair only inside WireGuard, the node-to-node control in plaintext"
              f"{'' if not bad else f'; {bad} MISMATCH(ES)'}")
        if keep:
            print(f"\nThe lab stays up. Explore it:\n"
                  f"  python -m netns_lab status --name {name}\n"
                  f"  python -m netns_lab exec --name {name} n1 -- wg show\n"
                  f"  python -m netns_lab exec --name {name} n1 -- python -m tfcrypt status "
                  f"--state-dir {agents.state_dir(lab, 'n1')}\n"
                  f"Take it down with: python -m netns_lab down --name {name}")
        return 1 if bad else 0
    finally:
        if not keep:
            down(name)
            print(f"lab {name} is down", flush=True)
