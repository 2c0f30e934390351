"""Fault injection, issue 8 scenarios 1-6: whatever breaks in the infrastructure, no
selected packet crosses the underlay in plaintext.

One lab (2 nodes x 3 workloads, 3 etcd members) shared by every scenario, in file order;
each scenario leaves the lab healthy for the next. Tags under examples/payments.yaml
(application=payments <-> any): n1-w1 <-> n2-w1 is the selected flow, n1-w2 <-> n2-w2
the unselected one; n1-w3 <-> n2-w3 is the flow scenario 6 moves in and out of the
selection. Harness and its checks (a)-(d): tests/faults.py. Table: docs/faults.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import running_lab
from faults import (
    Flow,
    Scenario,
    lab_workloads,
    load_policies,
    publish,
    selected_pairs,
    status_json,
)
from labtools import wait_for

from netns_lab import Lab, agents

pytestmark = pytest.mark.lab

POLICIES = ("payments.yaml",)
TAGS = {
    "n1-w1": ["application=payments"],
    "n1-w2": ["application=shop"],
    "n2-w1": ["application=ledger"],
    "n2-w2": ["application=web"],
    "n2-w3": ["application=web"],
}
SELECTED = Flow("n1-w1", "n2-w1")
UNSELECTED = Flow("n1-w2", "n2-w2")
NODES = ("n1", "n2")


def healthy(lab: Lab, node: str) -> bool:
    rc, doc = status_json(lab, node)
    return rc == 0 and doc is not None and doc["health"]["healthy"]


def all_healthy(lab: Lab) -> bool:
    return all(healthy(lab, n) for n in NODES)


def scenario(lab: Lab, tmp_path: Path, name: str, bound: float, **kw: object) -> Scenario:
    initially = selected_pairs(lab_workloads(lab, TAGS), load_policies(POLICIES))
    return Scenario(lab, tmp_path, selected=SELECTED, unselected=UNSELECTED,
                    initially_selected=initially, recovery_bound_s=bound, name=name,
                    **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=3, etcd_members=3) as lab:
        publish(lab, TAGS, POLICIES)
        agents.start_all(lab)
        want = len(selected_pairs(lab_workloads(lab, TAGS), load_policies(POLICIES)))
        wait_for(f"both agents healthy with {want} selected pairs",
                 lambda: all_healthy(lab) and all(
                     status_json(lab, n)[1]["selected_pairs"] == want for n in NODES),
                 timeout=60)
        yield lab


@pytest.fixture(autouse=True)
def healthy_before_and_after(lab: Lab) -> Iterator[None]:
    wait_for("both agents healthy", lambda: all_healthy(lab), timeout=60)
    yield


# ------------------------------------------------------------------ 1. agent restarts

AGENT_RESTART_BOUND_S = 10.0


@pytest.mark.parametrize("kill", [True, False], ids=["sigkill", "sigterm"])
def test_1_agent_restart_under_traffic(lab: Lab, tmp_path: Path, kill: bool) -> None:
    with scenario(lab, tmp_path, f"agent-{'kill' if kill else 'term'}",
                  AGENT_RESTART_BOUND_S) as sc:
        sc.expect_report("tfcrypt status exits 2: no agent answers",
                         lambda: status_json(lab, "n1")[0] == 2)
        sc.fault_started()
        assert agents.stop_agent(lab, "n1", kill=kill)
        sc.wait_reported()
        time.sleep(2)
        agents.start_agent(lab, "n1")
        wait_for("the restarted agent healthy", lambda: healthy(lab, "n1"), timeout=30)
        sc.fault_ended()
    print(sc.result)
