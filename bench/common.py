"""What every bench shares: figures with their goal, the machine's conditions, namespaces.

Rules:
- A figure is the median of several runs, with min, max and the run count beside it; a
  goal is judged on the median and only reported (`pass`), never asserted: performance is
  measured here, not in tests.
- Conditions (cores, kernel, tool versions) are written next to the numbers, because a
  figure without the machine it came from cannot be compared with another.
- Every namespace and process a bench creates carries a per-run random prefix and is
  removed by exact name or PID in a `finally`, also when the bench fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Goal:
    """`value < limit` (below=True) or `value > limit`; `text` is how the brief says it."""

    limit: float
    below: bool = True

    @property
    def text(self) -> str:
        return f"{'<' if self.below else '>'} {self.limit:g}"

    def met(self, value: float) -> bool:
        return value < self.limit if self.below else value > self.limit


@dataclass(frozen=True)
class Figure:
    id: str
    runs: tuple[float, ...]
    unit: str
    goal: Goal | None = None
    note: str = ""

    @property
    def value(self) -> float:
        return statistics.median(self.runs)

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id, "value": _round(self.value), "unit": self.unit,
            "goal": self.goal.text if self.goal else None,
            "min": _round(min(self.runs)), "max": _round(max(self.runs)),
            "runs": len(self.runs),
            "pass": self.goal.met(self.value) if self.goal else None,
            **({"note": self.note} if self.note else {}),
            "samples": [_round(r) for r in self.runs],
        }


def _round(value: float) -> float:
    return float(f"{value:.4g}")


def run_prefix(tag: str) -> str:
    """A short per-run name prefix (fits interface names with a suffix of up to 6 chars)."""
    return f"{tag}{secrets.token_hex(3)}"


def _first_line(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    out = (done.stdout or done.stderr).strip().splitlines()
    return out[0] if out else "unavailable"


# Debian's wireguard-go (the 2022 build, on PATH): what the benches compare the current
# build against (docs/wireguard.md "Which wireguard-go").
DEBIAN_WIREGUARD_GO = "wireguard-go"


def wireguard_go() -> str:
    """The wireguard-go every bench runs: tools/wireguard-go's build, as the lab's agents."""
    from netns_lab.agents import wireguard_go as lab_wireguard_go
    return lab_wireguard_go()


def _wireguard_go_version() -> str:
    from netns_lab.errors import LabError
    try:
        return _first_line([wireguard_go(), "--version"])
    except LabError as exc:  # not built: said in the results; the bench fails on start
        return f"unavailable ({exc})"


def conditions(**extra: object) -> dict[str, object]:
    return {
        "nproc": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "nft": _first_line(["nft", "--version"]),
        "wireguard-go": _wireguard_go_version(),
        "wireguard-go_debian": _first_line([DEBIAN_WIREGUARD_GO, "--version"]),
        "iperf3": _first_line(["iperf3", "--version"]),
        "loadavg_at_start": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra,
    }


def markdown_table(figures: Sequence[Figure]) -> str:
    rows = ["| figure | median | min | max | runs | unit | goal | pass |",
            "|---|---|---|---|---|---|---|---|"]
    for f in figures:
        j = f.as_json()
        verdict = "-" if j["pass"] is None else ("yes" if j["pass"] else "**no**")
        rows.append(f"| {f.id} | {j['value']} | {j['min']} | {j['max']} | {j['runs']} "
                    f"| {f.unit} | {j['goal'] or '-'} | {verdict} |")
    return "\n".join(rows)


def write_results(name: str, figures: Sequence[Figure], conds: dict[str, object],
                  **extra: object) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    body = {"bench": name, "figures": [f.as_json() for f in figures], "conditions": conds,
            **extra}
    path.write_text(json.dumps(body, indent=2) + "\n")
    return path


def sh(*argv: str, netns: str | None = None, check: bool = True,
       stdin: str | None = None) -> str:
    """Run a command (in `netns` if given) and return its stdout."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    done = subprocess.run([*prefix, *argv], input=stdin, capture_output=True, text=True,
                          check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} (netns {netns}): {done.stderr.strip()}")
    return done.stdout


@contextlib.contextmanager
def namespaces(*names: str) -> Iterator[tuple[str, ...]]:
    """Create these network namespaces (lo up); delete exactly them on the way out."""
    made: list[str] = []
    try:
        for name in names:
            sh("ip", "netns", "add", name)
            made.append(name)
            sh("ip", "-n", name, "link", "set", "lo", "up")
        yield tuple(names)
    finally:
        for name in reversed(made):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, this one process; waits until it is gone."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return False
