"""Fault-injection harness: continuous traffic, an underlay capture, and the four checks
every fault scenario must pass (issue 8).

Rules:
- A `Scenario` runs for its whole `with` block: TCP and UDP exchanges in both directions
  on a selected flow, an unselected flow and any extra flows (tests/lab_scripts/flow.py
  in the workload namespaces, started with `Lab.start_process` and stopped by PID), and
  tcpdump on every port of the underlay (netns_lab.wire.capture).
- The test marks `fault_started()` and `fault_ended()`; registers with `expect_report`
  what the agent must show while the fault lasts (polled in a thread between the two
  marks); and, when the inventory changes, records the new selected pairs with
  `set_selected` (the pair set in force from that instant on).
- On a clean exit the scenario asserts:
  (a) no packet of a pair that was selected at the packet's capture time crossed the
      underlay in plaintext (any protocol, `host A and host B`: a tunnelled packet
      carries node addresses outside, so it never matches);
  (b) the unselected flow kept flowing: each direction and protocol succeeded during
      the fault, its packets were on the underlay during the fault, and it never paused
      longer than `UNSELECTED_MAX_GAP_S`;
  (c) each direction and protocol of the selected flow succeeded within the scenario's
      `recovery_bound_s` after `fault_ended()` (a correctness bound, not a benchmark);
  (d) every registered report was observed while the fault lasted.
  On an exception nothing is asserted; everything is stopped either way.
- Measurements (recovery times, plaintext counts, what was reported) are kept in
  `Scenario.result` for the test to print or assert more on.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from netns_lab import Lab, agents, inventory
from netns_lab.procs import ProcessRecord
from netns_lab.wire import capture
from tfcrypt.core.selection import is_selected_pairwise
from tfcrypt.model.policy import EncryptionPolicy, parse_policy_document
from tfcrypt.model.workload import Workload

FLOW_SCRIPT = Path(__file__).parent / "lab_scripts" / "flow.py"
EXAMPLES = Path(__file__).parent.parent / "examples"
FLOW_PORT = 7000
FLOW_INTERVAL_S = 0.1
UNSELECTED_MAX_GAP_S = 5.0
WARMUP_TIMEOUT_S = 30.0
REPORT_POLL_S = 0.3
PROTOS = ("tcp", "udp")

Pair = frozenset[str]


@dataclass(frozen=True)
class Flow:
    """Traffic between workloads `a` and `b` (lab names): each runs an echo server and a
    client of the other's, so both directions initiate TCP and UDP."""

    a: str
    b: str


# ------------------------------------------------------------------ lab helpers

def run(lab: Lab, target: str, *argv: str, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lab.exec_prefix(target), *argv], capture_output=True,
                          text=True, check=check, timeout=timeout)


def status_json(lab: Lab, node: str) -> tuple[int, dict[str, Any] | None]:
    """`tfcrypt status --json` in the node: (exit code, document or None). Exit 2 (and
    no document) means no agent answers on its status socket."""
    out = run(lab, node, sys.executable, "-m", "tfcrypt", "status", "--json",
              "--status-socket", str(agents.status_socket(lab, node)), check=False)
    try:
        return out.returncode, json.loads(out.stdout)
    except ValueError:
        return out.returncode, None


