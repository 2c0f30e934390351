"""Control-plane convergence in the lab (issue #7): C1 policy change, C2 node join, C5 key
rotation, measured on the kernel and on the wire of a real netns_lab cluster.

Run `python -m bench.convergence [--quick] [--only c1,c2,c5]` as root.

Rules:
- One lab (3 nodes x 1 workload, 1 etcd member, random name from run_prefix) serves all
  three figures, in the order C2, C5, C1, and is taken down in a `finally`. The figures
  stay independent: every run starts from a settled lab (C2: n3 fully removed; C5: every
  node peers with n3's current key and a ping passes; C1: the previous change is seen on
  every node and verified), and nothing one phase leaves behind (n3 joined, n3's new key)
  is an input of the next one's measurement.
- The kernel is watched, not agent status: one `nft monitor` per node (in the node's exec
  prefix) and one `etcdctl watch` on the policies prefix (controller namespace), started
  before the first change; a reader thread stamps each line with time.time() as it
  arrives. Events, not polling: no polling delay and no load on the measured nodes.
- C1 time zero is the policy write arriving at a watcher (`etcdctl watch`), not the
  controller command returning: the command typically returns 0.1-0.6 s *after* every
  agent has already applied the change (the Python CLI still tears down after its put), so
  "from return" is mostly negative. It is reported beside (C1.after_cli_return), with the
  command's own duration (C1.cli). Each agent's own "reconciled" log line is kept per
  change as a cross-check of the monitor timestamps (they agree within a few ms).
  The end is the last `inet tfcrypt` line of the node's `nft monitor`: the agent applies
  nftables last, after WireGuard, in both directions (tfcrypt.agent.dataplane), so that
  line means the whole dataplane of that node reflects the change. After the last event
  the state is verified (map elements and `wg` allowed IPs) before the run counts.
- C2 time zero is the agent process being started (time.time() before fork); the end is
  the first reply of `ping -D -i 0.01` from n1-w1 to n3-w1, running before the agent
  starts. Before the join the pings are dropped on n1 (selected, no verified peer); a
  reply proves both directions crossed inside WireGuard by construction: n1 marks the
  request (egress guard, fail-closed rule) and its strict ingress drops a plaintext reply.
  Between runs n3 really leaves: agent stopped, `tfcrypt uninstall` in n3 (new key on the
  next join), its record deleted from etcd, and n1/n2 no longer list its key in `wg`.
  Where the time goes: the agents' log lines and the WireGuard handshake messages
  between n1 and n3 (`tcpdump -tt` on the underlay, told apart by their sizes 148/92).
- C5: `ping -D -i 0.01` both ways between n1-w1 and n3-w1 while `tfcrypt keys rotate`
  runs in n3. Loss = sent - received (both directions; a late reply counts as received);
  window = lost x interval (the worse direction). Held packets are reported too: the
  longest gap between reply timestamps around the rotation (C5.gap_ms; the widest gap
  elsewhere in the same ping is kept as the noise floor) and the slowest reply. The
  timeline of each rotation (agent log lines of n3, n1, n2, handshake messages, the ping
  gap) goes into the results' extra.
- Benchmarks report, never assert. Every process started here is stopped by its PID in
  a `finally`; the lab's `down` also stops anything left in its namespaces.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bench.common import Figure, Goal, conditions, markdown_table, run_prefix, write_results
from netns_lab import Lab, Layout, agents, down, inventory

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
ENCRYPT_ALL = ROOT / "examples" / "encrypt-all.yaml"
POLICY = "encrypt-all"
PREFIX = "/tfcrypt/v1"
NODES = ("n1", "n2", "n3")
INTERVAL = 0.01  # ping interval (s); root may go below 0.2
SETTLE = 0.3  # no nft event on any node for this long: the change is complete

_REPLY = re.compile(r"^\[(\d+\.\d+)\] \d+ bytes from [^:]+: icmp_seq=(\d+) .*time=([\d.]+) ms")
_WG = re.compile(r"^(\d+\.\d+) .*IP ([\d.]+)\.\d+ > ([\d.]+)\.\d+: UDP, length (\d+)")
WG_KIND = {148: "initiation", 92: "response", 64: "cookie"}  # WireGuard message sizes
_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")
_LOG = re.compile(r"^(\d{4}-\d\d-\d\dT[\d:.]+[+-]\d\d:\d\d) (\w+) ([\w.]+): (.*)$")


# ---------------------------------------------------------------- pure parsing

def parse_replies(output: str) -> dict[int, float]:
    """icmp_seq -> receive time (unix s) from `ping -D` lines (first reply per seq)."""
    replies: dict[int, float] = {}
    for line in output.splitlines():
        if m := _REPLY.match(line):
            replies.setdefault(int(m.group(2)), float(m.group(1)))
    return replies


def parse_rtts(output: str) -> list[float]:
    """Round-trip times (ms) of the replies in `ping -D` output."""
    return [float(m.group(3)) for line in output.splitlines() if (m := _REPLY.match(line))]


def parse_handshakes(output: str, since: float) -> list[tuple[float, str, str, str]]:
    """(time, src, dst, kind) of WireGuard handshake messages in `tcpdump -tt -i any`
    output, each frame once (on `any` a bridged frame shows on two ports)."""
    seen: list[tuple[float, str, str, str]] = []
    for line in output.splitlines():
        m = _WG.match(line)
        if not m or (kind := WG_KIND.get(int(m.group(4)))) is None:
            continue
        at = float(m.group(1))
        msg = (at, m.group(2), m.group(3), kind)
        if at >= since and not (seen and seen[-1][1:] == msg[1:] and at - seen[-1][0] < 0.005):
            seen.append(msg)
    return seen


def parse_summary(output: str) -> tuple[int, int]:
    m = _SUMMARY.search(output)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@dataclass(frozen=True)
class LogLine:
    at: float
    level: str
    msg: str


def parse_log(text: str, since: float) -> list[LogLine]:
    """Agent text-log lines at or after `since` (unix s)."""
    out = []
    for line in text.splitlines():
        if not (m := _LOG.match(line)):
            continue
        at = dt.datetime.fromisoformat(m.group(1)).timestamp()
        if at >= since:
            out.append(LogLine(at, m.group(2), m.group(4)))
    return out


def first(lines: list[LogLine], *needles: str) -> float | None:
    """Time of the first line containing every needle."""
    return next((ln.at for ln in lines if all(n in ln.msg for n in needles)), None)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 1]."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class Percentile(Figure):
    """A figure whose value is the q-quantile of its runs (min, max, runs as usual)."""

    q: float = 0.5

    @property
    def value(self) -> float:
        return percentile(list(self.runs), self.q)


def gaps(replies: dict[int, float], sent: int, lo: float, hi: float) -> dict[str, Any]:
    """Lost sequence numbers as ranges; the longest stretch between two replies that
    overlaps [lo, hi] (the rotation) and, as the noise floor, the longest one elsewhere."""
    lost = [s for s in range(1, sent + 1) if s not in replies]
    ranges: list[list[int]] = []
    for s in lost:
        if ranges and ranges[-1][1] == s - 1:
            ranges[-1][1] = s
        else:
            ranges.append([s, s])
    pairs = [(b - a, a, b) for a, b in itertools.pairwise(sorted(replies.values()))]
    inside = max((p for p in pairs if p[2] >= lo and p[1] <= hi), default=(0.0, lo, lo))
    outside = max((p[0] for p in pairs if not (p[2] >= lo and p[1] <= hi)), default=0.0)
    return {"lost_seq_ranges": ranges, "gap_s": inside[0], "gap_from": inside[1],
            "gap_to": inside[2], "widest_gap_elsewhere_s": outside}


# ---------------------------------------------------------------- processes

class Stamped:
    """A child whose stdout lines are stamped with time.time() as they arrive."""

    def __init__(self, argv: list[str]) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))

    def since(self, t: float, pred: Callable[[str], bool] = lambda _: True) -> list[float]:
        return [at for at, line in list(self.lines) if at >= t and pred(line)]

    def text(self) -> str:
        return "\n".join(line for _, line in list(self.lines))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)


@contextlib.contextmanager
def stamped(*argvs: list[str]) -> Iterator[list[Stamped]]:
    started: list[Stamped] = []
    try:
        for argv in argvs:
            started.append(Stamped(argv))
        yield started
    finally:
        for s in started:
            s.stop()


def wait_for(what: str, probe: Callable[[], T | None], timeout: float,
             interval: float = 0.1) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(subprocess.CalledProcessError, OSError, ValueError):
            if got := probe():
                return got
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------- the lab

class Cluster:
    """The lab plus the few reads the phases need, all run inside lab namespaces."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        st = lab.status()
        self.ip = {w["name"]: w["ip"] for w in st["workloads"]}
        self.endpoints = ",".join(st["etcd"]["endpoints"])
        self.underlay = {n["underlay_ip"]: n["name"] for n in st["nodes"]}

    def run(self, target: str, *argv: str, timeout: float = 60) -> str:
        return subprocess.run([*self.lab.exec_prefix(target), *argv], capture_output=True,
                              text=True, check=True, timeout=timeout).stdout

    def etcdctl(self, *args: str) -> str:
        return self.run("controller", "etcdctl", f"--endpoints={self.endpoints}", *args)

    def allowed_ips(self, node: str) -> dict[str, str]:
        """public key -> allowed IPs ('(none)' if none), from `wg show`."""
        out = self.run(node, "wg", "show", "tfcrypt0", "allowed-ips")
        return dict(line.split("\t", 1) for line in out.strip().splitlines() if line)

    def out_v4(self, node: str) -> int:
        doc = json.loads(self.run(node, "nft", "-j", "list", "map", "inet", "tfcrypt",
                                  "out_v4"))
        return sum(len(o["map"].get("elem", [])) for o in doc["nftables"] if "map" in o)

    def public_key(self, node: str) -> str:
        status = json.loads((agents.state_dir(self.lab, node) / "status.json").read_text())
        return str(status["public_key"])

    def agent_log(self, node: str, since: float) -> list[LogLine]:
        path = self.lab.layout.logs_dir / f"{agents.AGENT}-{node}.log"
        return parse_log(path.read_text(errors="replace"), since)

    def mesh(self) -> bool:
        """Every node peers with every other node's current key, with its /32."""
        keys = {n: self.public_key(n) for n in NODES}
        for node in NODES:
            got = self.allowed_ips(node)
            want = {keys[o]: f"{self.ip[o + '-w1']}/32" for o in NODES if o != node}
            if got != want:
                return False
        return True

    def ping_argv(self, src: str, dst: str, *, count: int | None = None,
                  deadline: float | None = None) -> list[str]:
        argv = [*self.lab.exec_prefix(src), "ping", "-D", "-n", "-i", str(INTERVAL), "-W", "1"]
        argv += ["-c", str(count)] if count else []
        argv += ["-w", str(int(deadline))] if deadline else []
        return [*argv, self.ip[dst]]

    def capture_argv(self) -> list[str]:
        """WireGuard messages on every port of the underlay bridge, one line each."""
        return [*self.lab.exec_prefix("underlay"), "tcpdump", "-i", "any", "-n", "-l", "-tt",
                "--immediate-mode", "udp port 51820"]

    def handshakes(self, cap: Stamped, zero: float, a: str, b: str) -> list[str]:
        """Handshake messages between nodes a and b after `zero`, as readable lines."""
        return [f"{ms(at, zero)} ms {self.underlay[s]} -> {self.underlay[d]} {kind}"
                for at, s, d, kind in parse_handshakes(cap.text(), zero)
                if {self.underlay.get(s), self.underlay.get(d)} == {a, b}]

    def ping_ok(self, src: str, dst: str) -> bool:
        out = subprocess.run([*self.lab.exec_prefix(src), "ping", "-n", "-q", "-c", "3", "-i",
                              "0.05", "-W", "1", self.ip[dst]], capture_output=True, text=True)
        return parse_summary(out.stdout)[1] == 3


