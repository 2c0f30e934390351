"""`python -m bench all|<bench>|report [--quick]`: every figure of issues #7, #17 and #18
from one command.

Rules:
- Each bench runs as its own `python -m bench.<module>` process, one after the other
  (never two at once: they would measure each other), so a crash, a leak or the 2 GB of a
  scale run stays inside it. A bench that fails is reported and the others still run; the
  exit status is non-zero if any bench failed. A goal missed is not a failure: it is
  reported next to the figure (pass / short), as everywhere in bench/.
- After the runs, `bench.report` rebuilds bench/results/latest.json, latest.md and the
  plots from every bench's result file, so running one bench refreshes only its figures.
- C3's growth from 10 to 1,000 nodes is bench.reconcile at each size; each size's result
  is kept as `reconcile_n<N>.json` (the plot's data) and the largest size's figures get
  the `C3.` prefix in `reconcile.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass

from bench import report
from bench.common import RESULTS


@dataclass(frozen=True)
class Bench:
    name: str
    module: str
    figures: str
    args: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)


BENCHES = (
    Bench("dataplane", "bench.dataplane", "D1 D2 D4"),
    Bench("classify", "bench.classify", "D3"),
    Bench("convergence", "bench.convergence", "C1 C2 C5"),
    Bench("startup", "bench.startup", "C4"),
    Bench("scale", "bench.reconcile", "C3"),
    Bench("controller", "bench.controller", "K1 K2"),
    Bench("fleet", "bench.fleet", "F1 F2 F3 F4 F5"),
)
SCALE_NODES = (10, 100, 1000)
SCALE_NODES_QUICK = (10, 50)


def _run(module: str, args: list[str]) -> int:
    print(f"\n=== python -m {module} {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    code = subprocess.run([sys.executable, "-m", module, *args], check=False).returncode
    print(f"=== {module}: exit {code} after {time.monotonic() - started:.0f} s",
          file=sys.stderr, flush=True)
    return code


def run_scale(quick: bool) -> int:
    sizes = SCALE_NODES_QUICK if quick else SCALE_NODES
    extra = ["--per-node", "20", "--changes", "3"] if quick else []
    worst = 0
    for nodes in sizes:
        code = _run("bench.reconcile", ["--nodes", str(nodes), *extra])
        worst = worst or code
        if code == 0:
            shutil.copy(RESULTS / "reconcile.json", RESULTS / f"reconcile_n{nodes}.json")
    path = RESULTS / "reconcile.json"
    if worst == 0 and path.exists():
        body = json.loads(path.read_text())
        for fig in body["figures"]:
            if not fig["id"].startswith("C3."):
                fig["id"] = f"C3.{fig['id']}"
        path.write_text(json.dumps(body, indent=2) + "\n")
    return worst


def run_bench(bench: Bench, quick: bool) -> int:
    if bench.name == "scale":
        return run_scale(quick)
    return _run(bench.module, [*bench.args, *(bench.quick if quick else ())])


def main(argv: list[str] | None = None) -> int:
    names = [b.name for b in BENCHES]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Run tfcrypt's benchmarks (root; each builds and removes its own lab) "
                    "and write bench/results/latest.json, latest.md and plots. "
                    + "; ".join(f"{b.name}: {b.figures}" for b in BENCHES) + ".")
    parser.add_argument("what", choices=["all", "report", *names],
                        help="all benches in order, one of them, or only the report")
    parser.add_argument("--quick", action="store_true",
                        help="smoke sizes and durations (minutes, not meaningful figures)")
    args = parser.parse_args(argv)
    chosen = BENCHES if args.what == "all" else [b for b in BENCHES if b.name == args.what]
    failed = [b.name for b in chosen if run_bench(b, args.quick) != 0]
    latest, skipped = report.write()
    print("\n" + report.markdown(latest))
    for line in skipped:
        print(f"plot skipped: {line}", file=sys.stderr)
    print(f"results: {RESULTS / 'latest.json'}, {RESULTS / 'latest.md'}", file=sys.stderr)
    if failed:
        print(f"benches that failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
