"""Fault injection, issue 8 scenarios 1-6: whatever breaks in the infrastructure, no
selected packet crosses the underlay in plaintext.

One lab (2 nodes x 3 workloads, 3 etcd members) shared by every scenario, in file order;
each scenario leaves the lab healthy for the next. Tags under examples/payments.yaml
(application=payments <-> any): n1-w1 <-> n2-w1 is the selected flow, n1-w2 <-> n2-w2
the unselected one; n1-w3 <-> n2-w3 is the flow scenario 6 moves in and out of the
selection. Harness and its checks (a)-(d): tests/faults.py. Table: docs/faults.md.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import faults
import pytest
from conftest import running_lab
from faults import (
    PROTOS,
    Flow,
    KeyWatch,
    Scenario,
    agent_log,
    applied_at,
    lab_workloads,
    load_policies,
    metrics,
    publish,
    run,
    selected_pairs,
    status_json,
    successes,
    wireguard_go_pid,
)
from labtools import PREFIX, etcdctl, wait_for, wg_peers

from netns_lab import Lab, agents, inventory
from tfcrypt.model.workload import Workload

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
OBSERVED: dict[str, int] = {}  # measured by one scenario, judged by a stricter test after it


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
    # The lab server: test 4 restarts the Workload API with a 20 s lifetime and keeps it
    # down until SVIDs expire, in seconds; SPIRE's outages are tests/test_spire_lab.py's.
    with running_lab(nodes=2, workloads_per_node=3, etcd_members=3, workload_api="lab") as lab:
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


# ------------------------------------------------------------------ 2. the WireGuard device

DEVICE_BOUND_S = 10.0
MTU = 1420


def peer_rx(lab: Lab, node: str, peer: str) -> float:
    return metrics(lab, node)["tfcrypt_peer_received_bytes_total"][(("peer", peer),)]


def device_reported(lab: Lab, rx_before: float, since: float) -> str | None:
    """What n1 shows of a lost device: status absent or unhealthy, or the per-peer byte
    counter reset. The agent repairs within a fraction of a second, faster than a status
    poll may catch, and no status field or metric counts device restarts (yet): the
    agent's warning in its log is the fallback."""
    doc = status_json(lab, "n1")[1]
    if doc is not None and not doc["device_present"]:
        return "status device_present false"
    if doc is not None and not doc["health"]["healthy"]:
        return f"status unhealthy: {doc['health']['reasons']}"
    if peer_rx(lab, "n1", "n2") < rx_before:
        return "metrics tfcrypt_peer_received_bytes_total{peer=n2} reset (device restarted)"
    for line in agent_log(lab, "n1").read_text(errors="replace").splitlines():
        if "was restarted; re-applying" in line and \
                datetime.fromisoformat(line.split()[0]).timestamp() >= since:
            return f"agent log: {line}"
    return None


def device_repair_logged(lab: Lab, since: float) -> str | None:
    """The agent's log line of the reconcile that repaired the device. Status shows the
    repair only until the next reconcile (often a fraction of a second later)."""
    log = agent_log(lab, "n1").read_text(errors="replace").splitlines()
    return next((line for line in log if "event=dataplane_changed" in line and "wireguard:"
                 in line and datetime.fromisoformat(line.split()[0]).timestamp() >= since),
                None)


def mtu_of(lab: Lab, node: str) -> int:
    words = run(lab, node, "ip", "link", "show", "tfcrypt0").stdout.split()
    return int(words[words.index("mtu") + 1])


