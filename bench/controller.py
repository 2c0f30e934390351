"""The Kubernetes controller at scale (issue #17, Performance): K1 initial sync of 10,000
pods, K2 `kubectl label` to every node's dataplane.

Run `python -m bench.controller [--quick]` as root.

Rules:
- One lab (2 nodes x 1 workload, `kubernetes=True`: real kube-apiserver and its etcd,
  random name from run_prefix) serves both figures and is taken down in a `finally`.
- Pods are created fast: `kubectl apply --server-side` of v1 Lists of BATCH pods, then
  their Running status and podIPs through the status subresource (the lab's kubelet
  writes them the same way, netns_lab/kubelet.py). They are spread over the lab's nodes,
  in the lab's pod namespace, with addresses from a range no lab workload uses
  (10.250.0.0/16): no namespace sits behind them, and they carry only an `app` label.
- K2 first (its pod count is smaller): the lab's two real workloads get labels, a
  policy selects application=payments <-> application=db, agents run on both nodes.
  Each toggle labels n2-w1 `application=db` / `application=shop` in turn (the selected
  pair moves in / out); time zero is just before the kubectl call, the end is the last
  `inet tfcrypt` line of the node's `nft monitor` on every node (as bench/convergence.py
  C1 does), after which the pair is checked in both nodes' selector sets.
- K1 then: controller and agents stopped, the remaining pods created, tfcrypt's
  workload records removed from etcd, a controller started cold; time zero is just
  before its fork, the end is the first poll (every 0.2 s, `etcdctl get --limit 1 -w
  json`: its count is every match) that counts every pod's record. RSS is the
  controller's VmHWM (peak) at that moment.
- A K2 that fails (no nft change seen) is recorded in the results' extra with the
  agents' last log lines, and K1 still runs.
- Benchmarks report, never assert; a goal missed is reported, not a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import yaml

from bench.common import Figure, Goal, conditions, markdown_table, run_prefix, write_results
from bench.convergence import Percentile, Stamped, stamped, tfcrypt_event
from netns_lab import Lab, Layout, agents, down, kube, kubelet
from netns_lab.controllers import start_controller, stop_controllers
from tfcrypt.dataplane.nft_table import INFRA

T = TypeVar("T")
PREFIX = "/tfcrypt/v1"
NODES = ("n1", "n2")
NS = kubelet.POD_NAMESPACE
BATCH = 500
SETTLE = 0.3
POLICY = {"apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
          "metadata": {"name": "payments-db"},
          "spec": {"rules": [{"endpoint1": {"tags": ["application=payments"]},
                              "endpoint2": {"tags": ["application=db"]}}]}}


# ---------------------------------------------------------------- pure helpers

def pod_ip(i: int) -> str:
    """The i-th synthetic pod's address in 10.250.0.0/16 (i < 65,024); the lab's own
    workloads are in 10.200.0.0/16, and an address two records claim is given to none."""
    return f"10.250.{i // 254}.{i % 254 + 1}"


def synthetic_pods(start: int, count: int, nodes: tuple[str, ...]
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Pod objects, their status documents) for pods `bench-<i>`, round-robin on nodes."""
    objs, statuses = [], []
    for i in range(start, start + count):
        meta = {"name": f"bench-{i:05d}", "namespace": NS}
        objs.append({"apiVersion": "v1", "kind": "Pod",
                     "metadata": {**meta, "labels": {"app": f"a{i % 50}"}},
                     "spec": {"nodeName": nodes[i % len(nodes)],
                              "automountServiceAccountToken": False,
                              "enableServiceLinks": False,
                              "containers": [{"name": "w", "image": kubelet.IMAGE}]}})
        statuses.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                         "status": {"phase": "Running", "podIP": pod_ip(i),
                                    "podIPs": [{"ip": pod_ip(i)}]}})
    return objs, statuses


