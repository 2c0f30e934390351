"""Fault injection, issue 14 item 3: rollback protection across restarts, the owner
putting its record back, and a writer that starts above what etcd held for its key.

One lab (3 nodes x 1 workload, examples/payments.yaml: n1-w1 is application=payments and
is selected with n2-w1 and n3-w1), shared by the scenarios in file order; each leaves the
lab healthy. "Written back with etcdctl" is what an attacker with write access to etcd
(and no SVID) can do: put bytes a node once signed. Results: docs/faults.md.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import running_lab
from faults import lab_workloads, load_policies, metrics, publish, status_json
from labtools import PREFIX, diagnostics, etcdctl, run_in, wait_for, wg_peers

from netns_lab import Lab, agents
from netns_lab.wire import ping

POLICIES = ("payments.yaml",)
TAGS = {"n1-w1": ["application=payments"], "n2-w1": ["application=web"],
        "n3-w1": ["application=web"]}
NODES = ("n1", "n2", "n3")
BOUND_S = 30.0


def status(lab: Lab, node: str) -> dict:
    rc, doc = status_json(lab, node)
    assert doc is not None, f"no status from {node} (exit {rc})"
    return doc


def healthy(lab: Lab, node: str) -> bool:
    rc, doc = status_json(lab, node)
    return rc == 0 and doc is not None and doc["health"]["healthy"]


def etcd_value(lab: Lab, node: str) -> bytes:
    return etcdctl(lab, "get", "--print-value-only", f"{PREFIX}/nodes/{node}").rstrip(
        "\n").encode()


def etcd_holds_key(lab: Lab, node: str, public_key: str) -> bool:
    return public_key in etcd_value(lab, node).decode()


def ip_of(lab: Lab, workload: str) -> str:
    return next(w["ip"] for w in lab.status()["workloads"] if w["name"] == workload)


def rotate(lab: Lab, node: str, state_dir: Path | None = None) -> dict:
    """`tfcrypt keys rotate` in the node; the new public key and epoch."""
    out = run_in(lab, node, [sys.executable, "-m", "tfcrypt", "keys", "rotate",
                             "--state-dir", str(state_dir or agents.state_dir(lab, node))])
    return json.loads(out.stdout.strip().splitlines()[-1])


def rollback_metric(lab: Lab, node: str) -> dict[str, float]:
    return {dict(labels)["node"]: v for labels, v in
            metrics(lab, node).get("tfcrypt_peer_rollback", {}).items()}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=3, workloads_per_node=1) as lab:
        publish(lab, TAGS, POLICIES)
        agents.start_all(lab)
        assert lab_workloads(lab, TAGS) and load_policies(POLICIES)
        wait_for("every agent healthy with both peers", lambda: all(
            healthy(lab, n) and len(wg_peers(lab, n)) >= (2 if n == "n1" else 1)
            for n in NODES), timeout=90)
        yield lab


@pytest.fixture
def settled(lab: Lab) -> Iterator[Lab]:
    for node in NODES:
        agents.start_agent(lab, node)
    wait_for("every agent healthy", lambda: all(healthy(lab, n) for n in NODES), timeout=60)
    yield lab


def rotated(lab: Lab, node: str) -> tuple[bytes, str, str]:
    """Rotate `node`'s key under its running agent: (its record before, old key, new key),
    once every other node peers with the new key."""
    before, old_key = etcd_value(lab, node), status(lab, node)["public_key"]
    new_key = rotate(lab, node)["public_key"]
    wait_for(f"the other nodes to peer with {node}'s new key", lambda: all(
        new_key in wg_peers(lab, n) and old_key not in wg_peers(lab, n)
        for n in NODES if n != node and (n == "n1" or node == "n1")), timeout=BOUND_S)
    return before, old_key, new_key


@pytest.mark.lab
def test_the_owner_puts_its_record_back_over_its_own_older_value(settled: Lab) -> None:
    """B's previous record, written back while B's agent runs, is an overwrite (by etcd
    revision), not the echo of one of B's own puts: B puts its current record back.
    On main B took it for an echo (it was one of its last 16 values) and left it there."""
    lab = settled
    before, old_key, new_key = rotated(lab, "n2")
    etcdctl(lab, "put", f"{PREFIX}/nodes/n2", input=before)
    wait_for("n2 to put its current record back over its older one", lambda:
             etcd_holds_key(lab, "n2", new_key), timeout=BOUND_S)
    assert status(lab, "n2")["own_record"]["reasserted"] >= 1
    assert old_key not in wg_peers(lab, "n1")
    assert ping(lab, "n1-w1", ip_of(lab, "n2-w1")) > 0


@pytest.mark.lab
def test_a_restarted_reader_refuses_a_replayed_record_reports_it_and_b_puts_its_back(
        settled: Lab) -> None:
    """B rotates; B's previous record is written back while B and the reader are down; the
    reader restarts: it refuses the old record (its floor was saved in its state dir),
    configures nothing for B, reports the rollback by B's name (status and metric), and
    once B's agent returns and puts its record back, `wg show` has B's new key.
    On main the restarted reader accepted the old record and configured B's old key."""
    lab = settled
    before, old_key, new_key = rotated(lab, "n2")
    assert agents.stop_agent(lab, "n2") and agents.stop_agent(lab, "n1")
    etcdctl(lab, "put", f"{PREFIX}/nodes/n2", input=before)
    agents.start_agent(lab, "n1")
    wait_for("n1 to decide on n2's record: configure its old key, or report a rollback",
             lambda: old_key in wg_peers(lab, "n1") or (
                 (s := status_json(lab, "n1")[1]) and "n2" in s.get("rollbacks", {})),
             timeout=BOUND_S)
    peers = wg_peers(lab, "n1")
    assert old_key not in peers, "the restarted reader configured n2's rotated-away key\n" \
        + diagnostics(lab, ("n1",))
    st = status(lab, "n1")
    assert "n2" in st["rollbacks"] and "n2" in st["missing_peers"], st
    assert rollback_metric(lab, "n1").get("n2") == 1
    assert st["rejected"].get("rollback", 0) >= 1
    saved = agents.state_dir(lab, "n1") / "epochs.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert json.loads(saved.read_text())["epochs"]["nodes/n2"] > 0

    agents.start_agent(lab, "n2")
    wait_for("n2 to put its record back and n1 to peer with n2's new key", lambda:
             etcd_holds_key(lab, "n2", new_key) and new_key in wg_peers(lab, "n1")
             and old_key not in wg_peers(lab, "n1"), timeout=BOUND_S)
    wait_for("n1 to clear the rollback and be healthy", lambda: not status(
        lab, "n1")["rollbacks"] and healthy(lab, "n1"), timeout=BOUND_S)
    assert rollback_metric(lab, "n1").get("n2", 0) == 0
    assert ping(lab, "n1-w1", ip_of(lab, "n2-w1")) > 0