@pytest.mark.parametrize("fault", ["kill-wireguard-go", "link-del", "mtu"])
def test_2_wireguard_device_faults(lab: Lab, tmp_path: Path, fault: str) -> None:
    old_pid = wireguard_go_pid(lab, "n1")
    assert old_pid is not None
    with scenario(lab, tmp_path, fault, DEVICE_BOUND_S) as sc:
        if fault == "mtu":
            started = time.time()
            sc.expect_report("agent log: a dataplane_changed event with WireGuard ops",
                             lambda: device_repair_logged(lab, started))
        else:
            rx_before = peer_rx(lab, "n1", "n2")
            since = time.time()
            sc.expect_report("device loss", lambda: device_reported(lab, rx_before, since))
        sc.fault_started()
        if fault == "kill-wireguard-go":
            run(lab, "n1", "kill", "-9", str(old_pid))
        elif fault == "link-del":
            run(lab, "n1", "ip", "link", "del", "tfcrypt0")
        else:
            run(lab, "n1", "ip", "link", "set", "dev", "tfcrypt0", "mtu", "1300")
        sc.wait_reported()
        if fault == "mtu":
            wait_for("the agent to restore the MTU", lambda: mtu_of(lab, "n1") == MTU)
        else:
            wait_for("a new wireguard-go", lambda: wireguard_go_pid(lab, "n1") not in
                     (None, old_pid))
        wait_for("n1 healthy", lambda: healthy(lab, "n1"))
        sc.fault_ended()
    assert mtu_of(lab, "n1") == MTU
    print(sc.result)


# ------------------------------------------------------------------ 3. etcd

ETCD_BOUND_S = 10.0
ETCD_OUTAGE_S = 20.0  # the issue says 60 s; shortened to keep the file within budget
ETCD_IPS = ("10.77.0.2", "10.77.0.3", "10.77.0.4")


def etcd_state(lab: Lab, node: str) -> dict[str, object]:
    doc = status_json(lab, node)[1]
    assert doc is not None
    return doc["etcd"]


def test_3a_one_etcd_member_of_three_killed(lab: Lab, tmp_path: Path) -> None:
    before = {n: etcd_state(lab, n)["reconnects"] for n in NODES}
    with scenario(lab, tmp_path, "etcd-member", ETCD_BOUND_S) as sc:
        sc.expect_report("an agent saw its etcd connection break and reconnected", lambda: [
            (n, st) for n in NODES if (st := etcd_state(lab, n))["reconnects"] > before[n]
            or not st["connected"]])
        sc.fault_started()
        lab.etcd_stop(["e1"], kill=True)
        sc.wait_reported()
        lab.etcd_start(["e1"])
        sc.fault_ended()
    assert all(etcd_state(lab, n)["connected"] for n in NODES)


def test_3b_all_etcd_members_stopped(lab: Lab, tmp_path: Path) -> None:
    with scenario(lab, tmp_path, "etcd-all", ETCD_BOUND_S) as sc:
        sc.expect_report("both agents: etcd connected false", lambda: all(
            not etcd_state(lab, n)["connected"] for n in NODES))
        sc.fault_started()
        lab.etcd_stop(["e1", "e2", "e3"])
        down_at = time.monotonic()
        sc.wait_reported()
        time.sleep(max(0.0, ETCD_OUTAGE_S - (time.monotonic() - down_at)))
        lab.etcd_start(["e1", "e2", "e3"])
        wait_for("both agents reconnected", lambda: all(
            etcd_state(lab, n)["connected"] for n in NODES), timeout=30)
        sc.fault_ended()


CUT_TABLE = "faultcut"


def cut_etcd(lab: Lab, node: str) -> None:
    """Partition `node` from etcd: refuse new connections to the members with a reset and
    kill the established ones (its own nftables table, removed by `heal_etcd`)."""
    ips = ", ".join(ETCD_IPS)
    script = (f"table inet {CUT_TABLE} {{\n chain out {{\n"
              "  type filter hook output priority 0;\n"
              f"  ip daddr {{ {ips} }} tcp dport 2379 reject with tcp reset\n }}\n}}\n")
    subprocess.run([*lab.exec_prefix(node), "nft", "-f", "-"], input=script, text=True,
                   check=True, capture_output=True, timeout=30)
    for ip in ETCD_IPS:
        run(lab, node, "ss", "-K", "dst", ip, "dport", "=", "2379", check=False)


def heal_etcd(lab: Lab, node: str) -> None:
    run(lab, node, "nft", "delete", "table", "inet", CUT_TABLE, check=False)


def etcd_revision(lab: Lab) -> int:
    return int(json.loads(etcdctl(lab, "get", "/tfcrypt", "-w", "json"))["header"]["revision"])


