"""F1-F5 (issue #18 item 4): one agent's control plane at 10 to 5,000 nodes x 30
workloads, in simulation (no lab, no kernel).

Run `python -m bench.fleet [--quick] [--sizes 10,100,1000,5000] [--per-node 30]`.

Rules:
- Each size runs in its own `python -m bench.fleet --one N` process, one after the other,
  so its RSS (F5) is that size's alone; the child prints one JSON document, the parent
  writes bench/results/fleet.json (per size, ids `F<k>.n<N>`; the plot is bench.report's).
- The inventory is bench.compute's generator (same seed, tag mix and 19 policies) at
  `--per-node` workloads a node; the one change is bench.reconcile's toggle (a remote
  workload's `application` tag that moves an IPv6 address in and out of selection).
- The agent's own code does the work: a VerifiedView (tfcrypt/identity/view.py) holding
  every typed record, and the agent's CoreInput (tfcrypt/agent/snapshot.py: Screen,
  LingerBook, Inventory, IncrementalCore) reading it, as tfcrypt.agent.loop does.
- Only a sample is signed and verified for real; the rest is extrapolated, and each
  figure's note says so. The view is filled with the typed records directly (not
  verified one by one): that is what verification would leave in `records`, but the raw
  values the agent also keeps (`raw`) and the per-key expiry and authority entries are
  not there, so F5 is measured without them and `F5.with_raw` adds the raw values'
  bytes (F3's total) as an estimate.
- F1 compute: the agent's first `CoreInput.desired` (full) on a fresh CoreInput, timed;
  `F1.resync`: a full one again on that CoreInput with nothing changed (what the agent
  runs after `resync_interval` of quiet, and after a relist).
- F2 one change: a real signed value (new epoch) `VerifiedView.put` (one real verify),
  `note_changed`, `CoreInput.desired` (incremental), as one watch event costs the agent;
  the last result is checked against compute() over a plain mapping. `F2.rotation`: one
  node record re-signed with a new SVID (what every node publishes on each rotation),
  taken the same way; it changes no peer.
- F3 etcd bytes: key + value of every record the cluster holds (node records, workloads,
  policies), each family's mean signed size from its sample times its count (keys are
  summed exactly); etcd's own overhead (revisions, boltdb pages) is not counted. The
  fan-out of one change is that workload record's size times N (every agent watches the
  whole prefix), and of one SVID rotation round N node records times N.
- F4 start-up: every record verified at the per-record rates measured on the samples
  (controller-signed records share one signer, whose certificate work the identity code
  caches; each node record has its own signer, so nodes are sampled with one SVID each),
  plus F1. etcd's list transfer, the event loop and the first apply are not included.
- The check (sizes up to `--verify-all-upto`, default every size): after everything
  else, every record is signed for real and verified by one `replace_all` into a fresh
  view (`F4.verify_measured`), and the RSS that view adds is taken (`F5.view_measured`:
  typed records, raw values and per-key entries; an upper bound, the typed records are
  a second copy here). That process already holds the rest, a bigger heap than an
  agent's at start-up, so the check errs high where F4 errs low.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gc
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from bench.common import Figure, conditions, markdown_table, write_results
from bench.compute import make_snapshot, node_name, plain, retag
from bench.reconcile import pick_toggle
from bench.startup import PREFIX, agent_trust, sign_inventory, verify_once
from tfcrypt.agent.snapshot import CoreInput
from tfcrypt.config import AgentConfig
from tfcrypt.core.compute import Desired, compute
from tfcrypt.identity import sign_envelope
from tfcrypt.identity.envelope import CHAINS
from tfcrypt.identity.svid_source import SvidUpdate
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.families import families
from tfcrypt.model.node import NodeRecord

SIZES = (10, 100, 1000, 5000)
SIZES_QUICK = (10, 100)
PER_NODE = 30
TRUST_DOMAIN = "bench"  # bench.compute's node records are spiffe://bench/tfcrypt/node/...
SVID_TTL = dt.timedelta(hours=1)  # SPIRE's default_x509_svid_ttl (spire/k8s/server.conf)
ETCD_QUOTA_MIB = 2048  # etcd's default --quota-backend-bytes


# -- the child: one size ----------------------------------------------------------------

def memory_mib() -> dict[str, float]:
    """VmRSS and VmHWM (peak) of this process, in MiB."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0]) / 1024
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def issue(ca: Any, spiffe_id: str) -> SvidUpdate:
    """An SVID from the lab CA, as the Workload API would serve it (leaf-only chain)."""
    svid = ca.issue(spiffe_id, SVID_TTL)
    return SvidUpdate(spiffe_id, svid.key, svid.chain, {TRUST_DOMAIN: (ca.cert,)})