def metrics(lab: Lab, node: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The node's Prometheus metrics from inside its namespace: {sample: {labels: value}}."""
    url = f"http://{agents.METRICS_ADDRESS}/metrics"
    body = run(lab, node, sys.executable, "-c",
               "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
               f"{url!r}, timeout=5).read().decode())").stdout
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def lab_workloads(lab: Lab, tags: Mapping[str, Iterable[str]]) -> list[Workload]:
    """The lab's workloads named in `tags`, as the inventory would hold them."""
    return [Workload(w["name"], w["node"], (w["ip"],), frozenset(tags[w["name"]]))
            for w in lab.status()["workloads"] if w["name"] in tags]


def load_policies(files: Iterable[str | Path]) -> list[EncryptionPolicy]:
    paths = [Path(f) if Path(f).is_absolute() else EXAMPLES / f for f in files]
    return [parse_policy_document(p.read_text(), p.name) for p in paths]


def selected_pairs(workloads: Iterable[Workload],
                   policies: Iterable[EncryptionPolicy]) -> frozenset[Pair]:
    """Address pairs the plain pairwise definition selects (cross-node only)."""
    pols = list(policies)
    return frozenset(
        frozenset((ia, ib))
        for a, b in itertools.combinations(list(workloads), 2) if a.node != b.node
        for ia in a.ips for ib in b.ips
        if is_selected_pairwise(a, ia, b, ib, pols))


def publish(lab: Lab, tags: Mapping[str, Iterable[str]], policy_files: Iterable[str]) -> None:
    """Publish `tags` for those lab workloads and apply the policies, through the CLI."""
    for name, t in tags.items():
        inventory.set_workload(lab, name, t)
    for f in policy_files:
        inventory.apply_policy(lab, EXAMPLES / f if not Path(f).is_absolute() else f)


def packet_times(pcap: Path, bpf: str) -> list[float]:
    """Capture times (unix seconds) of the packets in `pcap` matching `bpf`."""
    out = subprocess.run(["tcpdump", "-tt", "-n", "-r", str(pcap), bpf],
                         capture_output=True, text=True, check=True).stdout
    return [float(line.split()[0]) for line in out.splitlines() if line.strip()]


def successes(log: Path) -> dict[str, list[float]]:
    """Times of the successful exchanges a flow client logged, by protocol."""
    got: dict[str, list[float]] = {p: [] for p in PROTOS}
    if log.exists():
        for line in log.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] in got:
                got[parts[0]].append(float(parts[1]))
    return got


# ------------------------------------------------------------------ the scenario

@dataclass
class _Report:
    what: str
    probe: Callable[[], object]
    seen: object = None
    error: str = ""


@dataclass
class Result:
    recovery_s: dict[str, float] = field(default_factory=dict)
    plaintext: dict[str, int] = field(default_factory=dict)
    reported: dict[str, object] = field(default_factory=dict)
    unselected_during_fault: dict[str, int] = field(default_factory=dict)
    fault_s: float = 0.0