def ms(t: float | None, zero: float) -> float | None:
    return None if t is None else round((t - zero) * 1000, 1)


# ---------------------------------------------------------------- C2: node join

def leave(c: Cluster) -> None:
    """n3 leaves for real: agent stopped, kernel state and key removed, record deleted."""
    key = c.public_key("n3")
    agents.stop_agent(c.lab, "n3")
    c.run("n3", sys.executable, "-m", "tfcrypt", "uninstall", "--state-dir",
          str(agents.state_dir(c.lab, "n3")), "--status-socket",
          str(agents.status_socket(c.lab, "n3")))
    c.etcdctl("del", f"{PREFIX}/nodes/n3")
    wait_for("n1 and n2 to drop n3", lambda: all(key not in c.allowed_ips(n)
                                                 for n in ("n1", "n2")), timeout=20)


def join_once(c: Cluster) -> dict[str, Any]:
    with stamped(c.capture_argv(), c.ping_argv("n1-w1", "n3-w1", deadline=30)) as (cap, probe):
        wait_for("tcpdump to listen", lambda: cap.since(0, lambda ln: "listening on" in ln),
                 timeout=10)
        time.sleep(0.5)
        early = probe.since(0, lambda line: "bytes from" in line)
        t0 = time.time()
        agents.start_agent(c.lab, "n3")
        wait_for("the first reply from n3-w1",
                 lambda: probe.since(t0, lambda line: "bytes from" in line), timeout=25,
                 interval=0.02)
    replies = parse_replies(probe.text())
    reply = min(at for at in replies.values() if at >= t0)
    time.sleep(0.5)  # let the log lines of the first reconciles land
    n3 = c.agent_log("n3", t0)
    n1 = c.agent_log("n1", t0)
    shakes = c.handshakes(cap, t0, "n1", "n3")
    return {
        "join_s": reply - t0, "replies_before_start": len(early), "handshakes_n1_n3": shakes,
        "initiations_before_response": _initiations(shakes),
        "handshake_s": _handshake_s(shakes),
        "timeline_ms": {
            "n3 agent started": 0.0,
            "n3 key loaded, device up (first log line)": ms(n3[0].at if n3 else None, t0),
            "n3 dataplane applied (first reconciled)": ms(first(n3, "reconciled"), t0),
            "n3 record published": ms(first(n3, "published nodes/n3"), t0),
            "n1 peer n3 added (reconciled, nodes/n3)": ms(first(n1, "reconciled",
                                                                 "nodes/n3"), t0),
            "n1 -> n3 first handshake initiation": _first_shake(shakes, "n1 -> n3 initiation"),
            "first handshake response n1 <-> n3": _first_shake(shakes, "response"),
            "first reply at n1-w1": ms(reply, t0)}}


