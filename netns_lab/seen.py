"""What the lab's agents reported of the traffic they forwarded (issue #19, docs/flows.md).

Rules of this module:
- A node's flow report is read raw from etcd (`<prefix>-seen/flows/<node>`) with the lab's
  own etcdctl in the controller namespace: this only tells the demo *when* a report holds
  the traffic it sent. What the reports prove is left to tfcrypt's commands
  (`policy plan --against-seen`, `report`), which verify each report's signature.
- A flow is keyed as the report has it: (src, dst, dport, verdict), dport None for ICMP;
  a wait is for a number of packets, not a key's presence (a report published between two
  pings holds the flow with part of its packets).
- `tfcrypt flows` is run from the host against a node's status socket (its host path),
  exactly as tests/test_flows_lab.py does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping

from . import agents
from .errors import LabError
from .lab import Lab

SEEN_FLOWS = "/tfcrypt/v1-seen/flows/"  # the default prefix's seen-traffic keyspace
FlowKey = tuple[str, str, int | None, str]


def reported(lab: Lab, node: str) -> dict[FlowKey, int]:
    """(src, dst, dport, verdict) -> packets of every record in `node`'s report (empty if
    none)."""
    etcd = lab.status()["etcd"]
    out = subprocess.run(
        [*lab.exec_prefix("controller"), "etcdctl", f"--endpoints={','.join(etcd['endpoints'])}",
         *etcd.get("etcdctl_flags", []), "get", SEEN_FLOWS + node, "--print-value-only"],
        capture_output=True, text=True, timeout=30, env={**os.environ, "ETCDCTL_API": "3"})
    if out.returncode != 0:
        raise LabError(f"etcdctl get {SEEN_FLOWS}{node} failed: {out.stderr.strip()}")
    if not out.stdout.strip():
        return {}
    payload = json.loads(json.loads(out.stdout)["payload"])
    return {(f["src"], f["dst"], f["dport"], f["verdict"]): f["packets"]
            for f in payload["flows"]}


def _short(have: Mapping[FlowKey, int], want: Mapping[FlowKey, int]) -> list[str]:
    return sorted(f"{k} {have.get(k, 0)} of {n} packets" for k, n in want.items()
                  if have.get(k, 0) < n)


def wait_reported(lab: Lab, want: Mapping[str, Mapping[FlowKey, int]],
                  timeout: float = 60.0) -> float:
    """Wait until each node's report holds every flow `want` gives it with at least its
    packets; the seconds waited. Bounded: a report that never shows the traffic is a
    LabError naming what is short (an agent reads the kernel every 10 s and, in the lab,
    publishes every 5 s)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    while True:
        missing = {n: _short(reported(lab, n), w) for n, w in want.items()}
        missing = {n: m for n, m in missing.items() if m}
        if not missing:
            return time.monotonic() - t0
        if time.monotonic() > deadline:
            raise LabError(f"the flow reports lack traffic the wire showed after "
                           f"{timeout:.0f} s: {json.dumps(missing)[:2000]}")
        time.sleep(1.0)


def flows(lab: Lab, node: str, *args: str) -> str:
    """`tfcrypt flows ARGS` against `node`'s agent: its text output."""
    out = subprocess.run([sys.executable, "-m", "tfcrypt", "flows", "--status-socket",
                          str(agents.status_socket(lab, node)), *args],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise LabError(f"tfcrypt flows on {node} failed (exit {out.returncode}): "
                       f"{(out.stderr or out.stdout).strip()}")
    return out.stdout
