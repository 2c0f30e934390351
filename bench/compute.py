"""compute() and the incremental core for one node at scale: 1,000 nodes, 100,000 workloads.

Run `python -m bench.compute [--nodes N] [--per-node M] [--runs R] [--gc on|freeze|off]
[--profile]`.
Prints JSON and a table: median/min/max seconds of R (>= 5) runs, goal and pass flag, of
- compute() over an Inventory (tfcrypt/core/inventory.py), as the agent holds it: the
  workloads indexed as they arrived, compute() a query (goal < 1 s). Timed after one
  untimed compute, which builds the rows the agent then keeps current (that first compute
  is its own figure, without goal: the agent pays it once, at start-up);
- compute() over a plain mapping: stateless, indexing the 100,000 workloads itself;
- the Inventory's own cost: built from the 100,000 workloads, and one workload put;
- the incremental core's first update (a rebuild; also what a policy change costs), over
  the Inventory (the agent's case) and over a plain mapping;
- one workload change as the agent applies it: `Inventory.put` then
  `IncrementalCore.update(snapshot, {key})` (goal < 50 ms: the agent's whole reconcile of
  one change must fit in 50 ms): a remote workload retagged, a remote workload taking a
  local one's tags (moves class sets), a local workload retagged, and the remote retag
  without passing the key (the 100k-entry diff).
Each timed incremental run is a real change (the key alternates between two values);
`checks` says how many classes each change moved and that the result equals compute()
over a plain mapping. Parsing the workloads is not timed: in the agent, each is parsed
and verified once, on receipt (~360 us a record, bench C4).
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
import dataclasses
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
from tfcrypt.core.inventory import Inventory
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


def retagged(snap: Snapshot, key: str, tag: Tag) -> Workload:
    """`key`'s workload with `tag` in place of its tag of that type."""
    w = snap.workloads[key]
    return Workload(w.name, w.node, w.ips,
                    frozenset({t for t in w.tags if t.type != tag.type} | {tag}))


def retag(snap: Snapshot, key: str, tag: Tag) -> Snapshot:
    """The snapshot with `key` retagged (a plain mapping)."""
    return dataclasses.replace(snap, workloads={**snap.workloads,
                                                key: retagged(snap, key, tag)})


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


def take_tags(snap: Snapshot, key: str, source: str) -> Workload:
    """`key`'s workload with the tags of `source` (site kept): a change that moves selection."""
    w, s = snap.workloads[key], snap.workloads[source]
    tags = frozenset({t for t in s.tags if t.type != "site"}
                     | {t for t in w.tags if t.type == "site"})
    return Workload(w.name, w.node, w.ips, tags)


def incremental_figure(core: IncrementalCore, fig_id: str, snap: Snapshot, key: str,
                       changed: Workload, runs: int, tell_keys: bool = True
                       ) -> tuple[Figure, dict[str, object]]:
    """Put `changed` and the base value of `key` in turn into the snapshot's Inventory and
    update the core (every timed run is a real change, timed with its put); the
    inventory and core are left at the base value."""
    inventory = snap.workloads
    assert isinstance(inventory, Inventory)
    base = inventory[key]
    values = (changed, base)
    keys = {key} if tell_keys else None

    def step(i: int) -> Desired:
        inventory.put(key, values[i % 2])
        return core.update(snap, keys)
    times, _ = timed(step, runs)
    inventory.put(key, base)
    before = core.update(snap, keys)
    inventory.put(key, changed)
    after = core.update(snap, keys)
    moved = sum(before.selector_ips.get(k) != v for k, v in after.selector_ips.items())
    moved += len(before.selector_ips.keys() - after.selector_ips.keys())
    classes = sum(before.class_selectors.get(k) != v for k, v in after.class_selectors.items())
    classes += len(before.class_selectors.keys() - after.class_selectors.keys())
    check = {"selector_sets_changed": moved, "classes_changed": classes,
             "equals_compute": after == compute(plain(snap))}
    inventory.put(key, base)
    core.update(snap, keys)
    how = "keys passed" if tell_keys else "keys found by diffing the 100k-entry mappings"
    return Figure(fig_id, times, "s", GOAL_CHANGE, how), check