def as_list(items: list[dict[str, Any]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := probe():
            return got
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------- lab

def create_pods(lab: Lab, start: int, count: int) -> float:
    """Create `count` synthetic pods with their status; returns the seconds it took."""
    t = time.monotonic()
    for lo in range(start, start + count, BATCH):
        objs, statuses = synthetic_pods(lo, min(BATCH, start + count - lo), NODES)
        for items, extra in ((objs, []), (statuses, ["--subresource=status"])):
            kube.kubectl(lab, "apply", "--server-side", "--field-manager=bench",
                         "--force-conflicts", *extra, "-f", "-", input=as_list(items),
                         timeout=300)
    return time.monotonic() - t


def etcdctl(lab: Lab, *args: str) -> str:
    st = lab.status()
    tls = st["etcd"].get("tls")
    argv = [*lab.exec_prefix("controller"), "etcdctl",
            f"--endpoints={','.join(st['etcd']['endpoints'])}", *args]
    if tls:
        raise RuntimeError("bench.controller expects a lab without etcd TLS")
    done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "ETCDCTL_API": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def record_count(lab: Lab) -> int:
    out = etcdctl(lab, "get", "--prefix", f"{PREFIX}/workloads/", "--keys-only",
                 "--limit", "1", "-w", "json")  # count: every match, whatever the limit
    return int(json.loads(out).get("count", 0))


def hwm_mib(pid: int) -> float:
    """Peak resident set (VmHWM) of `pid`, MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def selects(lab: Lab, node: str, remote_ip: str) -> bool:
    """Whether `node`'s table holds `remote_ip` in a selector set: the pair is selected
    there. (The out/in maps list the node's own classified workloads, selected or not:
    n1-w1 is in n1's out map before any db exists, so they cannot tell.)"""
    out = subprocess.run([*lab.exec_prefix(node), "nft", "-j", "list", "sets", "inet"],
                         capture_output=True, text=True, check=True).stdout
    return any(o["set"].get("table") == "tfcrypt"
               and not o["set"]["name"].startswith(f"{INFRA}_")
               and remote_ip in o["set"].get("elem", [])
               for o in json.loads(out)["nftables"] if "set" in o)


def pair_selected(lab: Lab) -> dict[str, bool]:
    """For the K2 pair n1-w1 <-> n2-w1: is it selected on each node?"""
    addr = {w["name"]: w["ip"] for w in lab.status()["workloads"]}
    return {"n1": selects(lab, "n1", addr["n2-w1"]), "n2": selects(lab, "n2", addr["n1-w1"])}


# ---------------------------------------------------------------- K2

def toggle_once(lab: Lab, monitors: list[Stamped], *, on: bool,
                timeout: float = 20) -> dict[str, Any]:
    t0 = time.time()
    kube.kubectl(lab, "label", "pod", "n2-w1", "-n", NS,
                 f"application={'db' if on else 'shop'}", "--overwrite")
    t_ret = time.time()
    wait_for("an nft event on every node", lambda: all(
        m.since(t0, tfcrypt_event) for m in monitors), timeout, interval=0.02)
    wait_for("the nft events to settle", lambda: all(
        not m.since(time.time() - SETTLE, tfcrypt_event) for m in monitors), timeout,
        interval=0.05)
    wait_for("the pair's selector sets to show the change", lambda: all(
        v == on for v in pair_selected(lab).values()), timeout)
    ends = {n: max(m.since(t0, tfcrypt_event)) for n, m in zip(NODES, monitors, strict=True)}
    return {"op": "in" if on else "out", "latency_ms": (max(ends.values()) - t0) * 1000,
            "kubectl_ms": (t_ret - t0) * 1000,
            "node_end_ms": {n: round((e - t0) * 1000, 1) for n, e in ends.items()}}


def k2(lab: Lab, toggles: int, pods: int) -> tuple[list[Figure], list[dict[str, Any]]]:
    kubelet.put_pods(lab, {"n1-w1": {"application": "payments"},
                           "n2-w1": {"application": "shop"}})
    kube.kubectl(lab, "apply", "-f", "-", input=yaml.safe_dump(POLICY))
    agents.start_all(lab)
    start_controller(lab, "k2")
    wait_for(f"{pods + 2} workload records", lambda: record_count(lab) >= pods + 2, 300,
             interval=1)
    argvs = [[*lab.exec_prefix(n), "stdbuf", "-oL", "nft", "monitor"] for n in NODES]
    done = []
    with stamped(*argvs) as monitors:
        time.sleep(1.0)
        on = not pair_selected(lab)["n1"]
        for i in range(toggles):
            done.append(toggle_once(lab, monitors, on=on))
            on = not on
            r = done[-1]
            print(f"K2 toggle {i + 1} ({r['op']}): {r['latency_ms']:.0f} ms "
                  f"(kubectl {r['kubectl_ms']:.0f} ms) per node {r['node_end_ms']}",
                  file=sys.stderr)
    lat = tuple(r["latency_ms"] / 1000 for r in done)
    n = f"{len(done)} label toggles, {pods} other pods"
    return [Percentile("K2.p50", lat, "s", None, f"kubectl label -> last node's nft "
                       f"commit; {n}", q=0.5),
            Percentile("K2.p99", lat, "s", Goal(1.0), f"p99 of {n}", q=0.99),
            Percentile("K2.max", lat, "s", None, f"max of {n}", q=1.0),
            Figure("K2.kubectl", tuple(r["kubectl_ms"] / 1000 for r in done), "s", None,
                   "`kubectl label` from start to return")], done


def agent_tail(lab: Lab, node: str, lines: int = 15) -> list[str]:
    logs = sorted(lab.layout.logs_dir.glob(f"*agent*{node}*"))
    return [ln for p in logs for ln in p.read_text().splitlines()[-lines:]]


# ---------------------------------------------------------------- K1

def k1(lab: Lab, total: int) -> tuple[list[Figure], dict[str, Any]]:
    stop_controllers(lab)
    for node in NODES:
        agents.stop_agent(lab, node)
    etcdctl(lab, "del", "--prefix", f"{PREFIX}/workloads/")
    want = total + 2  # the two lab workloads are pods too
    t0 = time.time()
    rec = start_controller(lab, "k1")
    wait_for(f"{want} workload records", lambda: record_count(lab) >= want, 900)
    took = time.time() - t0
    rss = hwm_mib(rec.pid)
    print(f"K1: {want} records after {took:.1f} s, controller VmHWM {rss:.0f} MiB",
          file=sys.stderr)
    return [Figure("K1.sync_s", (took,), "s", Goal(30.0),
                   f"controller start -> {want} workload records in etcd (cold)"),
            Figure("K1.rss_mib", (rss,), "MiB", None, "controller peak RSS (VmHWM) then")], {
        "records": want}


# ---------------------------------------------------------------- main

def run(args: argparse.Namespace) -> int:
    name = run_prefix("kb")
    figures: list[Figure] = []
    extra: dict[str, Any] = {}
    started = time.monotonic()
    conds = conditions(nodes=2, workloads_per_node=1, lab=name, pods_k1=args.pods,
                       pods_k2=args.k2_pods, toggles=args.toggles, batch=BATCH,
                       note="other engineers' tests ran on the same 2 cores")
    try:
        lab = Lab(Layout(name, nodes=2, workloads_per_node=1, etcd_members=1,
                         kubernetes=True), 600)
        lab.up()
        extra["lab_up_s"] = round(time.monotonic() - started, 1)
        extra["create_k2_pods_s"] = round(create_pods(lab, 0, args.k2_pods), 1)
        try:
            if "k2" not in args.only:
                raise RuntimeError("skipped (--only)")
            f, extra["k2_runs"] = k2(lab, args.toggles, args.k2_pods)
            figures += f
        except (TimeoutError, RuntimeError) as e:
            extra["k2_error"] = str(e)
            extra["k2_agent_logs"] = {n: agent_tail(lab, n) for n in NODES}
            print(f"K2 failed: {e}", file=sys.stderr)
        if "k1" in args.only:
            extra["create_k1_pods_s"] = round(
                create_pods(lab, args.k2_pods, args.pods - args.k2_pods), 1)
            f, extra["k1"] = k1(lab, args.pods)
            figures += f
        extra["loadavg_at_end"] = os.getloadavg()[0]
    finally:
        down(name)
    extra["runtime_s"] = round(time.monotonic() - started, 1)
    only = sorted(set(args.only.split(",")))
    out = "controller" if only == ["k1", "k2"] else f"controller_{'_'.join(only)}"
    path = write_results(out, figures, conds, **extra)
    print(markdown_table(figures))
    print(f"\nconditions: {conds}\nruntime: {extra['runtime_s']} s\nresults: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controller")
    parser.add_argument("--pods", type=int, default=10_000, help="K1 pod count")
    parser.add_argument("--k2-pods", type=int, default=1_000, help="K2 pod count")
    parser.add_argument("--toggles", type=int, default=30, help="K2 label toggles")
    parser.add_argument("--only", default="k1,k2",
                        help="k1, k2 or both; a subset writes controller_<subset>.json")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 200 pods, 50 of them for K2, 4 toggles")
    args = parser.parse_args(argv)
    if args.quick:
        args.pods, args.k2_pods, args.toggles = 200, 50, 4
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