def _initiations(lines: list[str]) -> int:
    """Handshake initiations sent before the first response: 1 when the first is answered."""
    n = 0
    for ln in lines:
        if "response" in ln:
            break
        n += "initiation" in ln
    return n


def _handshake_s(lines: list[str]) -> float | None:
    """First handshake message (either way) -> first response, in seconds."""
    start, done = _first_shake(lines, " ms "), _first_shake(lines, "response")
    return None if start is None or done is None else (done - start) / 1000


def _first_shake(lines: list[str], what: str) -> float | None:
    return next((float(ln.split(" ms ")[0]) for ln in lines if what in ln), None)


def c2(c: Cluster, runs: int) -> tuple[list[Figure], list[dict[str, Any]]]:
    done = []
    for i in range(runs):
        if i:
            leave(c)
        done.append(join_once(c))
        print(f"C2 join {i + 1}: {done[-1]['join_s']:.3f} s {done[-1]['timeline_ms']}",
              file=sys.stderr)
    wait_for("the full mesh after the joins", c.mesh, timeout=30)

    def part(key: str) -> tuple[float, ...]:
        return tuple(v / 1000 for r in done if (v := r["timeline_ms"][key]) is not None)

    figures = [Figure("C2.join_s", tuple(r["join_s"] for r in done), "s", Goal(2),
                      "n3's agent started -> first ping reply n1-w1 <- n3-w1 (encrypted "
                      "by construction)")]
    shakes = tuple(r["handshake_s"] for r in done if r["handshake_s"] is not None)
    if shakes:
        figures.append(Figure("C2.handshake_s", shakes, "s", None,
                              "first WireGuard handshake message n1 <-> n3 (either way) -> "
                              "first response (tcpdump on the underlay); ~5 s when the first "
                              "initiation found no peer and waited for REKEY_TIMEOUT"))
    for fid, key in (("C2.n3_applied_s", "n3 dataplane applied (first reconciled)"),
                     ("C2.n3_published_s", "n3 record published"),
                     ("C2.n1_peer_added_s", "n1 peer n3 added (reconciled, nodes/n3)")):
        if runs_ := part(key):
            figures.append(Figure(fid, runs_, "s", None, f"agent start -> {key} (agent logs)"))
    return figures, done


