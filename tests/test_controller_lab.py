"""`tfcrypt controller run` against the lab's real kube-apiserver, real SPIRE-less lab
Workload API (the controller's own socket), real etcd and real agents: what a cluster
user notices (docs/controller.md).

- Pods become signed workload records `workloads/<node>/lab.<pod>` (etcdctl), with the
  tags their labels mean; a finished pod's record goes when the object does.
- `kubectl apply` of an EncryptionPolicy: on the underlay exactly the selected pair is
  inside WireGuard; `kubectl label pod` moves another pair in.
- `kubectl label namespace` moves a pair in and out (namespace labels inherited as tags,
  a pod's own label of the type wins), each within the issue's 2 s; `kubectl delete
  encryptionpolicy` of every policy returns every pair to plaintext on the underlay.
- A policy the API server accepts but tfcrypt's parser refuses gets Accepted=False with
  the field, and nothing in etcd.
- A restarted controller rewrites nothing (etcd mod revisions unchanged).
- Odd pods (not backed by lab namespaces: only their records are checked) are handled as
  docs/controller.md says and counted on the controller's metrics endpoint, the lab's
  pods untouched: 200 labels, labels that are no tag, host network, an IP moving to
  another pod (after the first finished; while the first still lists it).
- The leader frozen and then killed while labels change: the other replica takes over
  within 15 s, etcd ends equal to the cluster, one key per pod, nothing written by the
  deposed leader after it stopped.
One lab for the module: the API server's start is the slow part.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import running_lab
from labtools import PREFIX, agent_status, etcdctl, wait_for
from prometheus_client.parser import text_string_to_metric_families

from netns_lab import Lab, agents, controllers, inventory, kube, kubelet
from netns_lab.controllers import controller_log
from netns_lab.procs import ProcessRecord
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

TAGS = {"n1-w1": ["application=payments", "site=a"],
        "n1-w2": ["application=shop", "site=a"],
        "n2-w1": ["application=db", "site=a", "label=pci"],
        "n2-w2": ["application=shop", "site=b"]}
POLICY = {"apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
          "metadata": {"name": "payments-db"},
          "spec": {"rules": [{"endpoint1": {"tags": ["application=payments"]},
                              "endpoint2": {"tags": ["application=db"]}}]}}
NS = kubelet.POD_NAMESPACE
METRICS_PORTS = {"ctl-a": 9471, "ctl-b": 9472, "ctl-c": 9473, "ctl-f": 9474}


def start_controller(lab: Lab, name: str, watch_timeout: int | None = None) -> ProcessRecord:
    """A replica with its own metrics port (replicas share the controller namespace)."""
    return controllers.start_controller(lab, name, metrics_port=METRICS_PORTS[name],
                                        watch_timeout=watch_timeout)


def revisions(lab: Lab, prefix: str = "") -> dict[str, int]:
    """etcd key (under the tfcrypt prefix) -> mod_revision, as etcdctl reports it."""
    doc = json.loads(etcdctl(lab, "get", "--prefix", f"{PREFIX}/{prefix}", "-w", "json"))
    return {base64.b64decode(kv["key"]).decode().removeprefix(f"{PREFIX}/"): kv["mod_revision"]
            for kv in doc.get("kvs") or []}


def ips(lab: Lab) -> dict[str, str]:
    return {w["name"]: w["ip"] for w in lab.status()["workloads"]}


def node_of(name: str) -> str:
    return name.split("-")[0]


def observe(lab: Lab, pcap: Path) -> dict[tuple[str, str], str]:
    """Ping every cross-node pair while capturing on the underlay: tunnel or plaintext."""
    addr = ips(lab)
    pairs = [(a, b) for a, b in itertools.combinations(sorted(addr), 2)
             if node_of(a) != node_of(b)]
    with capture(lab, pcap):
        got = {p: ping(lab, p[0], addr[p[1]], count=2, interval=0.05) for p in pairs}
        for p in [p for p, n in got.items() if not n]:  # a lost handshake: one slower try
            got[p] = ping(lab, p[0], addr[p[1]], count=4, interval=2)
    return {(a, b): ("lost" if not got[(a, b)] else "plaintext" if count_packets(
        pcap, f"icmp and host {addr[a]} and host {addr[b]}") else "tunnel") for a, b in pairs}


def selected_pairs(lab: Lab, node: str) -> int | None:
    return agent_status(lab, node).get("selected_pairs")


def policy_object(lab: Lab, name: str) -> dict[str, Any]:
    return json.loads(kube.kubectl(lab, "get", "encryptionpolicy", name, "-o", "json").stdout)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or []
                 if c["type"] == kind), None)


@pytest.fixture(scope="module")
def klab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=2, kubernetes=True) as lab:
        kubelet.put_pods(lab, {w: kubelet.labels_for_tags(t) for w, t in TAGS.items()})
        agents.start_all(lab)
        start_controller(lab, "ctl-a")
        yield lab


def test_pods_become_signed_workload_records(klab: Lab) -> None:
    want = {f"workloads/{node_of(w)}/{NS}.{w}" for w in TAGS}
    wait_for("the controller to publish every pod", lambda: want <= set(revisions(klab)),
             timeout=60)
    rows = {r["key"]: r for r in json.loads(
        inventory.tfcrypt(klab, "workload", "list", "--json"))}
    row = rows[f"workloads/n2/{NS}.n2-w1"]
    assert row["state"] == "ok"
    assert row["tags"] == ["application=db", "label=pci", f"namespace={NS}", "site=a"]
    assert row["ips"] == [ips(klab)["n2-w1"]]


def test_kubectl_apply_encrypts_exactly_the_selected_pair_and_label_moves_one_in(
        klab: Lab, tmp_path: Path) -> None:
    kube.kubectl(klab, "apply", "-f", "-", input=yaml.safe_dump(POLICY))
    wait_for("policies/payments-db in etcd",
             lambda: "policies/payments-db" in revisions(klab, "policies/"), timeout=30)
    wait_for("the agents to select one pair",
             lambda: selected_pairs(klab, "n1") == 1 and selected_pairs(klab, "n2") == 1,
             timeout=30)
    seen = observe(klab, tmp_path / "one.pcap")
    assert {p: s for p, s in seen.items() if s != "plaintext"} == {("n1-w1", "n2-w1"): "tunnel"}
    assert count_packets(tmp_path / "one.pcap", "udp port 51820") > 0
    obj = wait_for("the status", lambda: (o if (o := policy_object(klab, "payments-db"))
                                          .get("status", {}).get("pairs") == 1 else None))
    assert condition(obj, "Accepted")["status"] == "True"  # type: ignore[index]
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    table = kube.kubectl(klab, "get", "encryptionpolicies").stdout
    assert table.split("\n")[0].split()[:5] == ["NAME", "MODE", "ACCEPTED", "READY", "PAIRS"]

    # n2-w2 becomes a db: the pair n1-w1 <-> n2-w2 moves inside WireGuard
    kube.kubectl(klab, "label", "pod", "n2-w2", "-n", NS, "application=db", "--overwrite")
    wait_for("the agents to select two pairs", lambda: selected_pairs(klab, "n1") == 2,
             timeout=30)
    seen = observe(klab, tmp_path / "two.pcap")
    assert {p: s for p, s in seen.items() if s != "plaintext"} == {
        ("n1-w1", "n2-w1"): "tunnel", ("n1-w1", "n2-w2"): "tunnel"}


ZONE_POLICY = {**POLICY, "metadata": {"name": "zone-z1"},
               "spec": {"rules": [{"endpoint1": {"tags": ["zone=z1"]},
                                   "endpoint2": {"tags": ["zone=z1"]}}]}}
CONVERGENCE_BOUND_S = 2.0  # the issue: a `kubectl label` moves a pair in or out within 2 s


def converge(lab: Lab, what: str, want: dict[str, int], since: float) -> float:
    """Seconds from `since` (time.monotonic) until every agent reports `want[node]`
    selected pairs (status.json, written once that selection is applied); fails naming
    the seen time once the issue's bound has passed. Polls status.json directly: one
    lab.status() per poll would cost more than the resolution the bound needs."""
    paths = {n["name"]: Path(n["agent"]["state_dir"]) / "status.json"
             for n in lab.status()["nodes"] if n["name"] in want}
    seen: dict[str, Any] = {}
    while True:
        with contextlib.suppress(OSError, ValueError):
            seen = {n: json.loads(p.read_text()).get("selected_pairs") for n, p in paths.items()}
        took = time.monotonic() - since
        if seen == want:
            return took
        assert took <= CONVERGENCE_BOUND_S, (
            f"{what}: not converged {took:.2f}s after the change (bound "
            f"{CONVERGENCE_BOUND_S:.0f}s): selected pairs {seen}, want {want}")
        time.sleep(0.05)


def test_kubectl_label_namespace_moves_a_pair_in_and_out_and_delete_returns_plaintext(
        klab: Lab, tmp_path: Path) -> None:
    """Namespace labels are inherited as tags (a pod's own label of the type wins):
    labelling the pods' namespace `zone=z1` under a zone=z1 <-> zone=z1 policy moves
    n1-w2 <-> n2-w1 inside WireGuard, while n2-w2's own `zone=other` keeps
    n1-w2 <-> n2-w2 in plaintext; removing the label moves the pair out, each within
    the issue's 2 s (from the kubectl command to both agents applying it). Deleting the
    policies returns every pair to plaintext. Leaves the lab as it found it: the
    previous test's two tunnelled pairs (payments-db, n2-w2 application=db)."""
    before = {"n1": 2, "n2": 2}  # the previous test's two pairs
    converge(klab, "the previous test's two pairs", before, time.monotonic())
    kube.kubectl(klab, "label", "pod", "n2-w2", "-n", NS, "zone=other")
    kube.kubectl(klab, "apply", "-f", "-", input=yaml.safe_dump(ZONE_POLICY))
    wait_for("policies/zone-z1 in etcd",
             lambda: "policies/zone-z1" in revisions(klab, "policies/"), timeout=30)
    seen = observe(klab, tmp_path / "before.pcap")
    assert {p: s for p, s in seen.items() if s != "plaintext"} == {
        ("n1-w1", "n2-w1"): "tunnel", ("n1-w1", "n2-w2"): "tunnel"}, "zone-z1 selected a pair"

    start = time.monotonic()
    kube.kubectl(klab, "label", "namespace", NS, "zone=z1")
    took_in = converge(klab, "label namespace zone=z1", {"n1": 3, "n2": 3}, start)
    seen = observe(klab, tmp_path / "in.pcap")
    assert {p: s for p, s in seen.items() if s != "plaintext"} == {
        ("n1-w1", "n2-w1"): "tunnel", ("n1-w1", "n2-w2"): "tunnel",
        ("n1-w2", "n2-w1"): "tunnel"}, f"after label namespace: {seen}"
    rows = records(klab)
    assert "zone=z1" in rows[f"workloads/n1/{NS}.n1-w2"]["tags"]  # inherited
    assert "zone=other" in rows[f"workloads/n2/{NS}.n2-w2"]["tags"]  # its own wins
    assert "zone=z1" not in rows[f"workloads/n2/{NS}.n2-w2"]["tags"]

    start = time.monotonic()
    kube.kubectl(klab, "label", "namespace", NS, "zone-")
    took_out = converge(klab, "label namespace zone-", before, start)
    seen = observe(klab, tmp_path / "out.pcap")
    assert {p: s for p, s in seen.items() if s != "plaintext"} == {
        ("n1-w1", "n2-w1"): "tunnel", ("n1-w1", "n2-w2"): "tunnel"}, f"after zone-: {seen}"
    print(f"label namespace: in after {took_in:.2f}s, out after {took_out:.2f}s")

    kube.kubectl(klab, "delete", "encryptionpolicy", "zone-z1", "payments-db")
    wait_for("both policies gone from etcd", lambda: not {
        "policies/zone-z1", "policies/payments-db"} & set(revisions(klab, "policies/")),
        timeout=30)
    wait_for("the agents to select nothing", lambda: selected_pairs(klab, "n1") == 0
             and selected_pairs(klab, "n2") == 0, timeout=30)
    seen = observe(klab, tmp_path / "deleted.pcap")
    assert set(seen.values()) == {"plaintext"}, f"after delete encryptionpolicy: {seen}"

    # restore what the module's later tests start from
    kube.kubectl(klab, "label", "pod", "n2-w2", "-n", NS, "zone-")
    kube.kubectl(klab, "apply", "-f", "-", input=yaml.safe_dump(POLICY))
    wait_for("the two pairs back", lambda: all(
        selected_pairs(klab, n) == v for n, v in before.items()), timeout=30)
    wait_for("n2-w2's record without zone", lambda: not any(
        t.startswith("zone=") for t in records(klab)[f"workloads/n2/{NS}.n2-w2"]["tags"]),
        timeout=30)


def test_a_policy_the_parser_refuses_gets_the_condition_and_nothing_in_etcd(
        klab: Lab) -> None:
    # NBSP: RE2's \s (the CRD pattern) is ASCII whitespace, Python's is Unicode: the API
    # server stores it, tfcrypt's parser refuses a value with a space in it
    bad = {**POLICY, "metadata": {"name": "nbsp"},
           "spec": {"rules": [{"endpoint1": {"tags": ["application=pay\u00a0ments"]},
                               "endpoint2": {"any": True}}]}}
    kube.kubectl(klab, "apply", "-f", "-", input=yaml.safe_dump(bad, allow_unicode=True))
    obj = wait_for("Accepted=False", lambda: (o if (c := condition(
        o := policy_object(klab, "nbsp"), "Accepted")) and c["status"] == "False" else None),
        timeout=30)
    message = condition(obj, "Accepted")["message"]  # type: ignore[index]
    assert "spec.rules[0].endpoint1.tags[0]" in message, message
    assert "policies/nbsp" not in revisions(klab, "policies/")


def test_a_finished_pod_keeps_its_record_while_terminating_then_it_goes(klab: Lab) -> None:
    key = f"workloads/n1/{NS}.n1-w2"
    kubelet.delete_pod(klab, "n1-w2")
    assert key in revisions(klab, "workloads/")  # Terminating: still there
    kubelet.finish_pod(klab, "n1-w2")
    wait_for("the record to go", lambda: key not in revisions(klab, "workloads/"),
             timeout=30)


def test_a_restarted_controller_rewrites_nothing(klab: Lab) -> None:
    before = revisions(klab)
    (rec,) = klab.find_processes("tfcrypt-controller")
    klab.stop_process(rec)
    start_controller(klab, "ctl-b")
    wait_for("the new controller's first pass",
             lambda: "pass 1:" in controller_log(klab, "ctl-b"), timeout=60)
    assert "0 written, 0 deleted" in controller_log(klab, "ctl-b")
    assert revisions(klab) == before


def lease_holder(lab: Lab) -> str:
    return kube.kubectl(lab, "get", "lease", "tfcrypt-controller", "-n", "tfcrypt-system",
                        "-o", "jsonpath={.spec.holderIdentity}").stdout.strip()


def controller_metrics(lab: Lab, name: str) -> dict[str, dict[str, float]]:
    """`name`'s Prometheus samples, read inside the controller's namespace:
    {sample: {reason (or ""): value}}."""
    url = f"http://127.0.0.1:{METRICS_PORTS[name]}/metrics"
    body = subprocess.run(
        [*lab.exec_prefix("controller"), sys.executable, "-c",
         "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
         f"{url!r}, timeout=5).read().decode())"],
        capture_output=True, text=True, check=True, timeout=30).stdout
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out.setdefault(sample.name, {})[sample.labels.get("reason", "")] = sample.value
    return out


def fake_pod(lab: Lab, name: str, node: str, pod_ips: list[str], labels: dict[str, str],
             *, start: str, host_network: bool = False, phase: str = "Running") -> None:
    """A Running pod no lab namespace backs (its record is what is checked), shaped as
    kubelet.pod_objects makes the lab's, with its own name, IPs and status.startTime."""
    template = next(w["name"] for w in lab.status()["workloads"] if w["node"] == node)
    (obj,), (status,) = kubelet.pod_objects(lab, {template: labels}, only=[template])
    obj["metadata"]["name"] = status["metadata"]["name"] = name
    if host_network:
        obj["spec"]["hostNetwork"] = True
    status["status"].update(phase=phase, startTime=start, podIP=pod_ips[0],
                            podIPs=[{"ip": ip} for ip in pod_ips])
    for doc, sub in ((obj, []), (status, ["--subresource=status"])):
        kube.kubectl(lab, "apply", "--server-side", "--field-manager=test", *sub,
                     "--force-conflicts", "-f", "-", input=yaml.safe_dump(doc))


def records(lab: Lab) -> dict[str, dict[str, Any]]:
    """`tfcrypt workload list --json` by key."""
    return {r["key"]: r for r in json.loads(
        inventory.tfcrypt(lab, "workload", "list", "--json"))}


def record_size(lab: Lab, key: str) -> int:
    doc = json.loads(etcdctl(lab, "get", f"{PREFIX}/{key}", "-w", "json"))
    return len(base64.b64decode(doc["kvs"][0]["value"]))


def test_odd_pods_are_handled_as_documented_and_counted_the_lab_untouched(
        klab: Lab) -> None:
    lab_keys = {k: r for k, r in revisions(klab, "workloads/").items() if f"/{NS}.n" in k}
    many = {f"custom{i:03d}": "v" for i in range(200)} | {"application": "big"}
    fake_pod(klab, "odd-many", "n1", ["10.200.1.201"], many, start="2026-12-03T10:00:00Z")
    fake_pod(klab, "odd-labels", "n1", ["10.200.1.202"],
             {"site": "", "app.version": "1", "9lives": "x", "tier": "web"},
             start="2026-12-03T10:00:00Z")
    node_ip = klab.layout.all_nodes()[1].underlay_ip
    fake_pod(klab, "odd-hostnet", "n2", [node_ip], {"application": "payments"},
             start="2026-12-03T10:00:00Z", host_network=True)
    big, odd = f"workloads/n1/{NS}.odd-many", f"workloads/n1/{NS}.odd-labels"
    rows = wait_for("both odd records", lambda: (r if {big, odd} <= set(r := records(klab))
                                                 else None), timeout=30)
    want = ["application=big", *(f"custom{i:03d}=v" for i in range(62)), f"namespace={NS}"]
    assert rows[big]["state"] == "ok" and rows[big]["tags"] == sorted(want)
    assert record_size(klab, big) < 64 * 1024
    assert rows[odd]["state"] == "ok" and rows[odd]["tags"] == [f"namespace={NS}", "tier=web"]
    assert not any("odd-hostnet" in k for k in rows), "a host-network pod got a record"
    m = wait_for("the skips counted", lambda: (
        m if (m := controller_metrics(klab, "ctl-b"))["tfcrypt_controller_pods_skipped"]
        .get("host-network") == 1 else None), timeout=30)
    ignored = m["tfcrypt_controller_labels_ignored"]
    assert ignored["over-max-tags"] == 200 + 2 - 64
    assert ignored["value-not-a-tag-value"] >= 1 and ignored["key-not-a-tag-type"] >= 2
    # the 200-label record is deterministic: a pass over the same labels rewrites nothing
    rev = revisions(klab, "workloads/")[big]
    fake_pod(klab, "odd-many", "n1", ["10.200.1.201"], dict(reversed(many.items())),
             start="2026-12-03T10:00:00Z")
    kube.kubectl(klab, "label", "pod", "odd-labels", "-n", NS, "tier=db", "--overwrite")
    wait_for("the next pass", lambda: "tier=db" in records(klab)[odd]["tags"], timeout=30)
    assert revisions(klab, "workloads/")[big] == rev
    now = revisions(klab, "workloads/")
    assert {k: now.get(k) for k in lab_keys} == lab_keys, "a lab pod's record changed"
    for name in ("odd-many", "odd-labels", "odd-hostnet"):
        kubelet.delete_pod(klab, name, force=True)


def test_an_ip_that_moves_to_another_pod_is_published_for_the_newest_only(
        klab: Lab) -> None:
    ip, ip2 = "10.200.1.211", "10.200.1.212"
    a, b = f"workloads/n1/{NS}.mv-a", f"workloads/n2/{NS}.mv-b"
    c, d = f"workloads/n1/{NS}.mv-c", f"workloads/n2/{NS}.mv-d"
    # A finishes, then B gets its IP
    fake_pod(klab, "mv-a", "n1", [ip], {"tier": "a"}, start="2026-12-03T10:00:00Z")
    wait_for("A's record", lambda: a in records(klab), timeout=30)
    fake_pod(klab, "mv-a", "n1", [ip], {"tier": "a"}, start="2026-12-03T10:00:00Z",
             phase="Succeeded")
    fake_pod(klab, "mv-b", "n2", [ip], {"tier": "b"}, start="2026-12-03T10:01:00Z")
    rows = wait_for("B to own the IP, A gone", lambda: (
        r if b in (r := records(klab)) and a not in r else None), timeout=30)
    assert rows[b]["ips"] == [ip] and rows[b]["tags"] == [f"namespace={NS}", "tier=b"]
    # D reports C's IP while C (older, Running) still lists it
    fake_pod(klab, "mv-c", "n1", [ip2], {"tier": "c"}, start="2026-12-03T10:02:00Z")
    wait_for("C's record", lambda: c in records(klab), timeout=30)
    fake_pod(klab, "mv-d", "n2", [ip2], {"tier": "d"}, start="2026-12-03T10:03:00Z")
    rows = wait_for("D to own the IP, C's record gone", lambda: (
        r if d in (r := records(klab)) and c not in r else None), timeout=30)
    assert rows[d]["ips"] == [ip2]
    claimants = [k for k, r in rows.items() if ip2 in r["ips"] or ip in r["ips"]]
    assert sorted(claimants) == [b, d], "an IP is claimed by a stale pod's record"
    m = controller_metrics(klab, "ctl-b")
    assert m["tfcrypt_controller_ip_conflicts"][""] == 1
    assert m["tfcrypt_controller_pods_skipped"]["ip-conflict"] == 1
    assert "mv-c" in controller_log(klab, "ctl-b").split("address 10.200.1.212")[-1]
    # C goes: D keeps the IP, nothing contested any more
    kubelet.delete_pod(klab, "mv-c", force=True)
    wait_for("no conflict left", lambda: controller_metrics(klab, "ctl-b")[
        "tfcrypt_controller_ip_conflicts"][""] == 0, timeout=30)
    assert records(klab)[d]["ips"] == [ip2]
    for name in ("mv-a", "mv-b", "mv-d"):
        kubelet.delete_pod(klab, name, force=True)
    wait_for("the movers' records gone", lambda: not any(
        ".mv-" in k for k in revisions(klab, "workloads/")), timeout=30)


class LabelStream:
    """Label changes, one after another, on the lab's pods until stopped: `gen=<i>` on
    each pod in turn; `last` holds what each pod was labelled last."""

    def __init__(self, lab: Lab, pods: list[str]) -> None:
        self.lab, self.pods = lab, pods
        self.last: dict[str, str] = {}
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for i in itertools.count():
            if self._stop.is_set():
                return
            pod = self.pods[i % len(self.pods)]
            kube.kubectl(self.lab, "label", "pod", pod, "-n", NS, f"gen=g{i}", "--overwrite")
            self.last[pod] = f"g{i}"
            self.count = i + 1
            time.sleep(0.2)

    def __enter__(self) -> LabelStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_the_leader_dies_while_pods_change_the_other_replica_converges_etcd(
        klab: Lab) -> None:
    """The leader (ctl-b) is frozen (SIGSTOP: it neither renews nor writes, as if dead or
    cut off) in the middle of a stream of label changes; ctl-c must take over within
    15 s (the issue's bound) and etcd end equal to the cluster, one key per pod. Then the
    frozen leader wakes with its stale cache and pending work: it must write nothing
    (the Lease check and the per-write fence), before it is killed for good."""
    wait_for("ctl-b to hold the Lease", lambda: lease_holder(klab) == "ctl-b", timeout=30)
    start_controller(klab, "ctl-c")
    wait_for("ctl-c to list the cluster", lambda: "listed" in controller_log(klab, "ctl-c"),
             timeout=60)
    (leader,) = [p for p in klab.find_processes("tfcrypt-controller")
                 if "ctl-b" in " ".join(p.argv)]
    pods = sorted(o["metadata"]["name"] for o in json.loads(kube.kubectl(
        klab, "get", "pods", "-n", NS, "-o", "json").stdout)["items"])
    frozen = False
    try:
        with LabelStream(klab, pods) as stream:
            wait_for("a few label changes", lambda: stream.count >= 3, timeout=30)
            os.kill(leader.pid, signal.SIGSTOP)
            frozen, frozen_at = True, stream.count
            wait_for("ctl-c to take the Lease", lambda: lease_holder(klab) == "ctl-c",
                     timeout=15)
            wait_for("more changes under the new leader",
                     lambda: stream.count >= frozen_at + 2 * len(pods), timeout=30)
    finally:
        if frozen and sys.exc_info()[0] is not None:
            os.kill(leader.pid, signal.SIGCONT)  # let the teardown stop it
    final = dict(stream.last)

    def converged() -> dict[str, dict[str, Any]] | None:
        rows = records(klab)
        ok = all(f"gen={final[p]}" in (rows.get(f"workloads/{node_of(p)}/{NS}.{p}") or {})
                 .get("tags", []) for p in final)
        return rows if ok else None
    rows = wait_for("etcd to hold every pod's last labels", converged, timeout=30)
    keys = [k for k in rows if k.startswith("workloads/") and f"/{NS}." in k]
    assert sorted(k.rsplit(".", 1)[-1] for k in keys) == pods, "a pod lost or duplicated"
    assert all(rows[k]["state"] == "ok" for k in keys)

    def records_revisions() -> dict[str, int]:
        return {**revisions(klab, "workloads/"), **revisions(klab, "policies/")}
    settled = records_revisions()
    log_before = len(controller_log(klab, "ctl-b"))
    os.kill(leader.pid, signal.SIGCONT)
    wait_for("ctl-b to notice it lost the Lease",
             lambda: "lost the Lease" in controller_log(klab, "ctl-b")[log_before:],
             timeout=30)
    klab.stop_process(leader, sig=signal.SIGKILL)
    woke = controller_log(klab, "ctl-b")[log_before:]
    assert not any(w in woke for w in (" created ", " updated ", " deleted ")), woke
    assert records_revisions() == settled, "a record changed after ctl-c had converged"
    assert lease_holder(klab) == "ctl-c"
    log = controller_log(klab, "ctl-c")
    before = log[:log.index("ctl-c leads")]
    assert " updated " not in before and " created " not in before, "a follower wrote"