class Scenario:
    """One fault under continuous traffic and capture; see the module rules.

    Pitfalls: a report probe runs in a thread and must be thread-safe (subprocess calls
    are); a fault that the agent cannot report while it lasts (it is the agent that is
    gone) must be reported by what a user would run, e.g. `tfcrypt status` exiting 2.
    """

    def __init__(self, lab: Lab, tmp_dir: Path, *, selected: Flow, unselected: Flow,
                 initially_selected: frozenset[Pair], recovery_bound_s: float,
                 extra_flows: Iterable[Flow] = (), name: str = "scenario") -> None:
        self.lab = lab
        self.dir = tmp_dir
        self.name = name
        self.selected = selected
        self.unselected = unselected
        self.flows = [selected, unselected, *extra_flows]
        self.recovery_bound_s = recovery_bound_s
        self.timeline: list[tuple[float, frozenset[Pair]]] = [(0.0, initially_selected)]
        self.pcap = tmp_dir / f"{name}.pcap"
        self.result = Result()
        self._ips = {w["name"]: w["ip"] for w in lab.status()["workloads"]}
        self._procs: list[ProcessRecord] = []
        self._stack = contextlib.ExitStack()
        self._reports: list[_Report] = []
        self._started: float | None = None
        self._ended: float | None = None
        self._stop_polling = threading.Event()
        self._poller: threading.Thread | None = None

    # -------------------------------------------------------------- traffic

    def log_of(self, src: str, dst: str) -> Path:
        """Successes of the client in `src` exchanging with `dst`."""
        return self.dir / f"{self.name}-{src}-{dst}.log"

    def _start_flows(self) -> None:
        for i, flow in enumerate(self.flows):
            port = str(FLOW_PORT + i)
            for src, dst in ((flow.a, flow.b), (flow.b, flow.a)):
                argv = [sys.executable, str(FLOW_SCRIPT), port, self._ips[dst], port,
                        str(self.log_of(src, dst)), str(FLOW_INTERVAL_S)]
                self._procs.append(self.lab.start_process(
                    "fault-flow", argv, target=src, log_name=f"flow-{self.name}-{src}.log"))

    def _stop_flows(self) -> None:
        for rec in self._procs:
            self.lab.stop_process(rec, timeout=5)
        self._procs.clear()

    def _directions(self, flow: Flow) -> list[tuple[str, str]]:
        return [(flow.a, flow.b), (flow.b, flow.a)]

    def _all_succeeded_since(self, flows: Iterable[Flow], since: float) -> bool:
        return all(any(t >= since for t in successes(self.log_of(s, d))[p])
                   for f in flows for s, d in self._directions(f) for p in PROTOS)

    def _wait(self, what: str, cond: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return True
            time.sleep(0.1)
        return cond()

    # -------------------------------------------------------------- context

    def __enter__(self) -> Scenario:
        try:
            self._stack.enter_context(capture(self.lab, self.pcap))
            self._stack.callback(self._stop_flows)
            self._start_flows()
            begin = time.time()
            if not self._wait("warm-up", lambda: self._all_succeeded_since(self.flows, begin),
                              WARMUP_TIMEOUT_S):
                raise AssertionError(f"{self.name}: traffic never flowed before the fault: "
                                     f"{self._summary(begin)}")
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self._stop_poller()
            if exc_type is None:
                self._settle()
        finally:
            self._stack.close()
        if exc_type is None:
            self._check()

    # -------------------------------------------------------------- marks

    def fault_started(self) -> None:
        self._started = time.time()
        self._poller = threading.Thread(target=self._poll, daemon=True)
        self._poller.start()

    def fault_ended(self) -> None:
        assert self._started is not None, "fault_ended() before fault_started()"
        self._stop_poller()
        self._ended = time.time()
        self.result.fault_s = self._ended - self._started

    def set_selected(self, pairs: frozenset[Pair], at: float | None = None) -> None:
        """The selected address pairs from `at` (default: now) on, after an inventory
        change; which instant counts is the test's stated semantics (docs/faults.md)."""
        self.timeline.append((time.time() if at is None else at, pairs))
        self.timeline.sort(key=lambda entry: entry[0])

    def pair(self, a: str, b: str) -> Pair:
        return frozenset((self._ips[a], self._ips[b]))

    # -------------------------------------------------------------- reports

    def expect_report(self, what: str, probe: Callable[[], object]) -> None:
        """While the fault lasts, `probe()` must once return something truthy."""
        self._reports.append(_Report(what, probe))

    def wait_reported(self, timeout: float = 30.0) -> dict[str, object]:
        """Block until every registered report was seen (call before healing)."""
        assert self._poller is not None, "wait_reported() outside the fault"
        self._wait("reports", lambda: all(r.seen for r in self._reports), timeout)
        missing = [f"{r.what} (last error: {r.error or '-'})" for r in self._reports
                   if not r.seen]
        assert not missing, f"{self.name}: never reported during the fault: {missing}"
        return {r.what: r.seen for r in self._reports}

    def _poll(self) -> None:
        while not self._stop_polling.is_set():
            for r in self._reports:
                if r.seen:
                    continue
                try:
                    r.seen = r.probe()
                except Exception as e:  # a probe may fail while things are broken
                    r.error = f"{type(e).__name__}: {e}"
            if all(r.seen for r in self._reports):
                return
            self._stop_polling.wait(REPORT_POLL_S)

    def _stop_poller(self) -> None:
        self._stop_polling.set()
        if self._poller is not None:
            self._poller.join(timeout=60)
        self._stop_polling = threading.Event()

    # -------------------------------------------------------------- checks

    def _settle(self) -> None:
        if self._ended is None:
            return
        ended = self._ended
        self._wait("recovery", lambda: self._all_succeeded_since([self.selected], ended),
                   self.recovery_bound_s + 5)
        time.sleep(0.5)

    def _selected_at(self, t: float) -> frozenset[Pair]:
        current = self.timeline[0][1]
        for since, pairs in self.timeline:
            if since <= t:
                current = pairs
        return current

    def _summary(self, since: float) -> dict[str, int]:
        return {f"{s}->{d} {p}": sum(1 for t in successes(self.log_of(s, d))[p] if t >= since)
                for f in self.flows for s, d in self._directions(f) for p in PROTOS}

    def _check(self) -> None:
        assert self._started is not None and self._ended is not None, \
            f"{self.name}: fault_started()/fault_ended() were not both called"
        start, end, res = self._started, self._ended, self.result
        failures: list[str] = []

        ever = frozenset().union(*(pairs for _, pairs in self.timeline))
        for pair in sorted(ever, key=sorted):
            a, b = sorted(pair)
            leaked = [t for t in packet_times(self.pcap, f"host {a} and host {b}")
                      if pair in self._selected_at(t)]
            res.plaintext[f"{a}<->{b}"] = len(leaked)
            if leaked:
                failures.append(f"(a) {len(leaked)} plaintext packets of selected pair "
                                f"{a}<->{b}, first at fault{leaked[0] - start:+.2f}s")

        u = self.unselected
        for s, d in self._directions(u):
            for p in PROTOS:
                times = sorted(successes(self.log_of(s, d))[p])
                during = sum(1 for t in times if start <= t <= end)
                res.unselected_during_fault[f"{s}->{d} {p}"] = during
                if not during:
                    failures.append(f"(b) unselected {s}->{d} {p}: no exchange during the fault")
                gap = max((b - a for a, b in itertools.pairwise(times)), default=0.0)
                if gap > UNSELECTED_MAX_GAP_S:
                    failures.append(f"(b) unselected {s}->{d} {p} paused {gap:.1f}s")
        ua, ub = self._ips[u.a], self._ips[u.b]
        if not any(start <= t <= end
                   for t in packet_times(self.pcap, f"host {ua} and host {ub}")):
            failures.append("(b) no unselected packet on the underlay during the fault")

        for s, d in self._directions(self.selected):
            for p in PROTOS:
                after = [t for t in successes(self.log_of(s, d))[p] if t >= end]
                key = f"{s}->{d} {p}"
                if not after:
                    failures.append(f"(c) selected {key} never recovered")
                    continue
                res.recovery_s[key] = round(min(after) - end, 3)
                if res.recovery_s[key] > self.recovery_bound_s:
                    failures.append(f"(c) selected {key} recovered after "
                                    f"{res.recovery_s[key]:.1f}s > {self.recovery_bound_s}s")

        for r in self._reports:
            res.reported[r.what] = r.seen
            if not r.seen:
                failures.append(f"(d) never reported during the fault: {r.what} "
                                f"(last error: {r.error or '-'})")
        assert not failures, f"{self.name}: " + "; ".join(failures) + f" | {res}"


def wireguard_go_pid(lab: Lab, node: str) -> int | None:
    """The wireguard-go running in `node`'s network namespace (found by namespace, not
    by name alone: every node's wireguard-go has the same name)."""
    out = run(lab, node, "sh", "-c",
              "for p in /proc/[0-9]*; do "
              "[ \"$(cat $p/comm 2>/dev/null)\" = wireguard-go ] && "
              "[ \"$(readlink $p/ns/net)\" = \"$(readlink /proc/self/ns/net)\" ] "
              "&& basename $p; done", check=False).stdout.split()
    return int(out[0]) if out else None


def agent_log(lab: Lab, node: str) -> Path:
    rec = agents.running_agent(lab, node)
    assert rec is not None, f"no agent running in {node}"
    return Path(rec.log)


def applied_at(lab: Lab, node: str, why: str, since: float) -> float | None:
    """When `node`'s agent logged a dataplane change caused by `why` (e.g. "put
    workloads/n1/n1-w3"), at or after `since` (unix seconds); None if not yet."""
    for line in agent_log(lab, node).read_text(errors="replace").splitlines():
        if "event=dataplane_changed" not in line or why not in line:
            continue
        with contextlib.suppress(ValueError, IndexError):
            t = datetime.fromisoformat(line.split()[0]).timestamp()
            if t >= since:
                return t
    return None


class KeyWatch:
    """`etcdctl watch --prefix` in the controller namespace, noting when each key's event
    arrived: the commit time of a write, as an observer sees it (agents debounce 50 ms
    after their watch delivers, so they act after this watcher has heard).

    Used as a context manager; the etcdctl process is killed by PID on exit.
    """

    def __init__(self, lab: Lab, prefix: str) -> None:
        endpoints = ",".join(lab.status()["etcd"]["endpoints"])
        self.argv = [*lab.exec_prefix("controller"), "etcdctl", f"--endpoints={endpoints}",
                     "watch", "--prefix", prefix]
        self.prefix = prefix
        self.seen: list[tuple[float, str]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> KeyWatch:
        self._proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(self.prefix):
                self.seen.append((time.time(), line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        if self._proc is not None:
            self._proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)

    def committed(self, key: str, since: float, timeout: float = 10.0) -> float:
        """When an event of `key` (full etcd key) arrived at or after `since`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((t for t, k in list(self.seen) if k == key and t >= since), None)
            if hit is not None:
                return hit
            time.sleep(0.02)
        raise AssertionError(f"no etcd event for {key} since {since}")