# ---------------------------------------------------------------- C5: key rotation

def rotate_once(c: Cluster, seconds: float) -> dict[str, Any]:
    old = c.public_key("n3")
    count = int(seconds / INTERVAL)
    with stamped(c.capture_argv(), c.ping_argv("n1-w1", "n3-w1", count=count),
                 c.ping_argv("n3-w1", "n1-w1", count=count)) as (cap, *pings):
        wait_for("tcpdump to listen", lambda: cap.since(0, lambda ln: "listening on" in ln),
                 timeout=10)
        time.sleep(1.0)
        t0 = time.time()
        c.run("n3", sys.executable, "-m", "tfcrypt", "keys", "rotate", "--state-dir",
              str(agents.state_dir(c.lab, "n3")))
        t_ret = time.time()
        for p in pings:
            p.proc.wait(timeout=seconds + 30)
    new = wait_for("n3's new key in its status", lambda: (k if (k := c.public_key("n3"))
                                                          != old else None), timeout=10)
    wait_for("n1 and n2 to peer with n3's new key", lambda: all(
        new in c.allowed_ips(n) and old not in c.allowed_ips(n) for n in ("n1", "n2")),
        timeout=20)
    time.sleep(0.3)
    logs = {n: c.agent_log(n, t0) for n in NODES}
    timeline = {
        "keys rotate command started": 0.0,
        "keys rotate command returned": ms(t_ret, t0),
        "n3 noticed the key file": ms(noticed := first(logs["n3"], "wireguard key rotated"),
                                      t0),
        "n3 device on the new key (reconciled, key rotated)": ms(
            first(logs["n3"], "reconciled", "key rotated"), t0),
        "n3 record published": ms(first(logs["n3"], "published nodes/n3"), t0),
        "n1 peer n3 updated (reconciled, nodes/n3)": ms(
            n1_done := first(logs["n1"], "reconciled", "nodes/n3"), t0),
        "n2 peer n3 updated (reconciled, nodes/n3)": ms(
            first(logs["n2"], "reconciled", "nodes/n3"), t0)}
    lo = noticed if noticed is not None else t0
    hi = (n1_done if n1_done is not None else t0 + seconds) + 0.5
    directions = {}
    for name, p in zip(("n1-w1 -> n3-w1", "n3-w1 -> n1-w1"), pings, strict=True):
        sent, received = parse_summary(p.text())
        g = gaps(parse_replies(p.text()), sent, lo, hi)
        rtts = parse_rtts(p.text())
        directions[name] = {"sent": sent, "received": received, "lost": sent - received,
                            "max_rtt_ms": max(rtts, default=0.0),
                            "median_rtt_ms": statistics.median(rtts) if rtts else None,
                            "replies_over_50ms": sum(1 for r in rtts if r > 50),
                            "lost_seq_ranges": g["lost_seq_ranges"],
                            "gap_ms": round(g["gap_s"] * 1000, 1),
                            "widest_gap_elsewhere_ms": round(
                                g["widest_gap_elsewhere_s"] * 1000, 1)}
        timeline[f"{name}: last reply before the gap"] = ms(g["gap_from"], t0)
        timeline[f"{name}: first reply after the gap"] = ms(g["gap_to"], t0)
    lost = sum(d["lost"] for d in directions.values())
    worst = directions.values()
    return {"lost": lost, "window_ms": max(d["lost"] for d in worst) * INTERVAL * 1000,
            "gap_ms": max(d["gap_ms"] for d in worst),
            "max_rtt_ms": max(d["max_rtt_ms"] for d in worst), "directions": directions,
            "timeline_ms": timeline, "handshakes_n1_n3": c.handshakes(cap, t0, "n1", "n3")}


