"""`python -m netns_lab demo`: tag-selective encryption, proven on the wire, in one run.

Act 1 brings up a 3-node lab, starts a tfcrypt agent in every node, publishes the
inventory of examples/demo-inventory.yaml (a small shop application and a pci payments
service across two sites) and two enforce-mode policies, drives traffic between every
pair of workloads on different nodes while capturing the underlay, and prints one row
per pair: the tags, what tfcrypt should do (selected by which policy and rule, or not),
what the wire showed, and a verdict. Act 2 is the seen-traffic act (issue #19): it waits
(bounded) until every node's flow report holds act 1's pings, prints what n1 saw of the
one pci workload no act 1 policy selects (`tfcrypt flows`), applies an audit-mode policy
and shows `tfcrypt policy plan --against-seen` for it (the plan, then the seen flows it
would encrypt and whether their nodes are ready), enforces it, prints the table again
with the changed rows marked, and then `tfcrypt report --since` the enforcement was
confirmed (act 1's pci pings were plaintext before it). Exit status 1 on any mismatch,
or when the report exits non-zero (plaintext of a selected pair since the enforcement).

The expected column comes from tfcrypt's own explain() over the same inventory and
policies; the observed column only from tcpdump on every port of the underlay bridge. A
node-to-node ping is a control row: it must be seen in plaintext, which proves the
capture would see plaintext if a selected flow leaked.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcrypt import safeyaml
from tfcrypt.core.compute import Snapshot, compute
from tfcrypt.core.explain import GlobalView, explain
from tfcrypt.model.policy import EncryptionPolicy, read_policy_file
from tfcrypt.model.workload import Workload

from . import agents, inventory, seen, spire
from .errors import LabError
from .lab import Lab, down
from .layout import Layout
from .wire import capture, count_packets, ping

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
INVENTORY = EXAMPLES / "demo-inventory.yaml"
ACT1 = ("payments.yaml", "shop-db-same-site.yaml")
AUDIT, ENFORCE = "pci-audit.yaml", "pci-enforce.yaml"
PINGS = 3
TUNNEL, PLAINTEXT, NOTHING = "inside WireGuard", "plaintext", "no traffic"
REPORTED = {TUNNEL: "wireguard", PLAINTEXT: "plaintext"}  # a row's expected -> a verdict
PCI_PEER = "n3-w3"  # reports, label=pci: the pci workload no act 1 policy selects
SEEN_HEADING = (f"what n1 saw of {PCI_PEER} (reports, label=pci), in plaintext: "
                f"tfcrypt flows --workload {PCI_PEER} --verdict plaintext on n1")


@dataclass(frozen=True)
class Row:
    """One flow: what tfcrypt should do with it and what the underlay capture saw."""

    src: str
    dst: str
    src_tags: str
    dst_tags: str
    expected: str
    why: str
    observed: str
    changed: bool = False
    received: int = 0  # echo replies the ping got back

    @property
    def ok(self) -> bool:
        return self.observed == self.expected


@dataclass(frozen=True)
class Flow:
    src: str
    dst: str
    target: str  # the lab target that sends the ping
    src_ip: str
    dst_ip: str
    src_node_ip: str
    dst_node_ip: str


class Progress:
    def __init__(self, steps: int) -> None:
        self.steps, self.n, self.t0 = steps, 0, time.monotonic()

    def step(self, what: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.steps} +{time.monotonic() - self.t0:5.1f}s] {what}",
              flush=True)


def load_tags(path: Path = INVENTORY) -> dict[str, list[str]]:
    return {str(k): [str(t) for t in v] for k, v in safeyaml.load_file(path).items()}


def load_policies(files: tuple[str, ...]) -> dict[str, EncryptionPolicy]:
    policies = [read_policy_file(str(EXAMPLES / f)) for f in files]
    return {p.name: p for p in policies}


def lab_workloads(status: Mapping[str, Any], tags: Mapping[str, list[str]]
                  ) -> dict[str, Workload]:
    return {w["name"]: Workload(w["name"], w["node"], (w["ip"],),
                                frozenset(tags.get(w["name"], ())))  # type: ignore[arg-type]
            for w in status["workloads"]}


def _flows(status: Mapping[str, Any]) -> list[Flow]:
    node_ip = {n["name"]: n["underlay_ip"] for n in status["nodes"]}
    flows = [Flow(a["name"], b["name"], a["name"], a["ip"], b["ip"], node_ip[a["node"]],
                  node_ip[b["node"]])
             for a, b in itertools.combinations(status["workloads"], 2)
             if a["node"] != b["node"]]
    n1, n2 = status["nodes"][:2]
    flows.append(Flow(f"{n1['name']} (node)", f"{n2['name']} (node)", n1["name"],
                      n1["underlay_ip"], n2["underlay_ip"], n1["underlay_ip"],
                      n2["underlay_ip"]))
    return flows


def _expectation(flow: Flow, wls: Mapping[str, Workload],
                 policies: Mapping[str, EncryptionPolicy]) -> tuple[str, str]:
    if flow.src not in wls:
        return PLAINTEXT, "control: node to node, not a workload flow"
    e = explain(GlobalView({w.key: w for w in wls.values()}, policies, {}),
                flow.src_ip, flow.dst_ip)
    if not e.selected:
        return PLAINTEXT, "no enforce rule selects it"
    first = e.matches[0]
    return TUNNEL, f"{first.policy} rule {first.rule}"


def measure(lab: Lab, tags: Mapping[str, list[str]],
            policies: Mapping[str, EncryptionPolicy], workdir: Path,
            previous: Mapping[tuple[str, str], Row] | None = None) -> list[Row]:
    status = lab.status()
    wls = lab_workloads(status, tags)
    flows = _flows(status)
    pcap = workdir / f"underlay-{time.monotonic_ns()}.pcap"
    with capture(lab, pcap):
        received = [ping(lab, f.target, f.dst_ip, PINGS, interval=0.1) for f in flows]
    rows = []
    for f, got in zip(flows, received, strict=True):
        plain = count_packets(pcap, f"icmp and host {f.src_ip} and host {f.dst_ip}")
        tunnel = count_packets(pcap, f"udp port 51820 and host {f.src_node_ip} "
                                     f"and host {f.dst_node_ip}")
        observed = PLAINTEXT if plain else (TUNNEL if got == PINGS and tunnel else NOTHING)
        expected, why = _expectation(f, wls, policies)
        before = (previous or {}).get((f.src, f.dst))
        rows.append(Row(f.src, f.dst, _short(tags.get(f.src)), _short(tags.get(f.dst)),
                        expected, why, observed,
                        changed=before is not None and before.expected != expected,
                        received=got))
    return rows


def _short(tags: list[str] | None) -> str:
    return " ".join(t.split("=", 1)[1] if not t.startswith("label=") else t
                    for t in tags) if tags else "-"


def table(rows: list[Row]) -> str:
    head = ("", "source", "tags", "destination", "tags", "expected", "by",
            "observed on the underlay", "verdict")
    lines = [("*" if r.changed else "", r.src, r.src_tags, r.dst, r.dst_tags, r.expected,
              r.why, r.observed, "ok" if r.ok else "MISMATCH") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head).rstrip(),
                      fmt.format(*("-" * w for w in widths)).rstrip(),
                      *(fmt.format(*line).rstrip() for line in lines)])


def summary(rows: list[Row]) -> str:
    bad = sum(not r.ok for r in rows)
    selected = sum(r.expected == TUNNEL for r in rows)
    return (f"{len(rows) - bad} of {len(rows)} flows as expected ({selected} selected, "
            f"inside WireGuard; the rest plaintext)"
            + (f"; {bad} MISMATCH(ES)" if bad else ""))


def _agent_status(lab: Lab, node: str) -> dict[str, Any]:
    try:
        return json.loads((agents.state_dir(lab, node) / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for_enforcement(lab: Lab, tags: Mapping[str, list[str]],
                         policies: Mapping[str, EncryptionPolicy],
                         timeout: float = 30.0) -> None:
    """Every agent reports the selected pair count tfcrypt's core computes for its node,
    with every other node as a peer and no pending error."""
    status = lab.status()
    nodes = [n["name"] for n in status["nodes"]]
    wls = {w.key: w for w in lab_workloads(status, tags).values()}
    want = {n: compute(Snapshot(n, wls, policies, {}, "")).selected_pair_count
            for n in nodes}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = {n: _agent_status(lab, n) for n in nodes}
        if all(st.get("selected_pairs") == want[n] and len(st.get("peers", ())) == len(nodes) - 1
               and st.get("last_reconcile", {}).get("errors") == [] for n, st in states.items()):
            return
        time.sleep(0.2)
    raise LabError(f"the agents did not converge in {timeout:.0f}s (want {want}): "
                   f"{json.dumps({n: _agent_status(lab, n) for n in nodes})[:2000]}")


def expected_reports(status: Mapping[str, Any], rows: list[Row]
                     ) -> dict[str, dict[seen.FlowKey, int]]:
    """The flows each workload row's pings made, as both its nodes must report them, with
    at least the packets sent: PINGS requests, `received` replies, the verdict the row
    expects (the wire agreed, or the row is a mismatch already). Whole counts, not mere
    presence: a report published between two pings holds part of a flow, and its later
    packets would be last seen after it; once every packet is in, none is."""
    wl = {w["name"]: w for w in status["workloads"]}
    want: dict[str, dict[seen.FlowKey, int]] = {n["name"]: {} for n in status["nodes"]}
    for r in rows:
        if r.src in wl and r.dst in wl:
            a, b, verdict = wl[r.src]["ip"], wl[r.dst]["ip"], REPORTED[r.expected]
            for node in (wl[r.src]["node"], wl[r.dst]["node"]):
                want[node][(a, b, None, verdict)] = PINGS
                if r.received:
                    want[node][(b, a, None, verdict)] = r.received
    return want


def proof_since(lab: Lab, enforced_at: float) -> bool:
    """Print `tfcrypt report --since` the enforcement was confirmed (act 1's pci pings were
    plaintext before it, and report exits 1 on plaintext of a selected pair); True on exit 0."""
    since = f"{math.ceil(time.time() - enforced_at)}s"
    done = subprocess.run(inventory.controller_argv(lab, "report", "--since", since),
                          capture_output=True, text=True, timeout=120)
    print(f"tfcrypt report --since {since} (exit {done.returncode}):")
    print(done.stdout + done.stderr, end="", flush=True)
    if done.returncode != 0:
        print("the report FAILED: plaintext of a selected pair since the enforcement, or "
              "the report could not be made", flush=True)
    return done.returncode == 0


def identities_line(lab: Lab) -> str:
    """Who issued the agents' SVIDs and which SPIFFE ID each agent holds."""
    who = ("SPIRE (spire-server " + spire.server_address(lab.layout) + ", a spire-agent "
           "per node)" if lab.workload_api == "spire" else "the lab Workload API server")
    ids = ", ".join(f"{n.name} {_agent_status(lab, n.name).get('spiffe_id')}"
                    for n in lab.layout.all_nodes())
    return f"identities from {who}: {ids}"


