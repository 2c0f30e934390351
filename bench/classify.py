"""Classification cost is flat: an unselected flow's packet rate with 100,000 set elements
vs the same flow with 10 (D3's unselected half; bench.dataplane has the selected half).

Run `python -m bench.classify [--pairs N] [--seconds S] [--quick]` as root (figure D3).

Rules:
- Two labs side by side, each two fresh namespaces joined by a veth: the client (the
  "local workload" side, holding tfcrypt's `table inet tfcrypt` installed by NftManager)
  and the server (`iperf3 -s` bound to its address, stopped by PID). Both labs use the
  same addresses (198.18.0.0/15, the benchmarking range), each in its own namespaces;
  the set elements are never addressed. A table is built once per phase, not per round.
- The flow is UNSELECTED: the client's IP is in a local class (in the maps), the server's
  IP is not in that class's remote set. A lab at N elements has N addresses in the set and
  in the maps.
- The measure is the packet rate of a 64-byte UDP flood (`iperf3 -R -u -b 0 -l 64`: the
  server sends, the client receives), counted as the client veth's rx_packets (read from
  /proc/<receiver pid>/net/dev, i.e. the client namespace's counters) over an interval.
  A 64-byte flood pays every lookup per packet (TCP rides on GRO/GSO aggregates and hides
  it). Without RPS, veth delivers on the sending CPU, so prerouting (tfcrypt's verdict-map
  lookup on the destination, set lookup on the source), routing and the socket lookup run
  in the sender's context and pace it: rx_packets is the rate the path sustains.
- Both floods run for the whole bench, one sending at a time (2 cores): the other lab's
  sender (its `iperf3 -s`) is stopped with SIGSTOP and resumed with SIGCONT, and counting
  starts `--settle` s after resuming. The receiving iperf3s are stopped once their flood
  runs: their sockets stay full and every packet ends there (dropped at the socket,
  after classification), so a reader's wake-ups and its CPU share do not enter the rate.
  Senders are pinned to CPU 0, receivers and the bench process (while counting) to CPU 1.
- IP early demux is switched off in each client namespace, so every received packet takes
  a routing decision, like a packet the node forwards (where the naive design's rules
  cost).
- Intervals are short (50 ms) and paired in ABBA order (A B, B A, A B, ...): this VM's
  speed jumps by up to 30 % within a fraction of a second (the flood's CPU 100 % busy,
  no steal reported), so only intervals close in time compare; linear drift cancels in
  each block of two pairs. Each pair gives the ratio B/A. The figure is their geometric
  mean with a 95 % bootstrap CI (ABBA blocks resampled, percentile interval, fixed seed),
  the median and its CI beside it.
- Phases, in order: an A/A control (both labs at 10 elements: the method's floor); lab 2
  at 100,000 vs lab 1 at 10; the crossover, lab 1 at 100,000 vs lab 2 at 10 (a
  difference between the labs themselves cancels in the pooled ratio); then the naive
  design: one `ip rule from A to B fwmark M/M lookup T` per selected pair (30, 1,000 and
  10,000, loaded with `ip -batch`) in lab 1 with its table at 10 elements vs lab 2 at 10.
  The flow matches none, so every packet walks all of them.
- Goal (issue #4): 100,000 elements within 3 % of 10: pass when the geometric mean and
  its CI's lower bound are above 0.97, short otherwise. Reported, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from bench.common import (
    Figure,
    Goal,
    conditions,
    markdown_table,
    namespaces,
    run_prefix,
    sh,
    stop_pid,
    write_results,
)
from tfcrypt.dataplane.nft_json import SubprocessNft
from tfcrypt.dataplane.nft_table import NftDesired
from tfcrypt.dataplane.nftables import NftManager

CLIENT, SERVER = "198.18.0.1", "198.18.0.2"
PORT = 5201
MARK = 0x00100000
TABLE = 29798
PRIO = 1820
SELECTOR = "sremote"
CLASS = "cbench"
LOCAL_BASE = ipaddress.IPv4Address("10.32.0.0")
REMOTE_BASE = ipaddress.IPv4Address("10.64.0.0")
SMALL, LARGE = 10, 100_000
UDP_LEN = 64
RULE_COUNTS = (30, 1000, 10_000)
GOAL = 0.97
SENDER_CPU, RECEIVER_CPU = 0, 1
RESAMPLES = 10_000
SEED = 4


@dataclass(frozen=True)
class Config:
    id: str
    elements: int
    rules: int


def _addresses(base: ipaddress.IPv4Address, n: int) -> Iterator[str]:
    return (str(base + i) for i in range(n))


def nft_desired(elements: int, wg_ifname: str) -> NftDesired:
    """The client in class CLASS with `elements` local IPs in the maps and `elements`
    remote IPs in the set, none of them the server."""
    local = {CLIENT: CLASS, **dict.fromkeys(_addresses(LOCAL_BASE, elements - 1), CLASS)}
    remote = frozenset(_addresses(REMOTE_BASE, elements))
    return NftDesired(local, {CLASS: frozenset({SELECTOR})}, {SELECTOR: remote}, mark=MARK,
                      wg_ifname=wg_ifname)


def rule_lines(verb: str, count: int) -> str:
    """`ip -batch` lines: one fwmark rule per (local, remote) pair; none matches the flow."""
    local = [CLIENT, *_addresses(LOCAL_BASE, 99)]
    remote = _addresses(REMOTE_BASE, count)
    return "".join(f"rule {verb} from {local[i % len(local)]} to {b} fwmark {MARK:#x}/{MARK:#x} "
                   f"lookup {TABLE} pref {PRIO}\n" for i, b in enumerate(remote))


class Lab:
    """Client and server namespaces; switches the client between configurations."""

    def __init__(self, client: str, server: str, prefix: str) -> None:
        self.client, self.server = client, server
        self.nft = NftManager(SubprocessNft(netns=client))
        self.wg_ifname = f"{prefix}wg"
        self.veth = f"{prefix}c"
        self.config: Config | None = None
        self.rules = 0
        self.iperf: subprocess.Popen[bytes] | None = None

    def wire(self, prefix: str) -> None:
        c, s = f"{prefix}c", f"{prefix}s"
        sh("ip", "-n", self.client, "link", "add", c, "type", "veth", "peer", "name", s,
           "netns", self.server)
        for ns, dev, addr in ((self.client, c, CLIENT), (self.server, s, SERVER)):
            sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("sysctl", "-qw", "net.ipv4.ip_early_demux=0", netns=self.client)

    def start_server(self) -> None:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.server, "iperf3", "-s", "-B", SERVER, "-p", str(PORT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.iperf = proc
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sh("ss", "-Hltn", f"sport = :{PORT}", netns=self.server).strip():
                return
            if proc.poll() is not None:
                raise RuntimeError(f"iperf3 -s exited with {proc.returncode}")
            time.sleep(0.05)
        raise RuntimeError("iperf3 -s not listening after 10 s")

    def stop_server(self) -> None:
        if self.iperf is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.iperf.pid, signal.SIGCONT)  # a stopped sender cannot exit
            stop_pid(self.iperf.pid)
            self.iperf.wait()
            self.iperf = None

    def switch(self, cfg: Config) -> None:
        self.nft.set_desired(nft_desired(cfg.elements, self.wg_ifname))
        report = asyncio.run(self.nft.apply())
        if not report.ok:
            raise RuntimeError(f"nft apply: {report.errors}")
        if cfg.rules != self.rules:
            if self.rules:
                sh("ip", "-n", self.client, "-batch", "-", stdin=rule_lines("del", self.rules))
            if cfg.rules:
                sh("ip", "-n", self.client, "-batch", "-", stdin=rule_lines("add", cfg.rules))
            self.rules = cfg.rules
        have = sh("ip", "-n", self.client, "rule", "show", "pref", str(PRIO)).count("\n")
        if have != cfg.rules:
            raise RuntimeError(f"{have} rules at pref {PRIO}, want {cfg.rules}")
        self.config = cfg

    def udp_kpps(self, seconds: float) -> float:
        """One iperf3 run of 64-byte UDP packets, what the client received (the server
        sends: -R), in thousands of packets per second (bench.kernel_profile's measure;
        this bench counts a continuous flood instead, see Flood)."""
        out = sh("iperf3", "-c", SERVER, "-B", CLIENT, "-p", str(PORT), "-R", "-J",
                 "-u", "-b", "0", "-l", str(UDP_LEN), "-t", str(seconds), netns=self.client)
        total = json.loads(out)["end"]["sum"]
        return (total["packets"] - total["lost_packets"]) / total["seconds"] / 1e3


@contextlib.contextmanager
def lab_up(prefix: str, first: Config) -> Iterator[Lab]:
    """Client and server namespaces wired, iperf3 serving, `first` applied; the server is
    stopped by PID and the namespaces deleted by name on the way out."""
    with namespaces(f"{prefix}-c", f"{prefix}-s") as (client, server):
        lab = Lab(client, server, prefix)
        try:
            lab.wire(prefix)
            lab.start_server()
            lab.switch(first)
            yield lab
        finally:
            lab.stop_server()


def rx_packets(pid: int, ifname: str) -> int:
    """rx_packets of `ifname` in the network namespace of process `pid`."""
    with open(f"/proc/{pid}/net/dev") as dev:
        for line in dev:
            name, _, fields = line.partition(":")
            if name.strip() == ifname:
                return int(fields.split()[1])
    raise RuntimeError(f"no {ifname} in /proc/{pid}/net/dev")


class Flood:
    """A lab's 64-byte UDP flood, running for the whole bench: the server's iperf3 sends
    (-R); it is stopped (SIGSTOP) except while its own interval is counted. The
    receiving iperf3 is stopped once the flood runs, so its socket stays full and every
    packet ends there, after classification, routing and the socket lookup."""

    def __init__(self, lab: Lab) -> None:
        if lab.iperf is None:
            raise RuntimeError("the lab's iperf3 server is not running")
        self.lab, self.sender = lab, lab.iperf.pid
        self.receiver: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.receiver = subprocess.Popen(
            ["ip", "netns", "exec", self.lab.client, "iperf3", "-c", SERVER, "-B", CLIENT,
             "-p", str(PORT), "-R", "-u", "-b", "0", "-l", str(UDP_LEN), "-t", "86400"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        if (os.cpu_count() or 1) > max(SENDER_CPU, RECEIVER_CPU):
            os.sched_setaffinity(self.sender, {SENDER_CPU})
            os.sched_setaffinity(self.receiver.pid, {RECEIVER_CPU})
        deadline = time.monotonic() + 10
        first = None
        while first is None:  # until `ip netns exec` has entered the client namespace
            with contextlib.suppress(RuntimeError, OSError):
                first = self.rx()
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {self.lab.veth} counters from the receiver")
            time.sleep(0.01)
        while self.rx() - first < 1000:
            if self.receiver.poll() is not None:
                raise RuntimeError(f"iperf3 -c exited with {self.receiver.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the UDP flood did not start within 10 s")
            time.sleep(0.05)
        os.kill(self.receiver.pid, signal.SIGSTOP)

    def rx(self) -> int:
        if self.receiver is None:
            raise RuntimeError("flood not started")
        return rx_packets(self.receiver.pid, self.lab.veth)

    def pause(self) -> None:
        os.kill(self.sender, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.sender, signal.SIGCONT)

    def count(self, seconds: float, settle: float) -> float:
        """Resume, let it settle, count for `seconds`, pause: kpackets/s received."""
        self.resume()
        try:
            time.sleep(settle)
            rx0, t0 = self.rx(), time.monotonic()
            time.sleep(seconds)
            rx1, t1 = self.rx(), time.monotonic()
        finally:
            self.pause()
        return (rx1 - rx0) / (t1 - t0) / 1e3

    def stop(self) -> None:
        if self.receiver is not None:
            for pid in (self.sender, self.receiver.pid):  # a stopped process cannot exit
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            stop_pid(self.receiver.pid)
            self.receiver.wait()
            self.receiver = None


# The statistics: pure functions of the measured intervals.

def abba(pairs: int) -> list[tuple[str, str]]:
    """The order of each pair's two intervals: A B, B A, A B, B A, ..."""
    return [("A", "B") if i % 2 == 0 else ("B", "A") for i in range(pairs)]