def converged(lab: Lab, tags: dict[str, list[str]]) -> bool:
    want = len(selected_pairs(lab_workloads(lab, tags), load_policies(POLICIES)))
    docs = [status_json(lab, n)[1] for n in NODES]
    return all(d is not None and d["selected_pairs"] == want and d["workloads"] == len(tags)
               for d in docs)


def test_3c_compaction_while_one_agent_is_cut_from_etcd(lab: Lab, tmp_path: Path) -> None:
    relists = etcd_state(lab, "n2")["relists"]
    changed = {**TAGS, "n2-w3": ["application=payments"]}
    with scenario(lab, tmp_path, "etcd-compact", ETCD_BOUND_S) as sc:
        sc.expect_report("n2: etcd connected false", lambda: not etcd_state(lab, "n2")["connected"])
        sc.fault_started()
        try:
            cut_etcd(lab, "n2")
            sc.wait_reported()
            inventory.set_workload(lab, "n2-w3", changed["n2-w3"])
            wait_for("n1 to apply the change", lambda: status_json(lab, "n1")[1][
                "selected_pairs"] == len(selected_pairs(lab_workloads(lab, changed),
                                                        load_policies(POLICIES))))
            etcdctl(lab, "compact", str(etcd_revision(lab)))
            assert not etcd_state(lab, "n2")["connected"]
        finally:
            heal_etcd(lab, "n2")
        wait_for("n2 to relist and see the change", lambda: converged(lab, changed)
                 and etcd_state(lab, "n2")["relists"] > relists, timeout=30)
        sc.set_selected(selected_pairs(lab_workloads(lab, changed), load_policies(POLICIES)))
        sc.fault_ended()
    inventory.set_workload(lab, "n2-w3", TAGS["n2-w3"])
    wait_for("the inventory restored", lambda: converged(lab, TAGS))


# ------------------------------------------------------------------ 4. Workload API / SVID

SVID_TTL_S = 20
SVID_BOUND_S = 20.0


def svid_left(lab: Lab, node: str) -> float:
    doc = status_json(lab, node)[1]
    assert doc is not None and doc["svid_expires"]
    return datetime.fromisoformat(doc["svid_expires"]).timestamp() - time.time()


def svid_expired_reported(lab: Lab, node: str) -> list[str] | None:
    rc, doc = status_json(lab, node)
    if rc == 1 and doc is not None and any("svid" in r.lower() for r in doc["health"]["reasons"]):
        return doc["health"]["reasons"]
    return None


def longest_pause(sc: Scenario, flow: Flow) -> float:
    """The longest time without a successful TCP exchange of `flow`, either direction."""
    times = sorted(t for s, d in ((flow.a, flow.b), (flow.b, flow.a))
                   for t in successes(sc.log_of(s, d))["tcp"])
    return round(max((b - a for a, b in itertools.pairwise(times)), default=0.0), 2)


def restart_workload_api(lab: Lab, ttl: int) -> None:
    lab.svid_ttl = ttl
    lab.workload_api_stop()
    lab.workload_api_start()


def test_4_workload_api_down_until_the_svid_expires(lab: Lab, tmp_path: Path) -> None:
    long_ttl = lab.svid_ttl
    restart_workload_api(lab, SVID_TTL_S)
    restored = False
    try:
        wait_for("both agents to hold a short SVID", lambda: all(
            svid_left(lab, n) <= SVID_TTL_S + 1 for n in NODES), timeout=30)
        wait_for("both agents healthy", lambda: all_healthy(lab), timeout=30)
        with scenario(lab, tmp_path, "svid-expiry", SVID_BOUND_S) as sc:
            for node in NODES:
                sc.expect_report(f"{node}: unhealthy, SVID expired",
                                 lambda n=node: svid_expired_reported(lab, n))
            sc.fault_started()
            lab.workload_api_stop()
            sc.wait_reported(timeout=SVID_TTL_S + 30)
            restart_workload_api(lab, long_ttl)
            restored = True
            wait_for("both agents healthy", lambda: all_healthy(lab), timeout=60)
            sc.fault_ended()
        print("longest selected pause (s):", longest_pause(sc, SELECTED), sc.result)
    finally:
        if not restored:
            restart_workload_api(lab, long_ttl)


