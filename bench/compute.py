"""compute() and the incremental core for one node at scale: 1,000 nodes, 100,000 workloads.

Run `python -m bench.compute [--nodes N] [--per-node M] [--runs R] [--gc on|freeze|off]
[--profile]`.
Prints JSON and a table: median/min/max seconds of R (>= 5) runs, goal and pass flag, of
- a full compute() (stateless; goal < 1 s),
- the incremental core's first update (a rebuild; also what a policy change costs),
- one workload change applied by `IncrementalCore.update(snapshot, {key})` (goal < 50 ms:
  the agent's whole reconcile of one change must fit in 50 ms): a remote workload retagged,
  a remote workload taking a local one's tags (moves class sets), a local workload
  retagged, and the remote retag without passing the key (the 100k-entry diff).
Each timed incremental run is a real change (the snapshot alternates between two states);
`checks` says how many classes each change moved and that the result equals compute().
Building the inventory is not timed: in the agent, workloads are parsed once, on receipt.
Goals are judged, never asserted (performance is measured here, not in tests).

The tag mix: 50 applications, 3 tiers, 2 deployments, a site per node (4 sites), 0-2 of
20 labels per workload, one IPv6 address on every tenth workload. Rules: app-to-app,
app-to-any with match_tags site, db/prod-to-app with match_tags application,
label-to-label, subnet-to-app, and an audit policy.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import json
import os
import pstats
import random
import sys
import time
from collections.abc import Callable

from bench.common import Figure, Goal, markdown_table
from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.core.incremental import IncrementalCore
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


def timed(fn: Callable[[int], Desired], runs: int) -> tuple[tuple[float, ...], Desired]:
    """Run `fn(i)` `runs` times; the seconds of each run and the last result."""
    times = []
    result = None
    for i in range(runs):
        start = time.perf_counter()
        result = fn(i)
        times.append(time.perf_counter() - start)
    assert result is not None
    return tuple(times), result


def take_tags(snap: Snapshot, key: str, source: str) -> Snapshot:
    """`key`'s workload with the tags of `source` (site kept): a change that moves selection."""
    w, s = snap.workloads[key], snap.workloads[source]
    tags = frozenset({t for t in s.tags if t.type != "site"}
                     | {t for t in w.tags if t.type == "site"})
    changed = Workload(w.name, w.node, w.ips, tags)
    return Snapshot(snap.own_node, {**snap.workloads, key: changed}, snap.policies, snap.nodes,
                    snap.own_public_key)


def incremental_figure(core: IncrementalCore, fig_id: str, base: Snapshot, changed: Snapshot,
                       key: str, runs: int, tell_keys: bool = True
                       ) -> tuple[Figure, dict[str, object]]:
    """Alternate `changed` and `base` (every timed update is a real change of `key`); the
    core is left at `base`, which the next figure's keys are relative to."""
    states = (changed, base)
    keys = {key} if tell_keys else None
    times, _ = timed(lambda i: core.update(states[i % 2], keys), runs)
    before = core.update(base, keys)
    after = core.update(changed, keys)
    moved = sum(before.selector_ips.get(k) != v for k, v in after.selector_ips.items())
    moved += len(before.selector_ips.keys() - after.selector_ips.keys())
    classes = sum(before.class_selectors.get(k) != v for k, v in after.class_selectors.items())
    classes += len(before.class_selectors.keys() - after.class_selectors.keys())
    check = {"selector_sets_changed": moved, "classes_changed": classes,
             "equals_compute": after == compute(changed)}
    core.update(base, keys)
    how = "keys passed" if tell_keys else "keys found by diffing the 100k-entry mappings"
    return Figure(fig_id, times, "s", GOAL_CHANGE, how), check


GOAL_FULL = Goal(1.0)  # seconds
GOAL_CHANGE = Goal(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compute")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-node", type=int, default=100)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--gc", choices=("on", "freeze", "off"), default="on",
                        help="cyclic collector: on (default, as in the agent: compute() "
                             "and IncrementalCore.update pause it themselves, see "
                             "tfcrypt/core/collector.py); freeze: gc.freeze() after building "
                             "the inventory; off: disabled for the whole run")
    parser.add_argument("--profile", action="store_true", help="cProfile one run to stderr")
    args = parser.parse_args(argv)
    runs = max(args.runs, 5)

    snap = make_snapshot(args.nodes, args.per_node)
    if args.gc == "freeze":
        gc.collect()
        gc.freeze()
    elif args.gc == "off":
        gc.disable()
    full_t, desired = timed(lambda _: compute(snap), runs)
    figures = [Figure("compute (full, stateless)", full_t, "s", GOAL_FULL)]

    core = IncrementalCore(snap.own_node)
    rebuild_t, _ = timed(lambda _: IncrementalCore(snap.own_node).update(snap), 3)
    core.update(snap)
    figures.append(Figure("incremental: first update (rebuild)", rebuild_t, "s", None,
                          "also after a policy change"))
    remote_key = f"workloads/{node_name(args.nodes // 2)}/w3"
    local_key = f"workloads/{node_name(0)}/w3"
    other_site_key = f"workloads/{node_name(1)}/w5"
    checks = {}
    for fig_id, changed, key, tell in [
        ("incremental: one remote workload's tags", retag(snap, remote_key,
                                                          Tag("application", "app07")),
         remote_key, True),
        ("incremental: remote workload takes a local one's tags",
         take_tags(snap, other_site_key, f"workloads/{node_name(0)}/w1"), other_site_key, True),
        ("incremental: one local workload's tags", retag(snap, local_key,
                                                         Tag("application", "app07")),
         local_key, True),
        ("incremental: one remote workload, keys not passed",
         retag(snap, remote_key, Tag("application", "app07")), remote_key, False),
    ]:
        figure, check = incremental_figure(core, fig_id, snap, changed, key, runs, tell)
        figures.append(figure)
        checks[fig_id] = check
    rules = sum(len(p.rules) for p in snap.policies.values())
    print(json.dumps({
        "nodes": args.nodes, "workloads": len(snap.workloads), "rules": rules,
        "classes": len(desired.class_selectors), "local_ips": len(desired.local_class),
        "selector_sets": len(desired.selector_ips),
        "selector_elements": sum(len(v) for v in desired.selector_ips.values()),
        "class_selector_rules": sum(len(v) for v in desired.class_selectors.values()),
        "selected_pairs": desired.selected_pair_count, "peers": len(desired.peers),
        "audit_pairs": desired.audit.pair_count, "gc": args.gc,
        "nproc": os.cpu_count(), "loadavg": os.getloadavg()[0],
        "figures": [f.as_json() for f in figures], "checks": checks,
    }, indent=2))
    print(markdown_table(figures))
    if args.profile:
        profiler = cProfile.Profile()
        profiler.runcall(compute, snap)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