def run(name: str, keep: bool = False, *,
        before_measure: Callable[[Lab], None] | None = None,
        workload_api: str = "spire") -> int:
    """The whole demo, on real SPIRE unless `workload_api="lab"`; `before_measure` is a
    test hook that may break the lab on purpose."""
    progress = Progress(9)
    tags = load_tags()
    lab = Lab(Layout(name, 3, 3), workload_api=workload_api)
    failed = False
    try:
        provider = ("SPIRE (spire-server, a spire-agent per node)" if workload_api == "spire"
                    else "the lab SPIFFE Workload API server")
        progress.step(f"bringing up lab {name}: 3 nodes x 3 workloads, etcd, {provider}")
        lab.up()
        progress.step("starting a tfcrypt agent in every node; publishing the inventory "
                      f"({INVENTORY.name}) and policies {', '.join(ACT1)}")
        agents.start_all(lab)
        inventory.publish_workloads(lab, tags)
        for f in ACT1:
            inventory.apply_policy(lab, EXAMPLES / f)
        policies = load_policies(ACT1)
        wait_for_enforcement(lab, tags, policies)
        print(identities_line(lab), flush=True)
        if before_measure is not None:
            before_measure(lab)
        progress.step("act 1: pinging every cross-node pair while capturing the underlay")
        with tempfile.TemporaryDirectory(prefix="tfcrypt-demo-") as tmp:
            act1 = measure(lab, tags, policies, Path(tmp))
            print(table(act1))
            print(summary(act1), flush=True)
            failed |= any(not r.ok for r in act1)
            if failed:
                print("act 2 skipped: act 1 shows a mismatch, fix that first", flush=True)
                return 1

            progress.step("act 2: waiting until every node's flow report holds act 1's "
                          "traffic")
            waited = seen.wait_reported(lab, expected_reports(lab.status(), act1))
            reported_at = time.time()
            print(f"every node reported act 1's flows (waited {waited:.0f} s); "
                  f"{SEEN_HEADING}:", flush=True)
            print(seen.flows(lab, "n1", "--workload", PCI_PEER, "--verdict", "plaintext"),
                  end="", flush=True)

            progress.step(f"act 2: applying {AUDIT} (audit mode: computed, not enforced), "
                          "planned against the seen traffic")
            inventory.apply_policy(lab, EXAMPLES / AUDIT)
            print(inventory.tfcrypt(lab, "policy", "plan", "-f", str(EXAMPLES / AUDIT),
                                    "--against-seen"))
            progress.step(f"enforcing it ({ENFORCE})")
            # a record's last_seen is its read's second rounded up: enforcing a whole
            # second after that, `report --since` (rounded up too) leaves act 1 out
            time.sleep(max(0.0, math.ceil(reported_at) + 1 - time.time()))
            inventory.apply_policy(lab, EXAMPLES / ENFORCE)
            policies = load_policies((*ACT1, ENFORCE))
            wait_for_enforcement(lab, tags, policies)
            enforced_at = time.time()
            progress.step("act 2: the same traffic again (* = expectation changed)")
            act2 = measure(lab, tags, policies, Path(tmp),
                           previous={(r.src, r.dst): r for r in act1})
            print(table(act2))
            print(summary(act2), flush=True)
            failed |= any(not r.ok for r in act2)
            progress.step("act 2: what the nodes reported since the enforcement")
            seen.wait_reported(lab, expected_reports(lab.status(), act2))
            failed |= not proof_since(lab, enforced_at)
        progress.step("done: " + ("MISMATCH, see the rows marked above" if failed
                                  else "every flow as expected"))
        if keep:
            explain_cmd = " ".join(inventory.controller_argv(lab, "explain", "10.200.1.13",
                                                             "10.200.2.11"))
            print(f"\nThe lab stays up. Explore it:\n"
                  f"  python -m netns_lab status --name {name}\n"
                  f"  python -m netns_lab exec --name {name} n1 -- wg show\n"
                  f"  python -m netns_lab exec --name {name} n1 -- nft list table inet tfcrypt\n"
                  f"  python -m netns_lab exec --name {name} n1 -- python -m tfcrypt status\n"
                  f"  {explain_cmd}\n"
                  f"Take it down with: python -m netns_lab down --name {name}")
        return 1 if failed else 0
    finally:
        if not keep:
            down(name)
            print(f"lab {name} is down", flush=True)