def signed_nodes(records: list[NodeRecord], ca: Any) -> dict[str, bytes]:
    """Node records signed each by its own node's SVID, as every agent publishes its own."""
    now = int(time.time())
    out = {}
    for rec in records:
        rec = dataclasses.replace(rec, epoch=now * 1000, issued_at=now)
        svid = issue(ca, rec.spiffe_id)
        out[rec.key] = sign_envelope(rec.to_payload(), svid.private_key, svid.chain)
    return out


def entry_bytes(key: str, value: bytes) -> int:
    """What etcd stores for one record, before its own overhead: full key and value."""
    return len(PREFIX) + 1 + len(key.encode()) + len(value)


def verify_rate_us(batches: list[Mapping[str, bytes]], svid: SvidUpdate
                   ) -> tuple[tuple[float, ...], int]:
    """Microseconds a record of `VerifiedView.replace_all` on a fresh view, one run per
    batch; and how many records of the last batch were believed (all, or the sample is
    wrong). The identity code caches certificate work per distinct leaf across views, so
    a batch of node records must be signed by SVIDs no earlier batch used."""
    per: list[float] = []
    believed = 0
    for items in batches:
        seconds, view = verify_once(items, svid)
        per.append(seconds / len(items) * 1e6)
        believed = len(view.records)
    return tuple(per), believed


