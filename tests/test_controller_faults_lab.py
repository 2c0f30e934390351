"""`tfcrypt controller run` when what it depends on goes away (issue #17's fault tests):
real kube-apiserver, real etcd, real agents, one lab for the module.

- The kube-apiserver down: the agents and the tunnel carry on (a ping under capture on
  the underlay loses nothing and shows no plaintext), etcd's records keep their mod
  revisions (the controller deletes nothing when its watches break, even through a
  periodic pass on its stale caches), and when the server returns the controller relists
  every kind and a `kubectl label pod` made after the return reaches etcd. Down for the
  issue's 30 s: three RESYNC periods (10 s) of the controller's periodic pass over etcd
  and many relist retries (2 s each).
- tfcrypt's etcd down: a `kubectl label pod` made meanwhile is retried (failed passes
  logged and counted), the controller does not crash, and the record catches up when
  etcd returns.
- A real 410 Gone: the controller's watches end every WATCH_TIMEOUT_S and resume from
  their last resourceVersion; resumed from one the restarted server no longer holds,
  the pods watch gets a 410 from the real server, the controller relists (reason
  `watch-gap`) and publishes the change made meanwhile.
Counters are read from the controller's log: every `listed ... (reason)` line is one
increment of tfcrypt_controller_resyncs_total{kind,reason} and every `reconcile failed`
line one of tfcrypt_controller_errors_total (tfcrypt/controller/kube.py, run.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import running_lab
from labtools import Pinger, wait_for
from test_controller_lab import (
    NS,
    POLICY,
    TAGS,
    controller_log,
    ips,
    node_of,
    revisions,
    selected_pairs,
    start_controller,
)

from netns_lab import Lab, agents, inventory, kube, kubelet
from netns_lab.procs import ProcessRecord, is_running
from netns_lab.wire import capture, count_packets

pytestmark = pytest.mark.lab

OUTAGE = 30  # seconds: the "kube-apiserver down for 30 s"
WATCH_TIMEOUT_S = 3  # the controller's --watch-timeout here: watches end and resume
INTERVAL = 0.2


def tags_of(lab: Lab, key: str) -> list[str] | None:
    rows = json.loads(inventory.tfcrypt(lab, "workload", "list", "--json"))
    return next((r["tags"] for r in rows if r["key"] == key), None)


def the_controller(lab: Lab) -> ProcessRecord:
    (rec,) = lab.find_processes("tfcrypt-controller")
    return rec


@pytest.fixture(scope="module")
def flab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=2, kubernetes=True) as lab:
        kubelet.put_pods(lab, {w: kubelet.labels_for_tags(t) for w, t in TAGS.items()})
        agents.start_all(lab)
        start_controller(lab, "ctl-f", watch_timeout=WATCH_TIMEOUT_S)
        kube.kubectl(lab, "apply", "-f", "-", input=yaml.safe_dump(POLICY))
        want = {f"workloads/{node_of(w)}/{NS}.{w}" for w in TAGS} | {"policies/payments-db"}
        wait_for("the controller to publish every pod and the policy",
                 lambda: want <= set(revisions(lab)), timeout=60)
        wait_for("the agents to select the pair",
                 lambda: selected_pairs(lab, "n1") == 1 and selected_pairs(lab, "n2") == 1,
                 timeout=30)
        yield lab


def test_api_server_down_keeps_traffic_and_records_then_the_controller_resyncs(
        flab: Lab, tmp_path: Path) -> None:
    addr = ips(flab)
    before = revisions(flab)
    mark = len(controller_log(flab, "ctl-f"))
    pcap = tmp_path / "outage.pcap"
    with capture(flab, pcap):
        pinger = Pinger(flab, "n1-w1", addr["n2-w1"], count=int(OUTAGE / INTERVAL),
                        interval=INTERVAL)
        try:
            kube.apiserver_stop(flab)
            sent, received = pinger.result()
        finally:
            pinger.kill()
    during = controller_log(flab, "ctl-f")[mark:]
    assert received == sent, f"{sent - received} of {sent} pings lost while the API was down"
    assert count_packets(pcap, f"icmp and host {addr['n1-w1']} and host {addr['n2-w1']}") == 0
    assert count_packets(pcap, "udp port 51820") > 0
    assert "relisting" in during, during  # the controller saw its watches break
    assert revisions(flab) == before, "etcd changed while the API server was down"
    assert is_running(the_controller(flab))

    kube.apiserver_start(flab)
    relisted = re.compile(r"listed \d+ (pods|namespaces|encryptionpolicies) \((?!start)")
    wait_for("the controller to relist every kind", lambda: {
        m.group(1) for m in relisted.finditer(controller_log(flab, "ctl-f")[mark:])} == {
        "pods", "namespaces", "encryptionpolicies"}, timeout=60)
    after = revisions(flab)
    assert after == before, ("the resync rewrote records that were right: "
                             f"{after}\n{controller_log(flab, 'ctl-f')[mark:]}")
    key = f"workloads/n2/{NS}.n2-w2"
    kube.kubectl(flab, "label", "pod", "n2-w2", "-n", NS, "tier=web", "--overwrite")
    wait_for("the label made after the return to reach etcd",
             lambda: "tier=web" in (tags_of(flab, key) or []), timeout=30)


def test_etcd_down_the_controller_retries_and_catches_up(flab: Lab) -> None:
    key = f"workloads/n1/{NS}.n1-w2"
    members = [m.name for m in flab.layout.all_members()]
    mark = len(controller_log(flab, "ctl-f"))
    flab.etcd_stop(members)
    try:
        kube.kubectl(flab, "label", "pod", "n1-w2", "-n", NS, "site=b", "--overwrite")
        wait_for("two failed passes (retried, counted)", lambda: controller_log(
            flab, "ctl-f")[mark:].count("reconcile failed") >= 2, timeout=60)
        assert is_running(the_controller(flab))
    finally:
        flab.etcd_start(members)
    start = time.monotonic()
    wait_for("the record to catch up", lambda: "site=b" in (tags_of(flab, key) or []),
             timeout=60)
    print(f"caught up {time.monotonic() - start:.1f}s after etcd returned")
    assert is_running(the_controller(flab))
    assert "site=a" not in (tags_of(flab, key) or [])


def kube_etcdctl(lab: Lab, *args: str) -> str:
    """etcdctl against the API server's own etcd (not tfcrypt's)."""
    return subprocess.run([*lab.exec_prefix("controller"), "etcdctl", "--endpoints",
                           kube.ETCD_CLIENT, *args], capture_output=True, text=True,
                          check=True, env={"ETCDCTL_API": "3",
                                           "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}).stdout


def test_a_real_410_watch_gap_relists_and_keeps_the_change_made_meanwhile(
        flab: Lab) -> None:
    """A real 410 Gone from the real kube-apiserver, and the relist it causes.
    The controller (its watches end every WATCH_TIMEOUT_S, then resume from the last
    resourceVersion seen) is frozen (SIGSTOP) long enough for the server to end every
    watch stream it holds: the end sits unread in its sockets, no stream is open. Then
    a pod changes, the API server's etcd is compacted at its current revision, and the
    API server restarts (its watch cache, which could still serve the old revision, is
    rebuilt from a fresh list). Continued, the controller reads each stream's clean end
    and resumes the watch from its old resourceVersion: the server answers 410 (too old
    for the new cache; for etcd, compacted), the controller relists (reason
    `watch-gap`) and publishes the change made while it was frozen."""
    ctl = the_controller(flab)
    key = f"workloads/n2/{NS}.n2-w1"
    mark = len(controller_log(flab, "ctl-f"))
    rev_before = revisions(flab)[key]
    os.kill(ctl.pid, signal.SIGSTOP)
    try:
        # the server ends each stream WATCH_TIMEOUT_S after it began (after the last
        # resume): nothing outside the frozen process can see that happen, hence a pause
        time.sleep(WATCH_TIMEOUT_S + 2)
        kube.kubectl(flab, "label", "pod", "n2-w1", "-n", NS, "tier=gap", "--overwrite")
        header = json.loads(kube_etcdctl(flab, "endpoint", "status", "-w", "json"))
        kube_etcdctl(flab, "compact", str(header[0]["Status"]["header"]["revision"]))
        kube.apiserver_stop(flab)
        kube.apiserver_start(flab)
    finally:
        os.kill(ctl.pid, signal.SIGCONT)
    gap = re.compile(r"pods: watch-gap \((.*)\): relisting")
    relisted = re.compile(r"listed \d+ pods \(watch-gap\)")
    try:
        wait_for("the pods' watch to meet a 410 and relist", lambda: gap.search(
            log := controller_log(flab, "ctl-f")[mark:]) and relisted.search(log),
            timeout=60)
        wait_for("the change made while frozen to reach etcd",
                 lambda: "tier=gap" in (tags_of(flab, key) or []), timeout=30)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{controller_log(flab, 'ctl-f')[mark:]}") from None
    log = controller_log(flab, "ctl-f")[mark:]
    print(f"the server's answer: {gap.search(log).group(1)}")  # type: ignore[union-attr]
    assert "pods: ClientPayloadError" not in log, log  # the stream had ended, not broken
    assert revisions(flab)[key] > rev_before  # etcdctl: the record was rewritten
    assert is_running(ctl)