# ------------------------------------------------------------------ 5. a peer's lease lapses

LEASE_TTL_S = 15
LEASE_BOUND_S = 15.0


def test_5_peer_agent_gone_longer_than_its_lease(lab: Lab, tmp_path: Path) -> None:
    n2_key = status_json(lab, "n2")[1]["public_key"]  # type: ignore[index]
    with scenario(lab, tmp_path, "lease", LEASE_BOUND_S) as sc:
        sc.expect_report("n1: n2 missing, unhealthy", lambda: (
            (d := status_json(lab, "n1")[1]) is not None and "n2" in d["missing_peers"]
            and not d["health"]["healthy"] and d["health"]["reasons"]))
        sc.fault_started()
        assert agents.stop_agent(lab, "n2")
        sc.wait_reported(timeout=LEASE_TTL_S + 30)
        missing_at = time.time()
        assert n2_key not in wg_peers(lab, "n1"), "n2 is still a peer of n1"
        time.sleep(3)
        dropped_until = time.time()
        agents.start_agent(lab, "n2")
        wait_for("both agents healthy", lambda: all_healthy(lab), timeout=30)
        sc.fault_ended()
    passed = {f"{s}->{d} {p}": n for s, d in ((SELECTED.a, SELECTED.b), (SELECTED.b, SELECTED.a))
              for p, times in successes(sc.log_of(s, d)).items()
              if (n := sum(1 for t in times if missing_at + 1 <= t <= dropped_until))}
    assert not passed, f"selected traffic crossed while n2 had no verified record: {passed}"
    print(sc.result)


# ------------------------------------------------------------------ 6. workload lifecycle

LIFECYCLE_BOUND_S = 10.0
MOVING = Flow("n1-w3", "n2-w3")


def inventory_of(lab: Lab, extra: dict[str, tuple[str, list[str]]]) -> list[Workload]:
    """TAGS' workloads plus `extra` {name: (address, tags)} on n1."""
    return [*lab_workloads(lab, TAGS),
            *(Workload(n, "n1", (ip,), frozenset(t)) for n, (ip, t) in extra.items())]


def applied_by_both(lab: Lab, why: str, since: float) -> tuple[float, float]:
    """When n1's and n2's agents applied the change `why` (their dataplane_changed log)."""
    times = wait_for(f"both agents to apply {why}", lambda: (
        t if all(t := [applied_at(lab, n, why, since) for n in NODES]) else None),
        timeout=LIFECYCLE_BOUND_S)
    return times[0], times[1]


def lingering_logged(lab: Lab, node: str, event: str, key: str,
                     since: float) -> tuple[float, str] | None:
    """When `node`'s agent logged `event` (lingering_started, lingering_ended) for workload
    `key` at or after `since`, and the line; None if not yet."""
    for line in agent_log(lab, node).read_text(errors="replace").splitlines():
        if f"event={event}" not in line or f" key={key} " not in f"{line} ":
            continue
        with contextlib.suppress(ValueError, IndexError):
            t = datetime.fromisoformat(line.split()[0]).timestamp()
            if t >= since:
                return t, line
    return None


def lingering_by_both(lab: Lab, event: str, key: str, since: float,
                      timeout: float = LIFECYCLE_BOUND_S) -> list[tuple[float, str]]:
    return wait_for(f"both agents to log {event} for {key}", lambda: (
        r if all(r := [lingering_logged(lab, n, event, key, since) for n in NODES]) else None),
        timeout=timeout)


def lingering_keys(lab: Lab, node: str) -> list[str]:
    doc = status_json(lab, node)[1]
    assert doc is not None
    return [e["key"] for e in doc["lingering_workloads"].get("entries", [])]


