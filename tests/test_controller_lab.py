"""`tfcrypt controller run` against the lab's real kube-apiserver, real SPIRE-less lab
Workload API (the controller's own socket), real etcd and real agents: what a cluster
user notices (docs/controller.md).

- Pods become signed workload records `workloads/<node>/lab.<pod>` (etcdctl), with the
  tags their labels mean; a finished pod's record goes when the object does.
- `kubectl apply` of an EncryptionPolicy: on the underlay exactly the selected pair is
  inside WireGuard; `kubectl label pod` moves another pair in.
- A policy the API server accepts but tfcrypt's parser refuses gets Accepted=False with
  the field, and nothing in etcd.
- A restarted controller rewrites nothing (etcd mod revisions unchanged).
One lab for the module: the API server's start is the slow part.
"""

from __future__ import annotations

import base64
import itertools
import json
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import running_lab
from labtools import PREFIX, agent_status, etcdctl, wait_for

from netns_lab import Lab, agents, inventory, kube, kubelet
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


def start_controller(lab: Lab, name: str) -> ProcessRecord:
    st = lab.status()
    argv = [sys.executable, "-m", "tfcrypt", "controller", "run",
            "--kubeconfig", str(kube.kubeconfig(lab.layout, "controller")),
            "--etcd", ",".join(st["etcd"]["endpoints"]),
            "--spiffe-socket", st["controller"]["spiffe_socket"],
            *(["--etcd-tls"] if st["etcd"].get("tls") else []),
            "--identity", name, "--log-level", "info"]
    return lab.start_process("tfcrypt-controller", argv, target="controller",
                             extra_prefix=lab.identity_prefix(),
                             log_name=f"tfcrypt-controller-{name}.log")


def controller_log(lab: Lab, name: str) -> str:
    path = lab.layout.logs_dir / f"tfcrypt-controller-{name}.log"
    return path.read_text() if path.exists() else ""


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


def test_a_second_replica_takes_over_when_the_leader_dies(klab: Lab) -> None:
    wait_for("ctl-b to hold the Lease", lambda: lease_holder(klab) == "ctl-b", timeout=30)
    start_controller(klab, "ctl-c")
    wait_for("ctl-c to list the cluster", lambda: "listed" in controller_log(klab, "ctl-c"),
             timeout=60)
    (leader,) = [p for p in klab.find_processes("tfcrypt-controller")
                 if "ctl-b" in " ".join(p.argv)]
    klab.stop_process(leader, sig=signal.SIGKILL)
    kube.kubectl(klab, "label", "pod", "n2-w1", "-n", NS, "site=b", "--overwrite")
    key = f"workloads/n2/{NS}.n2-w1"

    def moved() -> bool:
        rows = json.loads(inventory.tfcrypt(klab, "workload", "list", "--json"))
        return any(r["key"] == key and "site=b" in r["tags"] for r in rows)
    wait_for("ctl-c to take over and publish the new label", moved, timeout=15)
    assert lease_holder(klab) == "ctl-c"
    log = controller_log(klab, "ctl-c")
    before = log[:log.index("ctl-c leads")]
    assert " updated " not in before and " created " not in before, "a follower wrote"