def c5(c: Cluster, runs: int, seconds: float) -> tuple[list[Figure], list[dict[str, Any]]]:
    done = []
    for i in range(runs):
        wait_for("the mesh with n3's current key", c.mesh, timeout=30)
        wait_for("n1-w1 <-> n3-w1", lambda: c.ping_ok("n1-w1", "n3-w1"), timeout=15)
        time.sleep(1.5)  # outside the agents' own-changes window and any pending resync
        done.append(rotate_once(c, seconds))
        r = done[-1]
        print(f"C5 rotation {i + 1}: lost {r['lost']}, window {r['window_ms']:.0f} ms, "
              f"gap {r['gap_ms']:.0f} ms; {r['timeline_ms']}", file=sys.stderr)
    figures = [
        Figure("C5.lost_packets", tuple(float(r["lost"]) for r in done), "packets", Goal(1),
               f"ping -i {INTERVAL} both ways n1-w1 <-> n3-w1 while n3 rotates its key"),
        Figure("C5.loss_window_ms", tuple(r["window_ms"] for r in done), "ms", None,
               "lost x interval, the worse direction"),
        Figure("C5.gap_ms", tuple(r["gap_ms"] for r in done), "ms", None,
               "longest time between two replies (ping -D) during the rotation, the worse "
               "direction (noise floor: widest_gap_elsewhere_ms in the runs)"),
        Figure("C5.max_rtt_ms", tuple(r["max_rtt_ms"] for r in done), "ms", None,
               "slowest reply: packets held while the new session is negotiated")]
    return figures, done