def plain(snap: Snapshot) -> Snapshot:
    """The snapshot with its workloads in a plain dict (compute() then indexes them)."""
    return dataclasses.replace(snap, workloads=dict(snap.workloads.items()))


def timed_inventories(snap: Snapshot, runs: int) -> tuple[tuple[float, ...], Inventory]:
    """Build an Inventory of the snapshot's workloads `runs` times (one alive at a time):
    the seconds of each build, and the last inventory."""
    times = []
    built = None
    for _ in range(runs):
        built = None
        start = time.perf_counter()
        built = Inventory(snap.workloads)
        times.append(time.perf_counter() - start)
    assert built is not None
    return tuple(times), built


def timed_puts(inventory: Inventory, snap: Snapshot, runs: int) -> tuple[float, ...]:
    """Seconds of single puts that change a remote workload's tags (and back)."""
    key = next(k for k, w in inventory.items() if w.node != snap.own_node)
    values = (retagged(snap, key, Tag("application", "app07")), inventory[key])
    times = []
    for i in range(runs * 20):
        start = time.perf_counter()
        inventory.put(key, values[i % 2])
        times.append(time.perf_counter() - start)
    inventory.put(key, values[1])
    return tuple(times)


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
    built_t, inventory = timed_inventories(snap, 3)
    over = dataclasses.replace(snap, workloads=inventory)
    first_t, _ = timed(lambda _: compute(over), 1)
    full_t, desired = timed(lambda _: compute(over), runs)
    plain_t, from_plain = timed(lambda _: compute(snap), runs)
    put_t = timed_puts(inventory, snap, runs)
    figures = [
        Figure("compute over the agent's Inventory", full_t, "s", GOAL_FULL,
               "rows kept from a previous compute, as in the agent"),
        Figure("compute over a fresh Inventory (rows built)", first_t, "s", None,
               "once, at the agent's start"),
        Figure("compute over a plain mapping (indexes it)", plain_t, "s", None, "stateless"),
        Figure("Inventory built from every workload", built_t, "s", None),
        Figure("Inventory: one workload put", put_t, "s", None, "a remote workload retagged"),
    ]
    checks: dict[str, object] = {"compute over Inventory equals over mapping":
                                 desired == from_plain}

    rebuild_t, _ = timed(lambda _: IncrementalCore(snap.own_node).update(over), 3)
    plain_rebuild_t, _ = timed(lambda _: IncrementalCore(snap.own_node).update(snap), 3)
    figures.append(Figure("incremental: first update (rebuild) over the Inventory", rebuild_t,
                          "s", None, "also after a policy change"))
    figures.append(Figure("incremental: first update (rebuild) over a plain mapping",
                          plain_rebuild_t, "s", None))
    core = IncrementalCore(snap.own_node)
    core.update(over)
    remote_key = f"workloads/{node_name(args.nodes // 2)}/w3"
    local_key = f"workloads/{node_name(0)}/w3"
    other_site_key = f"workloads/{node_name(1)}/w5"
    for fig_id, changed, key, tell in [
        ("incremental: one remote workload's tags",
         retagged(snap, remote_key, Tag("application", "app07")), remote_key, True),
        ("incremental: remote workload takes a local one's tags",
         take_tags(snap, other_site_key, f"workloads/{node_name(0)}/w1"), other_site_key, True),
        ("incremental: one local workload's tags",
         retagged(snap, local_key, Tag("application", "app07")), local_key, True),
        ("incremental: one remote workload, keys not passed",
         retagged(snap, remote_key, Tag("application", "app07")), remote_key, False),
    ]:
        figure, check = incremental_figure(core, fig_id, over, key, changed, runs, tell)
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
        profiler.runcall(compute, over)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