@pytest.mark.lab
def test_a_writer_publishes_above_a_higher_epoch_another_instance_left_in_etcd(
        settled: Lab) -> None:
    """A second agent instance for n3 (another state dir, another key, a later epoch)
    publishes; readers accept it. n3's own agent then starts with its own, lower epoch:
    it must publish above what etcd held, so readers take its key and the flows it
    selects work. On main it was refused as a rollback for good, its flows dropped, and
    it reported itself healthy."""
    lab = settled
    own = status(lab, "n3")
    second_dir = agents.state_dir(lab, "n3").parent / "n3-second"
    node = next(n for n in lab.layout.all_nodes() if n.name == "n3")
    argv = agents.agent_argv(lab, node)
    argv[argv.index("--state-dir") + 1] = str(second_dir)
    argv[argv.index("--status-socket") + 1] = str(second_dir / "agent.sock")
    second_dir.mkdir(mode=0o700)
    second = None
    try:
        second_key = rotate(lab, "n3", second_dir)
        assert second_key["epoch"] > own["epoch"]
        assert agents.stop_agent(lab, "n3")
        second = lab.start_process("agent-second", argv, node="n3",
                                   extra_prefix=lab.identity_prefix())
        wait_for("the second instance's record in etcd, and n1 peering with its key",
                 lambda: etcd_holds_key(lab, "n3", second_key["public_key"])
                 and second_key["public_key"] in wg_peers(lab, "n1"), timeout=BOUND_S)
        lab.stop_process(second)
        second = None
        agents.start_agent(lab, "n3")
        wait_for("n1 and n2 to peer with n3's own key", lambda: all(
            own["public_key"] in wg_peers(lab, n)
            and second_key["public_key"] not in wg_peers(lab, n) for n in ("n1", "n2")),
            timeout=BOUND_S)
        wait_for("selected n1-w1 -> n3-w1 to work", lambda:
                 ping(lab, "n1-w1", ip_of(lab, "n3-w1")) > 0, timeout=BOUND_S)
        assert status(lab, "n3")["epoch"] > second_key["epoch"]
        wait_for("n3 healthy, its own record believed", lambda: healthy(lab, "n3")
                 and not status(lab, "n3")["own_record"]["refused"], timeout=BOUND_S)
    finally:
        if second is not None:
            lab.stop_process(second)
        shutil.rmtree(second_dir, ignore_errors=True)
