"""`python -m netns_lab demo --kubernetes`: the demo's Kubernetes act (issue #17).

The same 3-node lab and inventory as the main demo, but the cluster is the source of
truth: the lab's real kube-apiserver holds a Pod per workload (labels from the demo
inventory's tags, kubelet.labels_for_tags), `tfcrypt controller run` (leader election
on) turns Pods and EncryptionPolicy objects into signed etcd records, and the demo's act 1
policies are applied with `kubectl apply -f` -- the very files the main demo gives the
CLI, since examples/*.yaml already are EncryptionPolicy objects. Then the main demo's
wire table (demo.measure, not a copy), `kubectl get encryptionpolicies`, and a
`kubectl label pod` that moves a pair in (and one out), shown on the wire. Exit 1 when
the wire disagrees with tfcrypt's own explain().
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from . import agents, demo, kube, kubelet
from .controllers import start_controller
from .demo import (
    ACT1,
    EXAMPLES,
    INVENTORY,
    Progress,
    identities_line,
    load_policies,
    load_tags,
    measure,
    summary,
    table,
    wait_for_enforcement,
)
from .errors import LabError
from .lab import Lab, down
from .layout import Layout

# the label move: n3-w1 (shop db, site west) becomes site=east, so the shop-db rule
# (api <-> db of the same site) now selects n1-w2 <-> n3-w1 and no longer n2-w3 <-> n3-w1
MOVE_POD, MOVE_LABEL = "n3-w1", "site=east"


def _policy_statuses(lab: Lab) -> dict[str, dict[str, Any]]:
    doc = json.loads(kube.kubectl(lab, "get", "encryptionpolicies", "-o", "json").stdout)
    return {o["metadata"]["name"]: o for o in doc.get("items", [])}


def wait_for_status(lab: Lab, names: list[str], timeout: float = 60.0) -> None:
    """Every named policy's status is the controller's answer to its current generation,
    so the `kubectl get` printed next is not a stale one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        objs = _policy_statuses(lab)
        if all(n in objs and (objs[n].get("status") or {}).get("observedGeneration")
               == objs[n]["metadata"]["generation"]
               and (objs[n].get("status") or {}).get("pairs") is not None for n in names):
            return
        time.sleep(0.5)
    raise LabError(f"the controller did not report the status of {names} in {timeout:.0f}s")


def run(name: str, keep: bool = False, *,
        before_measure: Callable[[Lab], None] | None = None,
        workload_api: str = "spire") -> int:
    """The Kubernetes act; `before_measure` is a test hook that may break the lab."""
    progress = Progress(7)
    tags = load_tags()
    lab = Lab(Layout(name, 3, 3, kubernetes=True), workload_api=workload_api)
    failed = False
    try:
        progress.step(f"bringing up lab {name}: 3 nodes x 3 workloads, etcd, "
                      f"{'SPIRE' if workload_api == 'spire' else 'the lab Workload API'}, "
                      "kube-apiserver with the EncryptionPolicy CRD")
        lab.up()
        progress.step(f"a Pod per workload, labelled from {INVENTORY.name}; agents and "
                      "`tfcrypt controller run` (leader election on)")
        kubelet.put_pods(lab, {w: kubelet.labels_for_tags(t) for w, t in tags.items()})
        agents.start_all(lab)
        start_controller(lab, "demo-ctl")
        progress.step("kubectl apply -f " + " -f ".join(f"examples/{f}" for f in ACT1))
        apply = ["apply"]
        for f in ACT1:
            apply += ["-f", str(EXAMPLES / f)]
        print(kube.kubectl(lab, *apply).stdout.rstrip())
        policies = load_policies(ACT1)
        wait_for_enforcement(lab, tags, policies, timeout=90)
        wait_for_status(lab, list(policies))
        print(identities_line(lab), flush=True)
        print(kube.kubectl(lab, "get", "encryptionpolicies").stdout.rstrip(), flush=True)
        if before_measure is not None:
            before_measure(lab)
        with tempfile.TemporaryDirectory(prefix="tfcrypt-kdemo-") as tmp:
            progress.step("pinging every cross-node pair while capturing the underlay")
            act1 = measure(lab, tags, policies, Path(tmp))
            print(table(act1))
            print(summary(act1), flush=True)
            failed |= any(not r.ok for r in act1)
            if failed:
                print("the label move skipped: the wire shows a mismatch", flush=True)
                return 1
            progress.step(f"kubectl label pod {MOVE_POD} {MOVE_LABEL} --overwrite")
            kube.kubectl(lab, "label", "pod", MOVE_POD, "-n", kubelet.POD_NAMESPACE,
                         MOVE_LABEL, "--overwrite")
            key = MOVE_LABEL.split("=", 1)[0]
            moved: Mapping[str, list[str]] = {
                **tags, MOVE_POD: [t for t in tags[MOVE_POD] if not t.startswith(key + "=")]
                + [MOVE_LABEL]}
            wait_for_enforcement(lab, moved, policies, timeout=60)
            wait_for_status(lab, list(policies))
            print(kube.kubectl(lab, "get", "encryptionpolicies").stdout.rstrip())
            progress.step("the same traffic again (* = expectation changed)")
            act2 = measure(lab, moved, policies, Path(tmp),
                           previous={(r.src, r.dst): r for r in act1})
            print(table(act2))
            print(summary(act2), flush=True)
            failed |= any(not r.ok for r in act2)
        progress.step("done: " + ("MISMATCH, see the rows marked above" if failed
                                  else "every flow as expected"))
        if keep:
            print(f"\nThe lab stays up: python -m netns_lab kubectl --name {name} -- get "
                  f"encryptionpolicies\nTake it down with: python -m netns_lab down --name "
                  f"{name}")
        return 1 if failed else 0
    finally:
        if not keep:
            down(name)
            print(f"lab {name} is down", flush=True)


def run_all(name: str, keep: bool = False, *, workload_api: str = "spire") -> int:
    """`demo` without flags: acts 1 and 2 (demo.run), then this act as act 3 in a fresh
    lab of the same name (the first is down by then; `keep` keeps only the last). Both
    fit the 3 minutes the issue allows warm (docs in README "The demo")."""
    code = demo.run(name, workload_api=workload_api)
    if code:
        print("act 3 (Kubernetes) skipped: acts 1-2 show a mismatch", flush=True)
        return code
    print("\nact 3: the same policies from Kubernetes (kubectl apply, tfcrypt controller)",
          flush=True)
    return run(name, keep, workload_api=workload_api)