# ---------------------------------------------------------------- C1: policy change

def tfcrypt_event(line: str) -> bool:
    return " inet tfcrypt " in f" {line} "


def change_once(c: Cluster, monitors: list[Stamped], watch: Stamped, *, on: bool,
                timeout: float = 15) -> dict[str, Any]:
    args = ("policy", "apply", "-f", str(ENCRYPT_ALL)) if on else ("policy", "delete", POLICY)
    argv = inventory.controller_argv(c.lab, *args)
    t_start = time.time()
    subprocess.run(argv, check=True, capture_output=True, timeout=60)
    t_ret = time.time()
    verb = "PUT" if on else "DELETE"
    t0 = wait_for("the policy write at the etcd watcher",
                  lambda: watch.since(t_start, lambda line: line == verb), timeout)[0]
    wait_for("an nft event on every node", lambda: all(
        m.since(t_start, tfcrypt_event) for m in monitors), timeout, interval=0.02)
    wait_for("the nft events to settle", lambda: all(
        not m.since(time.time() - SETTLE, tfcrypt_event) for m in monitors), timeout,
        interval=0.05)
    want = 1 if on else 0
    wait_for("the dataplane state of the change", lambda: all(
        c.out_v4(n) == want and all((ips != "(none)") == on
                                    for ips in c.allowed_ips(n).values())
        for n in NODES), timeout)
    ends = {n: max(m.since(t_start, tfcrypt_event)) for n, m in zip(NODES, monitors,
                                                                     strict=True)}
    last = max(ends.values())
    logged = {n: first(c.agent_log(n, t_start), "reconciled", f"policies/{POLICY}")
              for n in NODES}
    return {"op": "apply" if on else "delete", "latency_ms": (last - t0) * 1000,
            "after_cli_return_ms": (last - t_ret) * 1000, "cli_ms": (t_ret - t_start) * 1000,
            "write_seen_after_cli_start_ms": (t0 - t_start) * 1000,
            "node_end_ms": {n: round((e - t0) * 1000, 1) for n, e in ends.items()},
            "node_logged_reconciled_ms": {n: ms(at, t0) for n, at in logged.items()}}


