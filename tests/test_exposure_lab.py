"""What a running agent shows, and to whom (issue #14 item 9 and "Exposure").

Real agents in the lab. The first test has a lab of its own, whose Workload API hands n1
the SVID of n2 (a misregistration in SPIRE: the lab's server, told to, serves the wrong
identity on n1's socket). The others share one 2-node lab that encrypts everything and
carries traffic, so that every output (logs, status, status.json, metrics, error
messages) has something to say.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from typing import Any

import pytest
from conftest import running_lab
from labtools import wait_for

from netns_lab import Lab, agents

pytestmark = pytest.mark.lab


def run(lab: Lab, node: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lab.exec_prefix(node), *argv], capture_output=True, text=True,
                          check=False, timeout=60)


def tfcrypt(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(lab, node, sys.executable, "-m", "tfcrypt", *args)


def status_json(lab: Lab, node: str) -> dict[str, Any] | None:
    out = tfcrypt(lab, node, "status", "--json")
    return json.loads(out.stdout) if out.stdout.strip() else None


def spiffe_id(lab: Lab, node: str) -> str:
    return next(n.spiffe_id for n in lab.layout.all_nodes() if n.name == node)


def test_an_agent_handed_another_nodes_svid_says_why_in_status_and_recovers() -> None:
    """Before: status said "no SVID from the SPIFFE Workload API yet" while the log said
    the real reason; status.json was 0644."""
    with running_lab(nodes=2, workloads_per_node=1) as lab:
        lab.workload_api_stop()
        lab.workload_api_start(serve_as={"n1": "n2"})
        agents.start_agent(lab, "n1")
        n1_id, n2_id = spiffe_id(lab, "n1"), spiffe_id(lab, "n2")

        doc = wait_for("n1's status to report the refused SVID", lambda: (
            (st := status_json(lab, "n1")) and st["workload_api"].get("last_refusal") and st))
        refusal = doc["workload_api"]["last_refusal"]
        assert refusal["reason"] == "unexpected_spiffe_id"
        assert n2_id in refusal["message"] and n1_id in refusal["message"]
        assert doc["spiffe_id"] is None and not doc["health"]["healthy"]
        reasons = " ".join(doc["health"]["reasons"])
        assert "refused" in reasons and n2_id in reasons, reasons
        assert "yet" not in doc["health"]["reasons"][0]

        table = tfcrypt(lab, "n1", "status")
        assert table.returncode == 1
        assert "Workload API:" in table.stdout and "last refused SVID" in table.stdout
        assert f"unexpected_spiffe_id: served {n2_id}" in table.stdout
        assert agents.running_agent(lab, "n1") is not None  # refused, not crashed

        status_file = agents.state_dir(lab, "n1") / "status.json"
        wait_for("status.json to be written", status_file.exists)
        assert stat.S_IMODE(status_file.stat().st_mode) == 0o600

        lab.workload_api_stop()
        lab.workload_api_start()  # n1's socket serves n1 again
        doc = wait_for("n1 to take its own SVID and report healthy", lambda: (
            (st := status_json(lab, "n1")) and st["health"]["healthy"] and st), timeout=40)
        assert doc["spiffe_id"] == n1_id
        assert stat.S_IMODE(status_file.stat().st_mode) == 0o600