def test_6_workload_deleted_created_and_address_reused(lab: Lab, tmp_path: Path) -> None:
    """Transition semantics (docs/faults.md): a pair is plaintext-forbidden from the
    moment BOTH agents applied its selection (the later dataplane_changed log) until its
    deselection is committed; before the later apply a node cannot know the flow is
    selected, and that window is measured and printed, not asserted. A deleted workload
    lingers: its pair stays forbidden until its address is reused (committed), which
    must come within workload_grace; after the reuse by an unselected workload the pair
    is plaintext again."""
    ip = next(w["ip"] for w in lab.status()["workloads"] if w["name"] == "n1-w3")
    policies = load_policies(POLICIES)
    pair = frozenset((ip, next(w["ip"] for w in lab.status()["workloads"]
                               if w["name"] == "n2-w3")))
    edges: dict[str, tuple[float, float]] = {}
    one_side: dict[str, tuple[float, float]] = {}

    def change(step: str, write: Callable[[], object], key: str,
               extra: dict[str, tuple[str, list[str]]]) -> None:
        t0 = time.time()
        write()
        committed = watch.committed(f"{PREFIX}/{key}", t0)
        why = f"{'put' if extra else 'deleted'} {key}"
        first, later = sorted(applied_by_both(lab, why, t0 - 0.002))  # log ts: ms, floored
        now_selected = selected_pairs(inventory_of(lab, extra), policies)
        edge = later if pair in now_selected else committed
        sc.set_selected(now_selected, at=edge)
        edges[step] = (committed, edge)
        one_side[step] = (first, later)

    def flowing_since(t: float) -> bool:
        return all(any(x >= t for x in successes(sc.log_of(s, d))[p])
                   for s, d in ((MOVING.a, MOVING.b), (MOVING.b, MOVING.a)) for p in PROTOS)

    want = len(selected_pairs(inventory_of(lab, {"n1-w3": (ip, ["application=payments"])}),
                              policies))
    with KeyWatch(lab, f"{PREFIX}/workloads/") as watch, \
            scenario(lab, tmp_path, "lifecycle", LIFECYCLE_BOUND_S, extra_flows=[MOVING]) as sc:
        sc.expect_report("both agents: selected_pairs grew with the new workload", lambda: all(
            (d := status_json(lab, n)[1]) is not None and d["selected_pairs"] == want
            for n in NODES))
        sc.fault_started()
        # created and already sending before its record reaches the nodes
        payments = {"n1-w3": (ip, ["application=payments"])}
        change("created", lambda: inventory.set_workload(lab, "n1-w3", payments["n1-w3"][1]),
               "workloads/n1/n1-w3", payments)
        sc.wait_reported()
        t = time.time()
        wait_for("the new selected flow to pass (in the tunnel)", lambda: flowing_since(t))
        # deleted while it keeps sending (terminating pod): both agents keep its address
        # selected (it lingers), so the pair stays forbidden in the harness's timeline
        t0 = time.time()
        inventory.tfcrypt(lab, "workload", "delete", "n1-w3")
        deleted = watch.committed(f"{PREFIX}/workloads/n1/n1-w3", t0)
        lingering_by_both(lab, "lingering_started", "workloads/n1/n1-w3", t0 - 0.002)
        assert all(lingering_keys(lab, n) == ["workloads/n1/n1-w3"] for n in NODES)
        grace = min(status_json(lab, n)[1]["lingering_workloads"]["grace_s"] for n in NODES)
        t = time.time()
        wait_for("the terminating workload's flow to keep passing (in the tunnel)",
                 lambda: flowing_since(t))
        time.sleep(2.0)  # and let it send a while longer
        # its address reused by a new workload with other tags: the lingering ends at once
        # and the pair is unselected (plaintext) from then on
        t0 = time.time()
        shop = {"n1-reuse": (ip, ["application=shop"])}
        inventory.set_workload(lab, "n1-reuse", shop["n1-reuse"][1], node="n1", ips=[ip])
        reuse = watch.committed(f"{PREFIX}/workloads/n1/n1-reuse", t0)
        sc.set_selected(selected_pairs(inventory_of(lab, shop), policies), at=reuse)
        ended = lingering_by_both(lab, "lingering_ended", "workloads/n1/n1-w3", t0 - 0.002)
        assert all('reason="address reused"' in line for _, line in ended), ended
        plain_again = max(applied_by_both(lab, "put workloads/n1/n1-reuse", t0 - 0.002))
        assert all(lingering_keys(lab, n) == [] for n in NODES)
        t = time.time()
        wait_for("the reused address's unselected flow to pass", lambda: flowing_since(t))
        # then selected again
        reused = {"n1-reuse": (ip, ["application=payments"])}
        change("reused-selected", lambda: inventory.set_workload(
            lab, "n1-reuse", reused["n1-reuse"][1], node="n1", ips=[ip]),
            "workloads/n1/n1-reuse", reused)
        t = time.time()
        wait_for("the reused address's selected flow to pass", lambda: flowing_since(t))
        change("reused-deselected", lambda: inventory.set_workload(
            lab, "n1-reuse", ["application=shop"], node="n1", ips=[ip]),
            "workloads/n1/n1-reuse", {"n1-reuse": (ip, ["application=shop"])})
        last_delete = time.time()
        inventory.tfcrypt(lab, "workload", "delete", "n1-reuse")
        wait_for("the inventory back to its start", lambda: converged(lab, TAGS))
        sc.fault_ended()
    # the last deletion lingers too (unselected by then: nothing to keep), and its grace
    # period ends on time: the agent wakes up for it, not at its next periodic resync (5 s)
    started = lingering_by_both(lab, "lingering_started", "workloads/n1/n1-reuse",
                                last_delete - 0.002)
    expired = lingering_by_both(lab, "lingering_ended", "workloads/n1/n1-reuse",
                                last_delete - 0.002, timeout=grace + LIFECYCLE_BOUND_S)
    assert all("reason=expired" in line for _, line in expired), expired
    late = [round(e - s - grace, 3) for (s, _), (e, _) in zip(started, expired, strict=True)]
    print(f"lingering of n1-reuse ended {late} s after its {grace} s grace period")
    # well under the lab's 5 s periodic resync, with room for a loaded CI machine
    assert all(-0.01 <= x < 2.5 for x in late), late
    plain = faults.packet_times(sc.pcap, f"host {min(pair)} and host {max(pair)}")
    windows = {step: (round(edge - t0, 3), sum(1 for x in plain if t0 <= x < edge))
               for step, (t0, edge) in edges.items()}
    windows["between the two agents' applies"] = tuple(  # type: ignore[assignment]
        sum(1 for x in plain if a <= x < b) for a, b in one_side.values())
    # from the deletion's commit (the agents' linger starts after it) until the address is
    # reused: the terminating workload's packets, which lingering keeps in the tunnel
    windows["terminating, after its deletion"] = (round(reuse - deleted, 3), sum(
        1 for x in plain if deleted <= x < reuse))
    again = [x for x in plain if plain_again <= x < edges["reused-selected"][0]]
    windows["plaintext again, after the reuse by shop"] = (
        round(edges["reused-selected"][0] - plain_again, 3), len(again))
    print("(commit-to-edge seconds, plaintext packets in that window):", windows, sc.result)
    OBSERVED["terminating plaintext"] = windows["terminating, after its deletion"][1]
    assert reuse - deleted < grace, "the address was reused after the grace period"
    assert [x for x in plain if x < edges["created"][0]], \
        "the capture never saw the moving pair in plaintext while it was unselected"
    assert again, "after the reuse by an unselected workload the pair never crossed in plaintext"


def test_6_a_terminating_workload_never_sends_plaintext_after_its_deletion() -> None:
    """Cilium's terminating-endpoint advisory: a pod that keeps sending after its record
    is deleted stays encrypted while its address lingers (workload_grace, until reused)."""
    if "terminating plaintext" not in OBSERVED:
        pytest.skip("measured by test_6_workload_deleted_created_and_address_reused")
    assert OBSERVED["terminating plaintext"] == 0, (
        f"{OBSERVED['terminating plaintext']} plaintext packets (counted twice: ingress and "
        "egress port of the bridge) of the deleted workload's flow after its deletion")
