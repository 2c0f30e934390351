"""compute + apply at scale, against the real kernel: one node, 999 peers, 100,000 workloads.

Run `python -m bench.reconcile [--nodes N] [--per-node M] [--changes C] [--profile]` as root.

Rules:
- One fresh network namespace (random name) holds the node: wireguard-go with a per-run
  interface name (the UAPI directory /run/wireguard is shared by every namespace), the
  nftables table, tfcrypt's route tables and rules. The namespace has only `lo`, so the 999
  peer endpoints are configured but unreachable: no packet leaves it. wireguard-go is
  stopped by PID and the namespace deleted by name in a `finally`.
- The inventory is bench.compute's generator (the same seed, rules and tag mix); building
  it is not timed (the agent parses workloads once, on receipt).
- The core is the agent's: an Inventory of the workloads (built before the first compute,
  as the agent indexes each workload on receipt; its build time is reported apart) and an
  IncrementalCore over it (its first update is a full build; each change puts the changed
  workload into the Inventory and passes its key), or compute() per step with
  `--stateless` over a plain mapping.
- First apply: the core on the full snapshot, `Dataplane.set_desired`, `Dataplane.apply`
  from an empty namespace (every nft element, 999 peers over the UAPI).
- One change: one remote workload's tags flip between two values, so that it becomes
  selected with some local classes, then unselected again (run after run). Each run is
  timed as compute, set_desired + apply, and both; `ApplyResult.changed` shows what the
  apply touched. The toggle is chosen with the pairwise definition against the local
  workloads (cheap), not by trial computes.
- Goals (brief): first apply < 5 s, one change < 50 ms, with compute included and for
  the apply alone. They are reported, never asserted. `--profile` runs one more change
  under cProfile and writes the top of the profile to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import pstats
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    RESULTS,
    Figure,
    Goal,
    conditions,
    markdown_table,
    namespaces,
    run_prefix,
    sh,
    stop_pid,
    wireguard_go,
    write_results,
)
from bench.compute import APPS, make_snapshot, retag
from tfcrypt.agent.dataplane import ApplyResult, Dataplane, RoutingConfig
from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.core.incremental import IncrementalCore
from tfcrypt.core.inventory import Inventory
from tfcrypt.core.selection import is_selected_pairwise
from tfcrypt.dataplane.netlink import PyRoute2Netlink
from tfcrypt.dataplane.nft_json import SubprocessNft
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload
from tfcrypt.wireguard.device import WireGuardManager
from tfcrypt.wireguard.keys import generate_private_key
from tfcrypt.wireguard.model import encode_key
from tfcrypt.wireguard.userspace import UserspaceBackend

LISTEN_PORT = 51820
MTU = 1420


@dataclass(frozen=True)
class Toggle:
    """One remote workload and the tag that makes one of its IPs selected (it was selected
    with no local workload) and changes the fewest (local IP, remote IP) pairs."""

    key: str
    tag: Tag
    pairs_changed: int


def _selected_pairs(remote: Workload, local: list[Workload],
                    snap: Snapshot) -> set[tuple[str, str]]:
    policies = list(snap.policies.values())
    return {(x, y) for lw in local for x in lw.ips for y in remote.ips
            if is_selected_pairwise(lw, x, remote, y, policies)}


def pick_toggle(snap: Snapshot, candidates: int = 3) -> Toggle:
    """Among the first remote workloads having an IP selected with no local IP, the
    `application` change that selects that IP and changes the fewest pairs.

    With the generator's subnet rules every remote IPv4 address is already selected with
    some local class, so the toggled IP is an IPv6 one: the only kind whose selection, and
    hence its peer's allowed IPs, can come and go by tags alone."""
    local = [w for w in snap.workloads.values() if w.node == snap.own_node]
    best: Toggle | None = None
    seen = 0
    for w in snap.workloads.values():
        if w.node == snap.own_node:
            continue
        before = _selected_pairs(w, local, snap)
        idle = set(w.ips) - {y for _, y in before}
        if not idle:
            continue
        for app in APPS:
            tag = Tag("application", app)
            if tag in w.tags:
                continue
            after = _selected_pairs(retag(snap, w.key, tag).workloads[w.key], local, snap)
            if not idle & {y for _, y in after}:
                continue
            n = len(before ^ after)
            if best is None or n < best.pairs_changed:
                best = Toggle(w.key, tag, n)
        seen += 1
        if best is not None and seen >= candidates:
            return best
    if best is None:
        raise RuntimeError("no remote workload can be toggled into selection")
    return best


def rss_mib() -> tuple[float, float]:
    """(current VmRSS, peak ru_maxrss) of this process, in MiB."""
    current = 0.0
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class ChangeRun:
    compute_s: float
    set_desired_s: float
    apply_s: float
    result: ApplyResult
    nft_commands: list[str]
    parts_s: dict[str, float]


