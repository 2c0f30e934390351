"""Where the time goes per packet: `perf record` during D3's and D1's UDP floods.

Run `python -m bench.kernel_profile [--seconds S]` as root, on a quiet machine (it
samples the whole machine). Not part of `bench all`: it explains figures, it is not one.

Rules:
- D2/D3 (unselected flow): bench.classify's lab (client and server namespaces, the same
  table and naive rules, switched the same way), so the profile belongs to the D3
  figures. D1 (selected flow): bench.dataplane's `t1` (tfcrypt) and `r1` (wireguard-go by
  hand) labs, built by its own code.
- For each configuration a 64-byte UDP flood runs (`iperf3 -R -u -b 0`) while `perf
  record -e cpu-clock -a` samples every CPU (this VM has no hardware counters: cpu-clock
  is a software timer, so the profile is where time goes, not cache misses). Samples are
  attributed by kernel symbol and grouped: nftables (`nft_*`, `nf_*` hooks), policy
  routing (`fib_rules*`, `fib4_rule*`), the rest of the kernel, user space, idle.
- The result is the share of all samples per group and the top symbols per
  configuration, plus the packets per second of the same run, in
  bench/results/kernel_profile.json (no figures: it explains D2/D3, it is not a goal).
- perf's data file lives in a temporary directory removed in a `finally`; the namespaces
  and iperf3 are bench.classify's, removed the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from bench.classify import Config, lab_up
from bench.common import conditions, namespaces, run_prefix, write_results
from bench.dataplane import HandWireGuard, Pair, TfcryptNode, start_tfcrypt

CONFIGS = (Config("nft10", 10, 0), Config("nft100000", 100_000, 0),
           Config("rules1000", 10, 1000))
GROUPS = (("nftables", re.compile(r"^(nft_|nf_hook|nf_conntrack|nft)")),
          ("policy routing rules", re.compile(r"^(fib_rules|fib4_rule|fib6_rule)")),
          ("idle", re.compile(r"(safe_halt|cpu_idle|default_idle|intel_idle)")))
_LINE = re.compile(r"^\s*([\d.]+)%\s+\[([k.])\]\s+(\S+)")


def symbols(report: str) -> Counter[tuple[str, str]]:
    """(space, symbol) -> percent of samples, from `perf report --stdio --sort symbol`."""
    found: Counter[tuple[str, str]] = Counter()
    for line in report.splitlines():
        m = _LINE.match(line)
        if m:
            found[("kernel" if m.group(2) == "k" else "user", m.group(3))] += float(m.group(1))
    return found


def grouped(found: Counter[tuple[str, str]]) -> dict[str, float]:
    groups: Counter[str] = Counter()
    for (space, name), share in found.items():
        group = next((g for g, pattern in GROUPS if space == "kernel" and pattern.search(name)),
                     "other kernel" if space == "kernel" else "user space")
        groups[group] += share
    return {g: round(v, 2) for g, v in groups.most_common()}


def sampled(name: str, flood: Callable[[], float], seconds: float, tmp: Path
            ) -> dict[str, object]:
    """Run `flood()` (returns kpackets/s) while perf samples every CPU."""
    data = tmp / f"{name}.data"
    perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "1999", "-a",
                             "-o", str(data), "--", "sleep", str(seconds)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kpps = flood()
    finally:
        perf.wait(timeout=seconds + 30)
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                             "--sort", "symbol"], capture_output=True, text=True,
                            check=True).stdout
    found = symbols(report)
    top = [{"symbol": sym, "space": space, "percent": round(share, 2)}
           for (space, sym), share in found.most_common(15)]
    return {"config": name, "kpps": round(kpps, 1), "groups": grouped(found), "top": top}


def unselected(seconds: float, tmp: Path) -> list[dict[str, object]]:
    prefix = run_prefix("tfk")
    results = []
    with lab_up(prefix, CONFIGS[0]) as lab:
        lab.udp_kpps(1)
        for cfg in CONFIGS:
            lab.switch(cfg)
            results.append(sampled(cfg.id, lambda: lab.udp_kpps(seconds),
                                   seconds, tmp))
            print(f"{cfg.id}: {results[-1]['kpps']} kpps, {results[-1]['groups']}",
                  file=sys.stderr)
    return results


def selected(seconds: float, tmp: Path) -> list[dict[str, object]]:
    """D1's two tunnels, each flooded alone (the other lab idle)."""
    prefix = run_prefix("tfk")
    t1, r1 = Pair("t1", prefix), Pair("r1", prefix)
    nodes: list[TfcryptNode] = []
    hand = HandWireGuard(r1, tmp)
    loop = asyncio.new_event_loop()
    results = []
    try:
        with namespaces(*t1.namespaces(), *r1.namespaces()):
            try:
                for p in (t1, r1):
                    p.wire()
                    p.start_server()
                loop.run_until_complete(start_tfcrypt(t1, True, 0, nodes))
                hand.start()
                for name, pair in (("tunnel_tfcrypt", t1), ("tunnel_raw", r1)):
                    pair.iperf3("udp", 1)
                    results.append(sampled(name, lambda p=pair: p.iperf3("udp", seconds)[
                        "value"], seconds, tmp))
                    print(f"{name}: {results[-1]['kpps']} kpps, {results[-1]['groups']}",
                          file=sys.stderr)
            finally:
                hand.stop()
                for p in (t1, r1):
                    p.stop_server()
                for node in reversed(nodes):
                    loop.run_until_complete(node.close())
    finally:
        loop.close()
    return results


def run(args: argparse.Namespace) -> int:
    at_start = conditions()
    tmp = Path(tempfile.mkdtemp(prefix="tfk-perf-"))
    try:
        results = unselected(args.seconds, tmp) + selected(args.seconds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    conds = conditions(loadavg_at_start=at_start["loadavg_at_start"], seconds=args.seconds,
                       sampler="perf record -e cpu-clock -F 1999 -a")
    path = write_results("kernel_profile", [], conds, profiles=results)
    print(json.dumps(results, indent=1))
    print(f"results: {path}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_profile")
    parser.add_argument("--seconds", type=float, default=5)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