def blocks(values: Sequence[float]) -> list[list[float]]:
    """Consecutive pairs grouped two by two (one ABBA block each; a lone last pair alone)."""
    return [list(values[i:i + 2]) for i in range(0, len(values), 2)]


def bootstrap_ci(values: Sequence[float], stat: Callable[[list[float]], float],
                 resamples: int = RESAMPLES, seed: int = SEED, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap CI of `stat` over per-pair values, resampling whole ABBA
    blocks (two adjacent pairs share their drift, so they are not independent)."""
    groups = blocks(values)
    rng = random.Random(seed)
    stats = sorted(stat([v for g in rng.choices(groups, k=len(groups)) for v in g])
                   for _ in range(resamples))
    tail = (1 - level) / 2
    return stats[int(tail * resamples)], stats[min(resamples - 1, int((1 - tail) * resamples))]


@dataclass(frozen=True)
class Paired:
    """One comparison: the per-pair ratios B/A and their summary. The mean is taken on
    a log scale (geometric): a pair with B 30 % fast and one with A 30 % fast average to
    1, where an arithmetic mean of ratios would lean above it."""

    ratios: tuple[float, ...]
    mean: float
    median: float
    ci: tuple[float, float]
    median_ci: tuple[float, float]

    @classmethod
    def of(cls, ratios: Sequence[float]) -> Paired:
        logs = [math.log(r) for r in ratios]
        mean_ci = bootstrap_ci(logs, statistics.fmean)
        median_ci = bootstrap_ci(logs, statistics.median)
        return cls(tuple(ratios), math.exp(statistics.fmean(logs)),
                   statistics.median(ratios), (math.exp(mean_ci[0]), math.exp(mean_ci[1])),
                   (math.exp(median_ci[0]), math.exp(median_ci[1])))

    @property
    def passes(self) -> bool:
        """Flat within 3 %: the mean above 0.97 with the CI's lower bound above it too."""
        return self.mean > GOAL and self.ci[0] > GOAL

    def as_json(self) -> dict[str, object]:
        return {"pairs": len(self.ratios), "mean": round(self.mean, 4),
                "median": round(self.median, 4),
                "ci95_mean": [round(v, 4) for v in self.ci],
                "ci95_median": [round(v, 4) for v in self.median_ci]}

    def text(self) -> str:
        return (f"mean {self.mean:.4f} [95 % CI {self.ci[0]:.4f}, {self.ci[1]:.4f}], "
                f"median {self.median:.4f} [{self.median_ci[0]:.4f}, "
                f"{self.median_ci[1]:.4f}], {len(self.ratios)} pairs")


# The measurement.

@dataclass
class Phase:
    """Pairs of intervals in ABBA order: A and B are the two labs' floods."""

    name: str
    a: Flood
    b: Flood
    pairs: int
    a_config: str = ""
    b_config: str = ""
    a_kpps: list[float] = field(default_factory=list)
    b_kpps: list[float] = field(default_factory=list)

    def run(self, seconds: float, settle: float) -> list[float]:
        """Every pair's ratio B/A. The bench process waits on the receivers' CPU."""
        self.a_config, self.b_config = self.config(self.a), self.config(self.b)
        own = os.sched_getaffinity(0)
        if (os.cpu_count() or 1) > RECEIVER_CPU:
            os.sched_setaffinity(0, {RECEIVER_CPU})
        try:
            for order in abba(self.pairs):
                got = {side: (self.a if side == "A" else self.b).count(seconds, settle)
                       for side in order}
                if min(got.values()) <= 0:
                    raise RuntimeError(f"{self.name}: no packets counted in an interval")
                self.a_kpps.append(got["A"])
                self.b_kpps.append(got["B"])
        finally:
            os.sched_setaffinity(0, own)
        ratios = [b / a for a, b in zip(self.a_kpps, self.b_kpps, strict=True)]
        print(f"{self.name}: A {self.a_config} {statistics.median(self.a_kpps):.1f}, "
              f"B {self.b_config} {statistics.median(self.b_kpps):.1f} kpps (medians), "
              f"B/A median {statistics.median(ratios):.4f} over {self.pairs} pairs",
              file=sys.stderr)
        return ratios

    @staticmethod
    def config(flood: Flood) -> str:
        return flood.lab.config.id if flood.lab.config else "?"

    def as_json(self) -> dict[str, object]:
        return {"phase": self.name, "a": self.a_config, "b": self.b_config,
                "pairs": self.pairs, "order": "AB, BA, ... (ABBA)",
                "a_kpps": [round(v, 2) for v in self.a_kpps],
                "b_kpps": [round(v, 2) for v in self.b_kpps]}


def timed(what: str, action: Callable[[], None], log: dict[str, float]) -> None:
    started = time.monotonic()
    action()
    log[what] = round(time.monotonic() - started, 1)
    print(f"{what}: {log[what]} s", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    at_start = conditions()  # the load average before this bench adds its own
    started = time.monotonic()
    prefix = run_prefix("tfc")
    small = Config(f"nft{SMALL}", SMALL, 0)
    large = Config(f"nft{args.elements}", args.elements, 0)
    phases: list[Phase] = []
    builds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        lab1 = stack.enter_context(lab_up(f"{prefix}a", small))
        lab2 = stack.enter_context(lab_up(f"{prefix}b", small))
        floods = [Flood(lab1), Flood(lab2)]
        for flood in floods:
            stack.callback(flood.stop)
            flood.start()
            flood.pause()
        for flood in floods:  # warm-up, not counted
            flood.count(1.0, args.settle)

        def phase(name: str, a: Flood, b: Flood, pairs: int) -> list[float]:
            phases.append(Phase(name, a, b, pairs))
            return phases[-1].run(args.seconds, args.settle)

        control = phase("control", floods[0], floods[1], args.control_pairs)
        timed(f"lab 2 -> {large.id}", lambda: lab2.switch(large), builds)
        first = phase("lab2_large", floods[0], floods[1], args.pairs // 2)
        timed(f"lab 2 -> {small.id}", lambda: lab2.switch(small), builds)
        timed(f"lab 1 -> {large.id}", lambda: lab1.switch(large), builds)
        second = phase("lab1_large", floods[1], floods[0], args.pairs - args.pairs // 2)
        naive: dict[int, list[float]] = {}
        for count in args.rules if args.rule_pairs else ():
            cfg = Config(f"rules{count}", SMALL, count)
            timed(f"lab 1 -> {cfg.id}", lambda c=cfg: lab1.switch(c), builds)
            naive[count] = phase(cfg.id, floods[1], floods[0], args.rule_pairs)
    measured_s = round(time.monotonic() - started)

    flat = Paired.of(first + second)
    halves = {"lab2_large": Paired.of(first), "lab1_large": Paired.of(second)}
    aa = Paired.of(control) if control else None
    rules = {count: Paired.of(ratios) for count, ratios in naive.items()}
    verdict = "pass" if flat.passes else "short"
    by_config: dict[str, list[float]] = {small.id: [], large.id: []}
    for p in phases[1:3]:
        by_config[p.a_config] += p.a_kpps
        by_config[p.b_config] += p.b_kpps
    note = (f"B/A per adjacent pair (ABBA), {large.id} vs {small.id}, the labs crossed over "
            f"half way; {flat.text()}; {verdict}")
    figures = [
        Figure(f"D3.kpps_{small.id}", tuple(by_config[small.id]), "kpackets/s", None,
               f"{SMALL} set/map elements: 64-byte UDP, client veth rx, per interval"),
        Figure(f"D3.kpps_{large.id}", tuple(by_config[large.id]), "kpackets/s", None,
               f"{args.elements} set/map elements: 64-byte UDP, client veth rx, per interval"),
        Figure(f"D3.udp_ratio_{large.id}", flat.ratios, "x", None, note),
        Figure(f"D3.udp_ratio_{large.id}_mean", (flat.mean,), "x", None,
               f"geometric mean of the pair ratios; {note}"),
        Figure(f"D3.udp_ratio_{large.id}_ci_low", (flat.ci[0],), "x", Goal(GOAL, below=False),
               f"lower bound of the mean's 95 % bootstrap CI: flat within 3 % when it is "
               f"above {GOAL}; {verdict}"),
    ]
    if aa is not None:
        figures.append(Figure("D3.udp_ratio_control", aa.ratios, "x", None,
                              f"A/A control, both labs at {SMALL} elements; {aa.text()}"))
    for count, paired in rules.items():
        figures.append(Figure(f"D3.udp_ratio_rules{count}", paired.ratios, "x", None,
                              f"naive design, {count} ip rules and {SMALL} elements vs "
                              f"{SMALL} elements; {paired.text()}"))
    bias = (halves["lab2_large"].mean / halves["lab1_large"].mean) ** 0.5
    conds = conditions(
        loadavg_at_start=at_start["loadavg_at_start"], seconds_per_interval=args.seconds,
        settle_s=args.settle, pairs=len(flat.ratios), control_pairs=args.control_pairs,
        rule_pairs=args.rule_pairs, elements=[SMALL, args.elements],
        flow=f"iperf3 -R -u -b 0 -l {UDP_LEN}, continuous; the other lab's sender and both "
             f"receivers SIGSTOPped",
        counted="client veth rx_packets (/proc/<receiver>/net/dev)",
        pinning=f"senders CPU {SENDER_CPU}; receivers and the bench CPU {RECEIVER_CPU}",
        ip_early_demux=0,
        bootstrap=f"{RESAMPLES} resamples of ABBA blocks (2 pairs), percentile, seed {SEED}",
        builds_s=builds, runtime_s=measured_s)
    summary = {"verdict": verdict, "goal": f"geometric mean > {GOAL} and its 95 % CI's "
                                           f"lower bound > {GOAL}",
               "pooled": flat.as_json(),
               "halves": {k: v.as_json() for k, v in halves.items()},
               "lab_bias": round(bias, 4),
               "control": aa.as_json() if aa else None,
               "naive": {f"rules{c}": p.as_json() for c, p in rules.items()}}
    path = write_results("classify", figures, conds, d3=summary,
                         phases=[p.as_json() for p in phases])
    print(markdown_table(figures))
    print(f"\nD3 (unselected, {large.id} / {small.id}): {flat.text()}: **{verdict}** "
          f"(goal: the CI's lower bound above {GOAL})")
    for name, half in halves.items():
        print(f"  {name}: {half.text()}")
    if aa is not None:
        print(f"  A/A control: {aa.text()}")
    print(f"  lab bias (lab 2 / lab 1, from the crossover): {bias:.4f}")
    print(f"\nconditions: {conds}\nresults: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.classify")
    parser.add_argument("--pairs", type=int, default=800,
                        help="A/B pairs in all, half before and half after the crossover")
    parser.add_argument("--control-pairs", type=int, default=150, help="A/A pairs first")
    parser.add_argument("--rule-pairs", type=int, default=50,
                        help="pairs per naive ip-rule count")
    parser.add_argument("--seconds", type=float, default=0.05, help="counted per interval")
    parser.add_argument("--settle", type=float, default=0.02,
                        help="after resuming a flood, before counting")
    parser.add_argument("--elements", type=int, default=LARGE)
    parser.add_argument("--rules", type=int, nargs="*", default=list(RULE_COUNTS))
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 10,000 elements, 60 pairs, 30 and 1,000 rules")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.control_pairs, args.rule_pairs = 60, 20, 10
        args.elements, args.rules = 10_000, list(RULE_COUNTS[:2])
    if args.pairs < 2:
        parser.error("--pairs must be at least 2 (one per lab before and after the crossover)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