def c1(c: Cluster, changes: int) -> tuple[list[Figure], list[dict[str, Any]]]:
    # stdbuf: nft prints with stdio; a pipe must not hold lines back in a block buffer
    argvs = [[*c.lab.exec_prefix(n), "stdbuf", "-oL", "nft", "monitor"] for n in NODES]
    argvs.append([*c.lab.exec_prefix("controller"), "etcdctl", f"--endpoints={c.endpoints}",
                  "watch", "--prefix", f"{PREFIX}/policies/"])
    done = []
    with stamped(*argvs) as procs:
        monitors, watch = procs[:3], procs[3]
        time.sleep(1.0)  # the watchers are listening
        on = c.out_v4("n1") == 0  # the first change flips whatever is there now
        for i in range(changes):
            done.append(change_once(c, monitors, watch, on=on))
            on = not on
            r = done[-1]
            print(f"C1 change {i + 1} ({r['op']}): {r['latency_ms']:.1f} ms after the write, "
                  f"{r['after_cli_return_ms']:.1f} ms after the CLI returned "
                  f"(CLI {r['cli_ms']:.0f} ms); per node {r['node_end_ms']}", file=sys.stderr)
    lat = tuple(r["latency_ms"] for r in done)
    n = f"{len(done)} changes (encrypt-all applied / deleted in turn)"
    figures = [
        Percentile("C1.p50", lat, "ms", None, f"policy write seen by etcd watchers -> last "
                   f"node's nft commit; {n}", q=0.5),
        Percentile("C1.p99", lat, "ms", Goal(500), f"p99 of {n}", q=0.99),
        Percentile("C1.max", lat, "ms", None, f"max of {n}", q=1.0),
        Figure("C1.after_cli_return", tuple(r["after_cli_return_ms"] for r in done), "ms",
               None, "last node's nft commit minus the controller command's return "
                     "(negative: applied before the CLI exited)"),
        Figure("C1.cli", tuple(r["cli_ms"] for r in done), "ms", None,
               "`tfcrypt policy apply/delete` from start to return")]
    return figures, done


# ---------------------------------------------------------------- main

def bring_up(name: str) -> Cluster:
    lab = Lab(Layout(name, nodes=3, workloads_per_node=1, etcd_members=1), svid_ttl=600)
    lab.up()
    c = Cluster(lab)
    inventory.publish_workloads(lab)
    inventory.apply_policy(lab, ENCRYPT_ALL)
    for node in ("n1", "n2"):
        agents.start_agent(lab, node)
    wait_for("n1 and n2 to peer", lambda: all(len(c.allowed_ips(n)) == 1
                                              for n in ("n1", "n2")), timeout=60)
    time.sleep(1.0)
    return c


def run(args: argparse.Namespace) -> int:
    only = set(args.only.split(","))
    name = run_prefix("cv")
    figures: list[Figure] = []
    extra: dict[str, Any] = {}
    started = time.monotonic()
    conds = conditions(nodes=3, workloads_per_node=1, etcd_members=1, lab=name,
                       ping_interval_s=INTERVAL, settle_s=SETTLE, policy=POLICY)
    try:
        c = bring_up(name)
        extra["lab_up_s"] = round(time.monotonic() - started, 1)
        # C2 needs n3 absent, so it goes first; its last join leaves n3 in the mesh.
        if "c2" in only:
            f, extra["c2_runs"] = c2(c, args.joins)
            figures += f
        else:
            agents.start_agent(c.lab, "n3")
            wait_for("the full mesh", c.mesh, timeout=60)
        if "c5" in only:
            f, extra["c5_runs"] = c5(c, args.rotations, args.ping_seconds)
            figures += f
        if "c1" in only:
            f, extra["c1_runs"] = c1(c, args.changes)
            figures += f
    finally:
        down(name)
    extra["runtime_s"] = round(time.monotonic() - started, 1)
    path = write_results("convergence", figures, conds, **extra)
    print(markdown_table(figures))
    print(f"\nconditions: {conds}\nruntime: {extra['runtime_s']} s\nresults: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convergence")
    parser.add_argument("--changes", type=int, default=50, help="C1 policy changes")
    parser.add_argument("--joins", type=int, default=5, help="C2 node joins")
    parser.add_argument("--rotations", type=int, default=5, help="C5 key rotations")
    parser.add_argument("--ping-seconds", type=float, default=6.0,
                        help="C5: length of each ping (rotation 1 s in)")
    parser.add_argument("--only", default="c1,c2,c5", help="comma-separated subset")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 5 changes, 1 join, 1 rotation")
    args = parser.parse_args(argv)
    if args.quick:
        args.changes, args.joins, args.rotations = 5, 1, 1
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