class Spent:
    """Seconds spent in chosen methods of chosen instances (the bound methods are
    wrapped on the instance only: no profiler, no change to the code measured)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, label: str, obj: object, method: str) -> None:
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + (
                    time.perf_counter() - start)

        setattr(obj, method, timed)

    def take_ms(self) -> dict[str, float]:
        spent, self.seconds = self.seconds, {}
        return {k: v * 1e3 for k, v in spent.items()}


def desired_counts(desired: Desired) -> dict[str, int]:
    return {"peers": len(desired.peers),
            "allowed_ips": sum(len(p.allowed_ips) for p in desired.peers.values()),
            "selector_sets": len(desired.selector_ips),
            "nft_set_elements": sum(len(v) for v in desired.selector_ips.values()),
            "nft_map_elements": len(desired.local_class),
            "classes": len(desired.class_selectors),
            "selected_pairs": desired.selected_pair_count}


def node_rotations(view: VerifiedView, core_input: CoreInput, record: NodeRecord, ca: Any,
                   own_key: str, runs: int) -> list[float]:
    """Milliseconds of one node record re-signed after its SVID rotated (same key and
    epoch, a new SVID and issued_at; tfcrypt.agent.loop's publisher) as every other agent
    takes it: `VerifiedView.put` (a real verify, a leaf not seen before) and
    `CoreInput.desired`. No peer changes; the core still has to find that out."""
    epoch = int(time.time() * 1000)
    out = []
    for _ in range(runs):
        svid = issue(ca, record.spiffe_id)
        rec = dataclasses.replace(record, epoch=epoch, issued_at=int(time.time()))
        value = sign_envelope(rec.to_payload(), svid.private_key, svid.chain)
        t0 = time.perf_counter()
        believed = view.put(rec.key, value, dt.datetime.now(dt.UTC))
        core_input.desired(view, own_key, False, [])
        out.append((time.perf_counter() - t0) * 1e3)
        if not believed and view.records.get(rec.key) != rec:
            raise RuntimeError(f"the view refused {rec.key}: {dict(view.rejections)}")
    return out


def verify_everything(snap: Any, ca: Any, controller: SvidUpdate) -> dict[str, float]:
    """The check of F4's and F5's extrapolations: every record signed for real (each node
    record by its own SVID) and verified by one `replace_all` into a fresh view, as the
    agent's first list; its seconds, and the RSS that view adds (typed records, raw
    values, per-key entries) to a process that already holds everything else (an upper
    bound: freed signing garbage may stay in the allocator's arenas)."""
    gc.collect()
    before = memory_mib()["VmRSS"]
    items = {**signed_nodes(list(snap.nodes.values()), ca),
             **sign_inventory(list(snap.workloads.values()), list(snap.policies.values()),
                              controller, 1)}
    seconds, view = verify_once(items, controller)
    if len(view.records) != len(items):
        raise RuntimeError(f"verify_everything: {len(view.records)} of {len(items)} "
                           f"believed: {dict(view.rejections)}")
    del items  # the view keeps the values it believed (`raw`), as the agent's does
    gc.collect()
    return {"seconds": seconds, "records": len(view.records),
            "view_mib": memory_mib()["VmRSS"] - before}


def run_one(nodes: int, per_node: int, runs: int, changes: int, sample: int,
            node_sample: int, verify_all: bool) -> dict[str, Any]:
    """Every figure of one size, measured in this process (see the module's rules)."""
    from lab_workload_api.ca import LabCA

    gc.collect()
    baseline = memory_mib()
    snap = make_snapshot(nodes, per_node)
    ca = LabCA.generate(TRUST_DOMAIN)
    controller = issue(ca, f"spiffe://{TRUST_DOMAIN}/tfcrypt/controller")
    policies = list(snap.policies.values())
    rng = random.Random(11)
    workload_sample = rng.sample(list(snap.workloads.values()), min(sample, len(snap.workloads)))
    node_records = rng.sample(list(snap.nodes.values()), min(node_sample, nodes))

    # F3: sizes from real signatures; F4: rates from real verification
    signed_policies = sign_inventory([], policies, controller, 1)
    signed_workloads = sign_inventory(workload_sample, [], controller, 1)
    # envelope version 2 (the chain stored once, docs/trust.md): the same records' sizes
    by_ref = sign_inventory(workload_sample, policies, controller, 2)
    chain_bytes = sum(entry_bytes(k, v) for k, v in by_ref.items() if k.startswith(CHAINS))
    mean_v2 = {f: statistics.mean(len(v) for k, v in by_ref.items() if k.startswith(f))
               for f in ("workloads", "policies")}
    node_batches = [signed_nodes(node_records, ca) for _ in range(runs)]  # fresh SVIDs
    node_values = node_batches[0]
    mean = {family: statistics.mean(len(v) for v in values.values())
            for family, values in (("nodes", node_values), ("workloads", signed_workloads),
                                   ("policies", signed_policies))}
    counts = {"nodes": len(snap.nodes), "workloads": len(snap.workloads),
              "policies": len(policies)}
    key_bytes = {"nodes": sum(entry_bytes(r.key, b"") for r in snap.nodes.values()),
                 "workloads": sum(entry_bytes(k, b"") for k in snap.workloads),
                 "policies": sum(entry_bytes(p.key, b"") for p in policies)}
    etcd_bytes = {f: key_bytes[f] + mean[f] * counts[f] for f in counts}
    etcd_bytes_v2 = (etcd_bytes["nodes"] + chain_bytes
                     + sum(key_bytes[f] + mean_v2[f] * counts[f] for f in mean_v2))
    controller_items = {**signed_policies, **signed_workloads}
    ctrl_us, ctrl_believed = verify_rate_us([controller_items] * runs, controller)
    node_us, node_believed = verify_rate_us(node_batches, controller)
    if (ctrl_believed, node_believed) != (len(controller_items), len(node_values)):
        raise RuntimeError("a signed sample was refused: the rates would be of rejections")

    # the agent's view: every typed record believed, trust installed
    view = VerifiedView(families())
    view.set_trust(*agent_trust(controller), dt.datetime.now(dt.UTC))
    view.records.update({r.key: r for r in snap.nodes.values()})
    view.records.update({p.key: p for p in policies})
    view.records.update(snap.workloads)
    own_key = snap.own_public_key
    grace = AgentConfig.__dataclass_fields__["workload_grace"].default

    # F1: the first full desired of a fresh CoreInput (the last one is kept)
    compute_s: list[float] = []
    core_input: CoreInput | None = None
    for _ in range(runs):
        core_input = None
        gc.collect()
        core_input = CoreInput(snap.own_node, grace)
        t0 = time.perf_counter()
        desired = core_input.desired(view, own_key, True, [])
        compute_s.append(time.perf_counter() - t0)
    assert core_input is not None
    resync_s = []  # the periodic full reconcile (resync_interval of quiet): nothing changed
    for _ in range(runs):
        t0 = time.perf_counter()
        core_input.desired(view, own_key, True, [])
        resync_s.append(time.perf_counter() - t0)
    gc.collect()
    held = memory_mib()  # F5: the view's records, the inventory, the core, the desired state

    # F2: one watch event, a real signed value each time
    toggle = pick_toggle(snap)
    values = (retag(snap, toggle.key, toggle.tag).workloads[toggle.key],
              snap.workloads[toggle.key])
    epoch = int(time.time() * 1000)
    change_rows: list[dict[str, float]] = []
    spent = Spent()
    spent.wrap("view_of_ms", view, "of")
    spent.wrap("incremental_ms", core_input.core, "update")
    changed_value = b""
    for i in range(changes):
        value = sign_envelope(values[i % 2].to_payload(epoch=epoch + 1 + i,
                                                       issued_at=int(time.time())),
                              controller.private_key, controller.chain)
        changed_value = changed_value or value
        spent.take_ms()
        t0 = time.perf_counter()
        believed = view.put(toggle.key, value, dt.datetime.now(dt.UTC))
        core_input.note_changed(toggle.key)
        t1 = time.perf_counter()
        desired = core_input.desired(view, own_key, False, [])
        t2 = time.perf_counter()
        if not believed:
            raise RuntimeError(f"change {i}: the view refused {toggle.key}: "
                               f"{dict(view.rejections)}")
        change_rows.append({"verify_ms": (t1 - t0) * 1e3, "core_ms": (t2 - t1) * 1e3,
                            "total_ms": (t2 - t0) * 1e3, **spent.take_ms()})
    rotation_ms = node_rotations(view, core_input, snap.nodes[node_name(1)], ca, own_key,
                                 changes)
    final = dataclasses.replace(snap, workloads={**snap.workloads,
                                                 toggle.key: view.records[toggle.key]})
    equals_compute = desired == compute(plain(final))
    after = memory_mib()

    records = sum(counts.values())
    checked = verify_everything(final, ca, controller) if verify_all else None
    verify_s = (counts["nodes"] * statistics.median(node_us)
                + (counts["workloads"] + counts["policies"]) * statistics.median(ctrl_us)) / 1e6
    change_bytes = entry_bytes(toggle.key, changed_value)
    node_bytes = etcd_bytes["nodes"] / counts["nodes"]
    return {
        "nodes": nodes, "per_node": per_node, "counts": counts, "records": records,
        "compute_s": compute_s, "resync_s": resync_s, "changes": change_rows,
        "toggle": {"key": toggle.key, "tag": str(toggle.tag),
                   "pairs_changed": toggle.pairs_changed},
        "rotation_ms": rotation_ms, "equals_compute": equals_compute,
        "desired": desired_counts(desired),
        "value_bytes_mean": mean, "etcd_bytes": etcd_bytes,
        "etcd_bytes_total": sum(etcd_bytes.values()),
        "value_bytes_mean_v2": mean_v2, "etcd_bytes_total_v2": etcd_bytes_v2,
        "samples_signed": {"nodes": len(node_values), "workloads": len(signed_workloads),
                           "policies": len(signed_policies)},
        "verify_us": {"controller_signed": ctrl_us, "node_signed": node_us},
        "verify_believed": {"controller_signed": ctrl_believed, "node_signed": node_believed},
        "startup_verify_s": verify_s,
        "startup_s": verify_s + statistics.median(compute_s),
        "fanout_change_bytes": change_bytes * nodes,
        "change_record_bytes": change_bytes,
        "fanout_rotation_bytes": node_bytes * nodes * nodes,
        "memory_mib": {"baseline": baseline, "held": held, "after_changes": after},
        "verify_everything": checked,
    }


# -- the parent: every size, each in its own process -------------------------------------

def run_size(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.fleet", "--one", str(nodes), "--per-node",
            str(args.per_node), "--runs", str(args.runs), "--changes", str(args.changes),
            "--sample", str(args.sample), "--node-sample", str(args.node_sample),
            *(["--verify-all"] if nodes <= args.verify_all_upto else [])]
    print(f"--- {nodes} nodes x {args.per_node} workloads", file=sys.stderr, flush=True)
    started = time.monotonic()
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench.fleet --one {nodes}: exit {done.returncode}")
    body: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    body["wall_s"] = time.monotonic() - started
    print(f"    {body['records']} records, compute {body['compute_s']}, "
          f"{body['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return body


MIB = 2**20


def size_figures(r: dict[str, Any]) -> list[Figure]:
    n = r["nodes"]
    sfx = f"n{n}"
    mem = r["memory_mib"]
    rss = mem["held"]["VmRSS"]
    raw_mib = r["etcd_bytes_total"] / MIB
    changes = r["changes"]
    nodes_us = statistics.median(r["verify_us"]["node_signed"])
    ctrl_us = statistics.median(r["verify_us"]["controller_signed"])
    checked = r.get("verify_everything")
    check = [] if not checked else [
        Figure(f"F4.verify_measured.{sfx}", (checked["seconds"],), "s", None,
               f"check of F4.verify: all {checked['records']} records signed and verified "
               "for real, one replace_all"),
        Figure(f"F5.view_measured.{sfx}", (checked["view_mib"],), "MiB", None,
               "check of F5.with_raw: the VmRSS a really verified view of every record adds"),
    ]
    figures = [
        Figure(f"F1.{sfx}", tuple(r["compute_s"]), "s", None,
               f"first CoreInput.desired, {r['counts']['workloads']} workloads"),
        Figure(f"F1.resync.{sfx}", tuple(r["resync_s"]), "s", None,
               "a full CoreInput.desired again, nothing changed (the agent's periodic resync)"),
        Figure(f"F2.{sfx}", tuple(c["total_ms"] for c in changes), "ms", None,
               "one workload's labels: VerifiedView.put (real verify) + CoreInput.desired"),
        Figure(f"F2.core.{sfx}", tuple(c["core_ms"] for c in changes), "ms", None,
               "CoreInput.desired alone (Inventory.sync + IncrementalCore.update)"),
        Figure(f"F2.view_of.{sfx}", tuple(c.get("view_of_ms", 0.0) for c in changes), "ms",
               None, "of which VerifiedView.of (a scan of every record, per call)"),
        Figure(f"F2.incremental.{sfx}", tuple(c.get("incremental_ms", 0.0) for c in changes),
               "ms", None, "of which IncrementalCore.update"),
        Figure(f"F2.rotation.{sfx}", tuple(r["rotation_ms"]), "ms", None,
               "one node record re-signed (SVID rotation): VerifiedView.put + "
               "CoreInput.desired, in every other agent"),
        Figure(f"F3.{sfx}", (r["etcd_bytes_total"] / MIB,), "MiB", None,
               f"{r['records']} records, mean signed size of a sample x count, keys exact"),
        Figure(f"F3.v2.{sfx}", (r["etcd_bytes_total_v2"] / MIB,), "MiB", None,
               "the same with envelope version 2 (workloads and policies name the chain "
               "stored once)"),
        Figure(f"F3.fanout.{sfx}", (r["fanout_change_bytes"] / MIB,), "MiB", None,
               f"one change's watch delivery: {r['change_record_bytes']} B x {n} agents"),
        Figure(f"F3.rotation.{sfx}", (r["fanout_rotation_bytes"] / MIB,), "MiB", None,
               f"every node re-signs its record once (SVID rotation): N records x {n} agents"),
        Figure(f"F4.{sfx}", (r["startup_s"],), "s", None,
               "extrapolated: every record verified at the sampled rates, + F1"),
        Figure(f"F4.verify.{sfx}", (r["startup_verify_s"],), "s", None,
               f"extrapolated: {r['counts']['nodes']} x {nodes_us:.0f} us (node-signed) + "
               f"{r['counts']['workloads'] + r['counts']['policies']} x {ctrl_us:.0f} us"),
        Figure(f"F4.verify_us.{sfx}", tuple(r["verify_us"]["controller_signed"]), "us", None,
               f"controller-signed, measured on {r['samples_signed']['workloads']} workloads "
               f"+ {r['samples_signed']['policies']} policies"),
        Figure(f"F4.verify_node_us.{sfx}", tuple(r["verify_us"]["node_signed"]), "us", None,
               f"node-signed, measured on {r['samples_signed']['nodes']} records, one SVID each"),
        Figure(f"F5.{sfx}", (rss,), "MiB", None,
               f"VmRSS holding the view's records, inventory, core and desired state "
               f"(after imports: {mem['baseline']['VmRSS']:.0f} MiB; "
               f"peak VmHWM {mem['after_changes']['VmHWM']:.0f} MiB)"),
        Figure(f"F5.with_raw.{sfx}", (rss + raw_mib,), "MiB", None,
               "estimate: F5 + the raw signed values VerifiedView keeps (F3's bytes)"),
    ]
    return [*figures, *check]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet")
    parser.add_argument("--quick", action="store_true", help="sizes 10 and 100 only")
    parser.add_argument("--sizes", default=None, help="comma-separated node counts")
    parser.add_argument("--per-node", type=int, default=PER_NODE)
    parser.add_argument("--runs", type=int, default=3, help="first computes, verify passes")
    parser.add_argument("--changes", type=int, default=7)
    parser.add_argument("--sample", type=int, default=1000, help="workload records signed")
    parser.add_argument("--node-sample", type=int, default=50, help="node records signed")
    parser.add_argument("--verify-all-upto", type=int, default=5000,
                        help="at sizes up to this, also sign and verify every record for "
                             "real (the check of F4's and F5's extrapolations)")
    parser.add_argument("--verify-all", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.per_node, args.runs, args.changes,
                                 args.sample, args.node_sample, args.verify_all)))
        return 0
    sizes = (tuple(int(s) for s in args.sizes.split(",")) if args.sizes
             else SIZES_QUICK if args.quick else SIZES)
    conds = conditions(per_node=args.per_node, sizes=list(sizes), runs=args.runs,
                       changes=args.changes, quick=args.quick)  # the load at start
    results = [run_size(n, args) for n in sizes]
    figures = [f for r in results for f in size_figures(r)]
    conds["wall_s"] = round(sum(r["wall_s"] for r in results), 1)
    path = write_results("fleet", figures, conds, sizes={str(r["nodes"]): r for r in results},
                         limits={"etcd_quota_mib": ETCD_QUOTA_MIB})
    print(markdown_table(figures))
    for r in results:
        print(f"- {r['nodes']} nodes: desired {r['desired']}, equals compute() "
              f"{r['equals_compute']}, toggle {r['toggle']}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
