"""compute() for one node at scale: 1,000 nodes, 100,000 workloads, 100 rules.

Run `python -m bench.compute [--nodes N] [--per-node M] [--runs R] [--profile]`. Prints
JSON: median/min/max seconds of R runs of a full compute, and of a recompute after one
remote workload's tags changed and after one local workload's tags changed (compute is
pure and stateless, so a recompute is a full compute on the new snapshot). Building the
inventory is not timed: in the agent, workloads are parsed once, on receipt.

The tag mix: 50 applications, 3 tiers, 2 deployments, a site per node (4 sites), 0-2 of
20 labels per workload, one IPv6 address on every tenth workload. Rules: app-to-app,
app-to-any with match_tags site, db/prod-to-app with match_tags application,
label-to-label, subnet-to-app, and an audit policy.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable

from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload

APPS = [f"app{i:02d}" for i in range(50)]
LABELS = [f"l{i:02d}" for i in range(20)]
SITES = ["paris", "lyon", "nantes", "lille"]


def node_name(i: int) -> str:
    return f"n{i:04d}"


def make_workload(rng: random.Random, node: int, j: int) -> Workload:
    ips = [f"10.{node >> 8}.{node & 255}.{j + 1}"]
    if j % 10 == 0:
        ips.append(f"fd00:{node:x}::{j + 1:x}")
    tags = {Tag("application", rng.choice(APPS)), Tag("tier", rng.choice(["web", "app", "db"])),
            Tag("deployment", rng.choice(["prod", "staging"])),
            Tag("site", SITES[node % len(SITES)])}
    tags |= {Tag("label", v) for v in rng.sample(LABELS, rng.randint(0, 2))}
    return Workload(f"w{j}", node_name(node), tuple(ips), frozenset(tags))


def make_policies(rng: random.Random) -> list[EncryptionPolicy]:
    def tags(*texts: str) -> Endpoint:
        return Endpoint(tags=frozenset(Tag.parse(t) for t in texts))

    rules: list[Rule] = []
    rules += [Rule(tags(f"application={a}"), tags(f"application={b}"))
              for a, b in (rng.sample(APPS, 2) for _ in range(40))]
    rules += [Rule(tags(f"application={a}"), Endpoint(any=True), ("site",))
              for a in rng.sample(APPS, 20)]
    rules += [Rule(tags("tier=db", "deployment=prod"), tags("tier=app"), ("application",))
              for _ in range(15)]
    rules += [Rule(tags(f"label={a}"), tags(f"label={b}"))
              for a, b in (rng.sample(LABELS, 2) for _ in range(15))]
    rules += [Rule(Endpoint(subnet=f"10.{i}.0.0/16"), tags(f"application={rng.choice(APPS)}"))
              for i in range(10)]
    policies = [EncryptionPolicy(f"policy-{i:02d}", Mode.ENFORCE, tuple(rules[i::18]))
                for i in range(18)]
    audit = (Rule(tags("deployment=staging"), Endpoint(any=True), ("site",)),
             Rule(tags("tier=web"), tags("tier=db")))
    return [*policies, EncryptionPolicy("draft", Mode.AUDIT, audit)]


def make_snapshot(nodes: int, per_node: int, seed: int = 7) -> Snapshot:
    rng = random.Random(seed)
    workloads = {w.key: w for n in range(nodes) for j in range(per_node)
                 for w in [make_workload(rng, n, j)]}
    records = {node_name(n): NodeRecord(
        node_name(n), f"spiffe://bench/tfcrypt/node/{node_name(n)}",
        base64.b64encode((n + 1).to_bytes(2, "big") * 16).decode(),
        f"172.16.{n >> 8}.{n & 255}:51820", (), 1, 1) for n in range(nodes)}
    policies = {p.name: p for p in make_policies(rng)}
    own = node_name(0)
    return Snapshot(own, workloads, policies, records, records[own].wg_public_key)


def retag(snap: Snapshot, key: str, tag: Tag) -> Snapshot:
    w = snap.workloads[key]
    changed = Workload(w.name, w.node, w.ips,
                       frozenset({t for t in w.tags if t.type != tag.type} | {tag}))
    return Snapshot(snap.own_node, {**snap.workloads, key: changed}, snap.policies, snap.nodes,
                    snap.own_public_key)


def timed(fn: Callable[[], Desired], runs: int) -> tuple[dict[str, float], Desired]:
    times = []
    result = None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return ({"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4),
             "max_s": round(max(times), 4)}, result)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compute")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-node", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one run to stderr")
    args = parser.parse_args(argv)

    snap = make_snapshot(args.nodes, args.per_node)
    full, desired = timed(lambda: compute(snap), args.runs)
    remote = retag(snap, f"workloads/{node_name(args.nodes // 2)}/w3", Tag("application", "app07"))
    remote_t, remote_d = timed(lambda: compute(remote), args.runs)
    local = retag(snap, f"workloads/{node_name(0)}/w3", Tag("application", "app07"))
    local_t, _ = timed(lambda: compute(local), args.runs)
    rules = sum(len(p.rules) for p in snap.policies.values())
    print(json.dumps({
        "nodes": args.nodes, "workloads": len(snap.workloads), "rules": rules,
        "classes": len(desired.class_peers), "local_ips": len(desired.local_class),
        "selected_pairs": desired.selected_pair_count, "peers": len(desired.peers),
        "audit_pairs": desired.audit.pair_count,
        "compute": full, "recompute_remote_tag_change": remote_t,
        "recompute_local_tag_change": local_t,
        "remote_change_kept_class_keys": remote_d.local_class == desired.local_class,
    }, indent=2))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(compute, snap)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