class Stopwatch:
    """Seconds spent in chosen coroutine methods of chosen objects, by label; wraps the
    bound methods of those instances only (no profiler overhead, no change to the code)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, label: str, obj: object, method: str) -> None:
        inner = getattr(obj, method)

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await inner(*args, **kwargs)
            finally:
                self.spent[label] = self.spent.get(label, 0.0) + time.perf_counter() - start

        setattr(obj, method, timed)

    def take(self) -> dict[str, float]:
        spent, self.spent = self.spent, {}
        return spent


class Bench:
    def __init__(self, netns: str, ifname: str, stateless: bool = False) -> None:
        self.stateless = stateless
        self.core: IncrementalCore | None = None
        self.inventory: Inventory | None = None  # the agent's (tfcrypt/core/inventory.py)
        self.inventory_s = 0.0
        self.backend = UserspaceBackend(ifname, netns=netns, binary=wireguard_go())
        self.netlink = PyRoute2Netlink(netns=netns)
        self.nft_cli = SubprocessNft(netns=netns)
        self.nft = NftManager(self.nft_cli)
        self.dataplane = Dataplane(WireGuardManager(self.backend), self.nft, self.netlink,
                                   RoutingConfig(ifname=ifname))
        self.private_key = encode_key(generate_private_key())
        self.watch = Stopwatch()
        self.watch.wrap("nftables.apply", self.nft, "apply")
        self.watch.wrap("nft list (subprocess + json)", self.nft_cli, "list_table")
        self.watch.wrap("nft transaction", self.nft_cli, "run")
        self.watch.wrap("wireguard.apply", self.dataplane.wireguard, "apply")
        self.watch.wrap("wireguard UAPI get", self.backend, "get_state")

    async def step(self, snap: Snapshot, keys: set[str] | None = None
                   ) -> tuple[ChangeRun, Desired]:
        """One reconcile: the core (the agent's IncrementalCore, told which workload keys
        changed; or the stateless compute() with --stateless), set_desired, apply."""
        self.watch.take()
        t0 = time.perf_counter()
        if self.stateless:
            desired = compute(snap)
        else:
            if self.inventory is None:
                # the agent indexes each workload on receipt, before its first compute
                self.inventory = Inventory(snap.workloads)
                self.inventory_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            else:
                self.inventory.sync(snap.workloads, keys)
            if self.core is None:
                self.core = IncrementalCore(snap.own_node)
            desired = self.core.update(dataclasses.replace(snap, workloads=self.inventory),
                                       keys)
        t1 = time.perf_counter()
        self.dataplane.set_desired(desired, private_key_b64=self.private_key,
                                   listen_port=LISTEN_PORT, mtu=MTU)
        t2 = time.perf_counter()
        result = await self.dataplane.apply()
        t3 = time.perf_counter()
        if result.errors:
            raise RuntimeError(f"apply failed: {result.errors[:5]}")
        cmds = [_describe(c) for c in self.nft.last_transaction]
        return ChangeRun(t1 - t0, t2 - t1, t3 - t2, result, cmds, self.watch.take()), desired

    async def close(self) -> None:
        await self.netlink.aclose()
        try:
            await self.backend.destroy()
        finally:
            if self.backend.pid is not None:
                stop_pid(self.backend.pid)


def _progress(what: str, run: ChangeRun) -> None:
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in sorted(run.parts_s.items()))
    print(f"{what}: compute {run.compute_s:.2f}s set_desired {run.set_desired_s:.2f}s "
          f"apply {run.apply_s:.2f}s ({parts}) changed {run.result.changed}", file=sys.stderr)


def _describe(cmd: dict[str, Any]) -> str:
    (verb, body), = cmd.items()
    (kind, obj), = body.items()
    elems = obj.get("elem")
    count = f" ({len(elems)} elem)" if isinstance(elems, list) else ""
    return f"{verb} {kind} {obj.get('name', obj.get('chain', ''))}{count}"


def check_kernel(netns: str, ifname: str, desired: Desired) -> dict[str, int]:
    """What the kernel holds after the first apply, read with the real tools."""
    peers = sh("wg", "show", ifname, "peers", netns=netns).split()
    elements = sum(len(v) for v in desired.selector_ips.values())
    if len(peers) != len(desired.peers):
        raise RuntimeError(f"wg shows {len(peers)} peers, desired {len(desired.peers)}")
    return {"wg_peers": len(peers), "nft_set_elements": elements,
            "nft_map_elements": len(desired.local_class), "classes": len(desired.class_selectors),
            "selector_sets": len(desired.selector_ips),
            "class_selector_rules": sum(len(v) for v in desired.class_selectors.values())}


def profile_change(bench: Bench, snap: Snapshot, loop: asyncio.AbstractEventLoop) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    loop.run_until_complete(bench.step(snap))
    profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return out.getvalue()


def run(args: argparse.Namespace) -> int:
    t = time.perf_counter()
    base = make_snapshot(args.nodes, args.per_node)
    build_s = time.perf_counter() - t
    toggle = pick_toggle(base)
    flipped = retag(base, toggle.key, toggle.tag)
    print(f"inventory built in {build_s:.1f}s; toggle {toggle.key} -> {toggle.tag} "
          f"({toggle.pairs_changed} selected pairs change)", file=sys.stderr)

    prefix = run_prefix("tfb")
    netns, ifname = f"{prefix}-node", f"{prefix}wg"
    loop = asyncio.new_event_loop()
    profile_text = ""
    try:
        with namespaces(netns):
            bench = Bench(netns, ifname, stateless=args.stateless)
            try:
                first, desired = loop.run_until_complete(bench.step(base))
                rss = rss_mib()
                _progress("first apply", first)
                kernel = check_kernel(netns, ifname, desired)
                changes: list[ChangeRun] = []
                for i in range(args.changes):
                    changes.append(loop.run_until_complete(
                        bench.step(flipped if i % 2 == 0 else base, {toggle.key}))[0])
                    _progress(f"change {i + 1}", changes[-1])
                last = flipped if args.changes % 2 else base
                noop = loop.run_until_complete(bench.step(last, set()))[0]
                _progress("no-op", noop)
                if args.profile:
                    profile_text = profile_change(bench, base if last is flipped else flipped,
                                                  loop)
            finally:
                bench_inventory_s = bench.inventory_s
                loop.run_until_complete(bench.close())
    finally:
        loop.close()

    ms: Callable[[float], float] = lambda s: s * 1000  # noqa: E731
    first_apply = first.set_desired_s + first.apply_s
    figures = [
        Figure("first.total", (first.compute_s + first_apply,), "s", Goal(5),
               "compute + set_desired + apply, empty namespace"),
        Figure("first.apply", (first_apply,), "s", Goal(5), "set_desired + apply"),
        Figure("first.compute", (first.compute_s,), "s", Goal(1), "the core's full build"),
        Figure("first.rss_after", (rss[0],), "MiB", Goal(150),
               f"VmRSS of this agent-equivalent process; ru_maxrss {rss[1]:.0f} MiB"),
        Figure("change.total", tuple(ms(c.compute_s + c.set_desired_s + c.apply_s)
                                     for c in changes), "ms", Goal(50),
               "one remote workload's tags, compute included"),
        Figure("change.apply", tuple(ms(c.set_desired_s + c.apply_s) for c in changes), "ms",
               Goal(50), "set_desired + apply"),
        Figure("change.compute", tuple(ms(c.compute_s) for c in changes), "ms"),
        Figure("change.set_desired", tuple(ms(c.set_desired_s) for c in changes), "ms"),
        Figure("change.apply_io", tuple(ms(c.apply_s) for c in changes), "ms",
               None, "Dataplane.apply alone: reads + writes"),
        Figure("noop.apply", (ms(noop.set_desired_s + noop.apply_s),), "ms", None,
               "same desired again: the read floor"),
    ]
    for part in sorted({p for c in changes for p in c.parts_s}):
        figures.append(Figure(f"change.part: {part}",
                              tuple(ms(c.parts_s.get(part, 0.0)) for c in changes), "ms"))
    touched = [{"changed": c.result.changed, "nft_commands": c.nft_commands} for c in changes]
    conds = conditions(nodes=args.nodes, workloads=len(base.workloads),
                       rules=sum(len(p.rules) for p in base.policies.values()),
                       peers=len(desired.peers), **kernel,
                       first_apply_changed=first.result.changed,
                       first_apply_parts_s={k: round(v, 2) for k, v in first.parts_s.items()},
                       snapshot_build_s=round(build_s, 2),
                       agent_inventory_build_s=round(bench_inventory_s, 2),
                       core="compute() (stateless)" if args.stateless
                       else "IncrementalCore over an Inventory")
    path = write_results("reconcile", figures, conds,
                         toggle={"workload": toggle.key, "tag": str(toggle.tag),
                                 "pairs_changed": toggle.pairs_changed},
                         change_touched=touched, noop_changed=noop.result.changed)
    print(markdown_table(figures))
    print()
    for i, c in enumerate(touched):
        print(f"- change {i + 1}: changed={c['changed']} nft={c['nft_commands']}")
    print(f"\nconditions: {conds}\nresults: {path}")
    if profile_text:
        prof = RESULTS / "reconcile_profile.txt"
        prof.write_text(profile_text)
        print(f"profile: {prof}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reconcile")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--per-node", type=int, default=100)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--stateless", action="store_true",
                        help="compute() per step instead of the agent's IncrementalCore")
    parser.add_argument("--profile", action="store_true",
                        help="one more change under cProfile -> results/reconcile_profile.txt")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
