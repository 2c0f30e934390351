"""The data plane: tfcrypt's tunnel vs hand-made WireGuard (D1), an unselected flow vs no
tfcrypt at all (D2), a selected flow with 100,000 set elements vs none (D3's selected
half; bench.classify has the unselected half), and the tunnel MTU on the wire (D4).

Run `python -m bench.dataplane [--quick] [--rounds R] [--seconds S] [--udp-seconds U]
[--elements N] [--control]` as root.

Rules:
- Five labs exist side by side, built the same way with the same addresses (each in its
  own namespaces, random per-run names): two node namespaces joined by a veth underlay
  (MTU 1500, 198.18.0.1/.2), each node routing one workload namespace behind a veth
  (198.18.1.10 and 198.18.2.10, no NAT, forwarding on, rp_filter off). iperf3 -s runs in
  workload b, the client in workload a, so every measured packet is forwarded by both
  nodes. The labs: `t1` tfcrypt with the flow selected, `r1` wireguard-go configured by
  hand with `wg` (no nft table, no ip rules), `t2` tfcrypt with the flow unselected and
  `elements` other selected remote addresses, `p2` plain veth routing, `t3` like `t1` with
  `elements` more selected addresses of node b in the flow's set and b's allowed IPs,
  `t4` like `t1` for D4 alone (its capture interfaces are changed, see below).
- Flow accounting (issue #19) is on in every tfcrypt lab, as in the agent by default;
  `f1` and `f2` are `t1` and `t2` with it off (`flows: false`), measured in the same
  rounds, so D1.noflows_* and D2.noflows_* against the same baselines say what the flow
  records cost a packet (docs/flows.md "Cost").
- Two wireguard-go builds (docs/wireguard.md "Which wireguard-go"): every lab runs the
  current one from tools/wireguard-go, as the lab's agents do; `t0` and `r0` are `t1` and
  `r1` on Debian's 2022 build (`wireguard-go` on PATH), measured in the same rounds, so
  D1.debian_* puts both builds' absolute Gbit/s side by side (informative, no goal;
  `--no-debian` leaves them out).
- tfcrypt's side is the agent's real dataplane: `Dataplane(WireGuardManager(
  UserspaceBackend), NftManager(SubprocessNft), PyRoute2Netlink, RoutingConfig)` per node,
  given `compute()` of a two-node Snapshot (real X25519 keys, endpoints = the other node's
  underlay IP), MTU = the agent's DEFAULT_MTU.
- Why several labs instead of switching one: switching tfcrypt on and off costs seconds (100k
  nft elements and allowed IPs) and leaves the switched state in doubt; idle namespaces
  and an idle wireguard-go cost nothing, and every lab is identical but for its config.
  Runs interleave A B per measure (tfcrypt first in even rounds, the baseline first in odd
  ones, so position in the round cancels); each ratio is taken within one round, then the
  median. Goals (issue #7): ratios >= 0.95 (judged as > 0.95), reported, never asserted.
  `--control` adds a fifth lab identical to `p2` and its ratio to `p2` (D2.control_*):
  what two identical configurations differ by here, i.e. what a ratio can resolve.
- After the runs, per node: wireguard-go's UDP receive-buffer drops, bytes through each
  WireGuard device (the unselected flow must leave `t2`'s tunnel idle) and tfcrypt's drop
  counters go to the JSON (`counters`).
- D4 runs first, on a fresh `t4`: its workload has learnt no path MTU yet, so the capture
  shows how a 1500-byte workload learns the tunnel MTU (ICMP frag-needed from its node:
  tfcrypt does not clamp the MSS). tcpdump on node A's underlay veth, its WireGuard device
  and its workload veth during full-size pings (`ping -M do`) and a TCP run.
- D4 counts packets as the wire carries them: the current wireguard-go sends with UDP GSO
  and reads TSO superpackets from its TUN, and a veth or TUN passes a GSO skb on whole,
  so tcpdump there would see one ~65 KB "packet" per batch. `t4`'s underlay veth (both
  ends) and node A's WireGuard device get `gso_max_segs 1`: the kernel segments in
  software before those devices, where tcpdump taps, into the very packets a NIC would
  put on the wire (gso_size is the MSS/message size, unchanged); wireguard-go still
  sends with UDP_SEGMENT. It changes where segmentation runs, not any size D4 reports,
  and only in `t4`, whose throughput is no figure. Estimating segments from bytes / MSS
  instead would assume the very size D4 measures.
- Every namespace, process and temp dir is removed by exact name or PID in a `finally`.
  Traffic stays between the labs' own namespaces; the synthetic selected addresses
  (10.64.0.0 + i) are set elements and allowed IPs only, never addressed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import (
    DEBIAN_WIREGUARD_GO,
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
from tfcrypt.agent.dataplane import Dataplane, RoutingConfig
from tfcrypt.agent.mtu import DEFAULT_MTU
from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.dataplane.netlink import PyRoute2Netlink
from tfcrypt.dataplane.nft_json import SubprocessNft
from tfcrypt.dataplane.nft_table import FlowAccounting
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.tags import Tag
from tfcrypt.model.workload import Workload
from tfcrypt.wireguard.device import WireGuardManager
from tfcrypt.wireguard.keys import generate_private_key, public_key_of
from tfcrypt.wireguard.model import encode_key
from tfcrypt.wireguard.userspace import UserspaceBackend

UNDERLAY_MTU = 1500
UNDERLAY = ("198.18.0.1", "198.18.0.2")
GATEWAY = ("198.18.1.1", "198.18.2.1")
WORKLOAD = ("198.18.1.10", "198.18.2.10")
SUBNET = ("198.18.1.0/24", "198.18.2.0/24")
NODES = ("na", "nb")
SYNTH_BASE = ipaddress.IPv4Address("10.64.0.0")
PORT = 5201
LISTEN_PORT = 51820
OVERHEAD_V4, OVERHEAD_V6 = 60, 80
MEASURES = ("tcp1", "tcp4", "udp")
UDP_LEN = 64
PINGS = 3


@dataclass
class Pair:
    """One lab: node namespaces na/nb, workload namespaces wa/wb (interfaces `ul`
    underlay, `wl` node side of the workload veth, `eth0` in the workload)."""

    tag: str
    prefix: str
    iperf: subprocess.Popen[bytes] | None = None

    @property
    def wg(self) -> tuple[str, str]:
        """WireGuard device names, unique per run: /run/wireguard is shared."""
        return (f"{self.prefix}{self.tag}a", f"{self.prefix}{self.tag}b")

    @property
    def nodes(self) -> tuple[str, str]:
        return (f"{self.prefix}-{self.tag}-na", f"{self.prefix}-{self.tag}-nb")

    @property
    def workloads(self) -> tuple[str, str]:
        return (f"{self.prefix}-{self.tag}-wa", f"{self.prefix}-{self.tag}-wb")

    def namespaces(self) -> tuple[str, ...]:
        return (*self.nodes, *self.workloads)

    def wire(self) -> None:
        na, nb = self.nodes
        for node in self.nodes:
            for key in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                        "net.ipv4.conf.default.rp_filter=0"):
                sh("sysctl", "-qw", key, netns=node)
        sh("ip", "-n", na, "link", "add", "ul", "mtu", str(UNDERLAY_MTU), "type", "veth",
           "peer", "name", "ul", "mtu", str(UNDERLAY_MTU), "netns", nb)
        for i, node in enumerate(self.nodes):
            sh("ip", "-n", node, "addr", "add", f"{UNDERLAY[i]}/24", "dev", "ul")
            sh("ip", "-n", node, "link", "set", "ul", "up")
            wl = self.workloads[i]
            sh("ip", "-n", node, "link", "add", "wl", "type", "veth", "peer", "name", "eth0",
               "netns", wl)
            sh("ip", "-n", node, "addr", "add", f"{GATEWAY[i]}/24", "dev", "wl")
            sh("ip", "-n", node, "link", "set", "wl", "up")
            sh("ip", "-n", wl, "addr", "add", f"{WORKLOAD[i]}/24", "dev", "eth0")
            sh("ip", "-n", wl, "link", "set", "eth0", "up")
            sh("ip", "-n", wl, "route", "add", "default", "via", GATEWAY[i])
            sh("ip", "-n", node, "route", "add", SUBNET[1 - i], "via", UNDERLAY[1 - i])

    def start_server(self) -> None:
        wb = self.workloads[1]
        self.iperf = subprocess.Popen(
            ["ip", "netns", "exec", wb, "iperf3", "-s", "-B", WORKLOAD[1], "-p", str(PORT)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(lambda: bool(sh("ss", "-Hltn", f"sport = :{PORT}", netns=wb).strip()),
                 f"iperf3 -s in {wb}", self.iperf)

    def stop_server(self) -> None:
        if self.iperf is not None:
            stop_pid(self.iperf.pid)
            self.iperf.wait()
            self.iperf = None

    def iperf3(self, measure: str, seconds: float) -> dict[str, float]:
        """One client run from workload a; Gbit/s (TCP) or received packets/s (UDP)."""
        extra = {"tcp1": [], "tcp4": ["-P", "4"],
                 "udp": ["-u", "-b", "0", "-l", str(UDP_LEN)]}[measure]
        argv = ["ip", "netns", "exec", self.workloads[0], "iperf3", "-c", WORKLOAD[1],
                "-B", WORKLOAD[0], "-p", str(PORT), "-J", "-t", f"{seconds:g}", *extra]
        for attempt in (1, 2):
            done = subprocess.run(argv, capture_output=True, text=True, check=False,
                                  timeout=seconds + 30)
            try:
                end = json.loads(done.stdout)["end"]
                recv = end["sum_received"]
                if measure != "udp":
                    return {"value": recv["bits_per_second"] / 1e9,
                            "retransmits": end["sum_sent"].get("retransmits", 0)}
                got = recv["packets"] - recv["lost_packets"]
                return {"value": got / recv["seconds"] / 1e3,
                        "sent_kpps": end["sum_sent"]["packets"] / end["sum_sent"]["seconds"] / 1e3}
            except (ValueError, KeyError, ZeroDivisionError):
                if attempt == 2:
                    raise RuntimeError(f"iperf3 {measure} in {self.tag}: "
                                       f"{(done.stdout + done.stderr)[-400:]}") from None
                time.sleep(1)
        raise AssertionError("unreachable")


def wait_for(ready: Callable[[], bool], what: str,
             proc: subprocess.Popen[bytes] | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout:g} s")


# --- tfcrypt's side: the agent's dataplane on each node, fed by compute() ---------------

def snapshots(keys: tuple[str, str], selected: bool, elements: int) -> tuple[Snapshot, ...]:
    """Two-node snapshots (own node a, own node b). Selected: a (application=client) with b
    (application=server), and `elements` synthetic workloads on node b that are servers
    too (D3: the selected flow's set holds them). Unselected: a and b are both `client`,
    selected with `elements` synthetic workloads on node b (application=synth): node a
    holds them in its class set and its peer's allowed IPs, node b in its local maps; a-b
    matches no rule."""
    def tags(app: str) -> frozenset[Tag]:
        return frozenset({Tag("application", app)})

    peer_app = "server" if selected else "synth"
    workloads = [Workload("wa", NODES[0], (WORKLOAD[0],), tags("client")),
                 Workload("wb", NODES[1], (WORKLOAD[1],),
                          tags("server" if selected else "client"))]
    workloads += [Workload(f"s{i}", NODES[1], (str(SYNTH_BASE + i),), tags(peer_app))
                  for i in range(elements)]
    rule = Rule(Endpoint(tags=tags("client")), Endpoint(tags=tags(peer_app)))
    policy = EncryptionPolicy("bench-dataplane", Mode.ENFORCE, (rule,))
    records = {n: NodeRecord(n, f"spiffe://bench.tfcrypt/tfcrypt/node/{n}", keys[i],
                             f"{UNDERLAY[i]}:{LISTEN_PORT}", (), 1, 1)
               for i, n in enumerate(NODES)}
    by_key = {w.key: w for w in workloads}
    return tuple(Snapshot(n, by_key, {policy.name: policy}, records, keys[i])
                 for i, n in enumerate(NODES))


class TfcryptNode:
    """The agent's Dataplane in one node namespace (as bench/reconcile.py builds it)."""

    def __init__(self, netns: str, ifname: str, private_key: bytes, binary: str,
                 flows: bool = True) -> None:
        self.netns, self.ifname = netns, ifname
        self.backend = UserspaceBackend(ifname, netns=netns, binary=binary)
        self.netlink = PyRoute2Netlink(netns=netns)
        self.dataplane = Dataplane(WireGuardManager(self.backend),
                                   NftManager(SubprocessNft(netns=netns)), self.netlink,
                                   RoutingConfig(ifname=ifname),
                                   FlowAccounting() if flows else None)
        self.private_key = encode_key(private_key)

    async def apply(self, desired: Desired) -> dict[str, int]:
        self.dataplane.set_desired(desired, private_key_b64=self.private_key,
                                   listen_port=LISTEN_PORT, mtu=DEFAULT_MTU)
        result = await self.dataplane.apply()
        if result.errors:
            raise RuntimeError(f"{self.netns}: apply failed: {result.errors[:5]}")
        return result.changed

    async def close(self) -> None:
        """Stop this node's wireguard-go by PID (its namespace is deleted by the caller)."""
        try:
            await self.netlink.aclose()
            await self.backend.destroy()
        finally:
            if self.backend.pid is not None:
                stop_pid(self.backend.pid)


async def start_tfcrypt(pair: Pair, selected: bool, elements: int,
                        nodes: list[TfcryptNode], binary: str | None = None,
                        flows: bool = True) -> dict[str, object]:
    """compute() and apply on both nodes of `pair`, whose wireguard-go is `binary`
    (default the current build), with the agent's default flow accounting unless
    `flows` is False; appends to `nodes` as they start."""
    private = (generate_private_key(), generate_private_key())
    t0 = time.perf_counter()
    snaps = snapshots((public_key_of(private[0]), public_key_of(private[1])), selected,
                      elements)
    t1 = time.perf_counter()
    desired = [compute(s) for s in snaps]
    t2 = time.perf_counter()
    changed = []
    for i in (0, 1):
        nodes.append(TfcryptNode(pair.nodes[i], pair.wg[i], private[i],
                                 binary or wireguard_go(), flows))
        changed.append(await nodes[-1].apply(desired[i]))
    t3 = time.perf_counter()
    a = desired[0]
    return {"snapshot_s": round(t1 - t0, 2), "compute_s": round(t2 - t1, 2),
            "apply_s": round(t3 - t2, 2), "changed": changed,
            "node_a_set_elements": sum(len(v) for v in a.selector_ips.values()),
            "node_b_map_elements": len(desired[1].local_class),
            "node_a_allowed_ips": sum(len(p.allowed_ips) for p in a.peers.values()),
            "selected_pairs_a": a.selected_pair_count}


# --- D2's ablations: what each part of tfcrypt costs the unselected flow ------------------

CT_ORIGINAL, CT_REPLY = 0x00400000, 0x00800000
"""ct mark bits of the verdict-cache prototype: "this direction was classified clean"."""


def ablate_rules(pair: Pair) -> None:
    """`a2`: tfcrypt's ip rules deleted on both nodes (the unselected flow never needed
    them; the selected path would be broken): what the FIB's custom-rule walk costs."""
    config = RoutingConfig(ifname=pair.wg[0])
    ours = {str(config.tunnel_table), str(config.failclosed_table)}
    for node in pair.nodes:
        for fam in ("-4", "-6"):
            rules = json.loads(sh("ip", "-j", fam, "rule", "show", netns=node) or "[]")
            for rule in rules:
                if rule.get("table") in ours:
                    sh("ip", fam, "rule", "del", "priority", str(rule["priority"]), netns=node)
        left = [r for fam in ("-4", "-6")
                for r in json.loads(sh("ip", "-j", fam, "rule", "show", netns=node) or "[]")
                if r.get("table") in ours]
        if left:
            raise RuntimeError(f"{node}: tfcrypt's ip rules still there: {left}")


def ablate_ct_cache(pair: Pair) -> None:
    """`k2`: a conntrack verdict cache added by hand to tfcrypt's table, a prototype of
    issue #18's "classify a flow once": the first packet of each direction that is
    neither marked nor dropped (and did not come out of the tunnel) sets a ct mark bit
    for its direction, and later packets of that direction return at the head of
    prerouting. It measures what skipping the lookups would gain; it is not what tfcrypt
    runs (bench/README.md says why: invalidation on policy change, NAT's two tuples)."""
    wg = pair.wg
    mark = f"0x{RoutingConfig(ifname=wg[0]).mark:08x}"
    for node, ifname in zip(pair.nodes, wg, strict=True):
        script = "".join(
            f"insert rule inet tfcrypt prerouting ct direction {d} "
            f"ct mark & 0x{bit:08x} == 0x{bit:08x} counter return\n"
            f"add rule inet tfcrypt prerouting meta mark & {mark} != {mark} "
            f"iifname != \"{ifname}\" ct direction {d} ct mark set ct mark | 0x{bit:08x}\n"
            for d, bit in (("original", CT_ORIGINAL), ("reply", CT_REPLY)))
        subprocess.run(["ip", "netns", "exec", node, "nft", "-f", "-"], input=script.encode(),
                       check=True)


def ct_cache_hits(pair: Pair) -> dict[str, int]:
    """Packets that returned at the head of prerouting on the cache, per node: proof that
    the prototype was exercised (the counters on its two head rules)."""
    hits = {}
    for node in pair.nodes:
        listing = json.loads(sh("nft", "-j", "list", "chain", "inet", "tfcrypt", "prerouting",
                                netns=node))["nftables"]
        hits[node] = sum(e["counter"]["packets"] for item in listing if "rule" in item
                         for e in item["rule"]["expr"] if "counter" in e
                         and isinstance(e["counter"], dict) and "packets" in e["counter"])
    return hits


# --- the D1 baseline: wireguard-go configured by hand ------------------------------------

@dataclass
class HandWireGuard:
    """wireguard-go (`binary`: default the current build) + `wg set` on both nodes of a
    pair, the other workload subnet routed via the device; no nft table, no ip rules."""

    pair: Pair
    tmp: Path
    binary: str = ""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> None:
        private = (generate_private_key(), generate_private_key())
        for i, node in enumerate(self.pair.nodes):
            ifname = self.pair.wg[i]
            proc = subprocess.Popen(["ip", "netns", "exec", node,
                                     self.binary or wireguard_go(), "-f", ifname],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, start_new_session=True)
            self.procs.append(proc)
            sock = Path("/run/wireguard") / f"{ifname}.sock"
            wait_for(lambda s=sock, n=node, i=ifname: s.exists() and bool(link_mtu(n, i)),
                     f"wireguard-go {ifname}", proc)
            keyfile = self.tmp / f"{ifname}.key"
            fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(encode_key(private[i]) + "\n")
            sh("wg", "set", ifname, "private-key", str(keyfile), "listen-port",
               str(LISTEN_PORT), "peer", public_key_of(private[1 - i]), "endpoint",
               f"{UNDERLAY[1 - i]}:{LISTEN_PORT}", "allowed-ips", SUBNET[1 - i], netns=node)
            keyfile.unlink()
            sh("ip", "-n", node, "link", "set", ifname, "mtu", str(DEFAULT_MTU), "up")
            sh("ip", "-n", node, "route", "replace", SUBNET[1 - i], "dev", ifname)

    def stop(self) -> None:
        for proc in self.procs:
            stop_pid(proc.pid)
            proc.wait()
        self.procs.clear()


def link_mtu(netns: str, ifname: str) -> int:
    out = sh("ip", "-j", "link", "show", "dev", ifname, netns=netns, check=False)
    links = json.loads(out) if out.strip() else []
    return int(links[0]["mtu"]) if links else 0


def lab_counters(pair: Pair, wireguard: bool, tfcrypt: bool) -> dict[str, object]:
    """Per node, after the runs: UDP receive-buffer drops (wireguard-go's socket), bytes
    through the WireGuard device, tfcrypt's drop counters. Proves which path a lab's flow
    took (an unselected flow leaves the tunnel idle) and where a tunnel loses packets."""
    out: dict[str, object] = {}
    for i, node in enumerate(pair.nodes):
        snmp = [ln.split() for ln in sh("cat", "/proc/net/snmp", netns=node).splitlines()
                if ln.startswith("Udp:")]
        got: dict[str, object] = {"udp_rcvbuf_errors": int(
            snmp[1][snmp[0].index("RcvbufErrors")])}
        if wireguard:
            rows = [ln.split("\t") for ln in sh("wg", "show", pair.wg[i], "transfer",
                                                 netns=node).splitlines()]
            got["wg_rx_bytes"] = sum(int(r[1]) for r in rows)
            got["wg_tx_bytes"] = sum(int(r[2]) for r in rows)
        if tfcrypt:
            listing = json.loads(sh("nft", "-j", "list", "counters", "table", "inet", "tfcrypt",
                                    netns=node))
            got["nft_counters"] = {c["counter"]["name"]: c["counter"]["packets"]
                                   for c in listing["nftables"] if "counter" in c}
        out[NODES[i]] = got
    return out


# --- D4: what crosses the underlay ---------------------------------------------------------

@dataclass
class PcapStats:
    packets: int = 0
    fragments: int = 0
    max_ip_len: int = 0
    max_tcp_payload: int = 0
    syn_mss: dict[str, list[int]] = field(default_factory=dict)
    frag_needed_mtu: list[int] = field(default_factory=list)


def read_pcap(path: Path) -> PcapStats:
    """IPv4 header facts of every packet in a classic pcap file (Ethernet or raw IP)."""
    data = path.read_bytes()
    stats = PcapStats()
    if len(data) < 24:
        return stats
    magic = struct.unpack("<I", data[:4])[0]
    endian = "<" if magic in (0xA1B2C3D4, 0xA1B23C4D) else ">"
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    link_off = {1: 14, 101: 0, 12: 0, 14: 0}.get(linktype)
    if link_off is None:
        raise RuntimeError(f"{path}: link type {linktype} not handled")
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(endian + "I", data[pos + 8:pos + 12])[0]
        pkt = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        ip = pkt[link_off:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            continue
        stats.packets += 1
        ihl = (ip[0] & 15) * 4
        total, frag, proto = struct.unpack("!H", ip[2:4])[0], ip[6:8], ip[9]
        stats.max_ip_len = max(stats.max_ip_len, total)
        if struct.unpack("!H", frag)[0] & 0x3FFF:
            stats.fragments += 1
            continue
        l4 = ip[ihl:]
        if proto == 6 and len(l4) >= 20:
            doff = (l4[12] >> 4) * 4
            stats.max_tcp_payload = max(stats.max_tcp_payload, total - ihl - doff)
            if l4[13] & 0x02:
                src = str(ipaddress.IPv4Address(ip[12:16]))
                seen = stats.syn_mss.setdefault(src, [])
                seen.extend(m for m in _mss(l4[20:doff]) if m not in seen)
        elif proto == 1 and len(l4) >= 8 and l4[0] == 3 and l4[1] == 4:
            stats.frag_needed_mtu.append(struct.unpack("!H", l4[6:8])[0])
    return stats


def _mss(options: bytes) -> Iterator[int]:
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            return
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2:
            return
        if kind == 2 and options[i + 1] == 4 and i + 4 <= len(options):
            yield struct.unpack("!H", options[i + 2:i + 4])[0]
        i += options[i + 1]


@contextlib.contextmanager
def capture(netns: str, ifname: str, path: Path, bpf: str) -> Iterator[Path]:
    """tcpdump (headers only) on one interface for the `with` block; stopped by PID."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", netns, "tcpdump", "-i", ifname, "-n", "-U", "-s", "128",
         "--immediate-mode", "-Z", "root", "-w", str(path), bpf],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline().decode()
        if "listening on" not in line:
            raise RuntimeError(f"tcpdump on {ifname} in {netns}: {line.strip()}")
        yield path
        time.sleep(0.3)
    finally:
        stop_pid(proc.pid)
        proc.wait()


def ping(netns: str, dst: str, size: int, count: int) -> tuple[int, str]:
    """(replies, last line of ping's output) for `ping -M do -s size`."""
    done = subprocess.run(["ip", "netns", "exec", netns, "ping", "-n", "-M", "do", "-s",
                           str(size), "-c", str(count), "-i", "0.2", "-W", "2", dst],
                          capture_output=True, text=True, check=False, timeout=count + 20)
    out = (done.stdout + done.stderr).strip().splitlines()
    received = 0
    for line in out:
        if "packets transmitted" in line:
            received = int(line.split(",")[1].split()[0])
    return received, next((ln for ln in out if "mtu" in ln.lower()), out[-1] if out else "")


def measure_mtu(pair: Pair, tmp: Path, seconds: float) -> tuple[list[Figure], dict[str, object]]:
    """D4 on the tfcrypt lab with the flow selected, before any other traffic."""
    na, wa = pair.nodes[0], pair.workloads[0]
    wg_mtu = link_mtu(na, pair.wg[0])
    for node, dev in ((na, "ul"), (pair.nodes[1], "ul"), (na, pair.wg[0])):
        sh("ip", "-n", node, "link", "set", "dev", dev, "gso_max_segs", "1")
    files = {"underlay": tmp / "ul.pcap", "tunnel": tmp / "wg.pcap", "workload": tmp / "wl.pcap"}
    with capture(na, "ul", files["underlay"], "ip"), \
            capture(na, pair.wg[0], files["tunnel"], "ip"), \
            capture(na, "wl", files["workload"], "icmp or tcp[tcpflags] & tcp-syn != 0"):
        full, _ = ping(wa, WORKLOAD[1], wg_mtu - 28, PINGS)
        tcp = pair.iperf3("tcp1", seconds)
        over, over_said = ping(wa, WORKLOAD[1], wg_mtu - 27, 1)
    ul, wg, wl = (read_pcap(files[k]) for k in ("underlay", "tunnel", "workload"))
    figures = [
        Figure("D4.wg_mtu", (wg_mtu,), "bytes", Goal(UNDERLAY_MTU - OVERHEAD_V6 + 1),
               f"read back with ip -j link; goal <= underlay {UNDERLAY_MTU} - {OVERHEAD_V6} "
               f"(IPv6 overhead); the agent's DEFAULT_MTU {DEFAULT_MTU}, not read from the "
               "underlay"),
        Figure("D4.fragments", (ul.fragments,), "packets", Goal(1),
               f"IP fragments on node a's underlay veth among {ul.packets} packets "
               f"(inside the tunnel: {wg.fragments})"),
        Figure("D4.max_outer_bytes", (ul.max_ip_len,), "bytes", Goal(UNDERLAY_MTU + 1),
               f"largest IP packet on the underlay; goal <= {UNDERLAY_MTU}; IPv4 underlay: "
               f"wg MTU {wg_mtu} + {OVERHEAD_V4} = {wg_mtu + OVERHEAD_V4}"),
        Figure("D4.max_inner_bytes", (wg.max_ip_len,), "bytes", Goal(wg_mtu + 1),
               f"largest IP packet on the WireGuard device; goal <= wg MTU {wg_mtu}; "
               f"MSS equivalent {wg.max_ip_len - 40} (wg MTU - 40 = {wg_mtu - 40}), "
               f"largest TCP payload {wg.max_tcp_payload} (+ "
               f"{wg.max_ip_len - 40 - wg.max_tcp_payload} bytes of TCP options)"),
        Figure("D4.ping_full_size", (full,), "replies", Goal(PINGS - 1, below=False),
               f"ping -M do -s {wg_mtu - 28} (a {wg_mtu}-byte packet) a -> b, {PINGS} sent"),
    ]
    extra = {"syn_mss_advertised_by": wl.syn_mss,
             "icmp_frag_needed_to_workload": len(wl.frag_needed_mtu),
             "icmp_frag_needed_mtu": sorted(set(wl.frag_needed_mtu)),
             f"ping_{wg_mtu + 1}_bytes_replies": over, "ping_oversize_said": over_said,
             "tcp_during_capture": {k: round(v, 3) for k, v in tcp.items()},
             "underlay_packets": ul.packets, "tunnel_packets": wg.packets,
             "gso_max_segs_1_on": ["na:ul", "nb:ul", f"na:{pair.wg[0]}"]}
    return figures, extra


# --- the run ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Comparison:
    """`subject` against `baseline`, one ratio per round and measure. The control (A/A:
    two identical plain labs) shows the noise floor of a ratio on this machine."""

    fig: str
    subject: Pair
    baseline: Pair
    names: tuple[str, str]
    what: str
    control: bool = False
    goal: float | None = 0.95  # None: informative, no goal
    label: str = ""  # between the figure and the measure: D3.selected_tcp1

    def figure_id(self, measure: str) -> str:
        name = "udp_pps" if measure == "udp" else measure
        return (f"{self.fig}.control_{name}" if self.control
                else f"{self.fig}.{self.label}{name}")


def run_rounds(comparisons: tuple[Comparison, ...], args: argparse.Namespace,
               values: dict[tuple[str, str, str], list[float]],
               detail: list[dict[str, object]]) -> None:
    """Per round and measure, each comparison's two labs back to back: subject first in
    even rounds, baseline first in odd ones."""
    for r in range(args.rounds):
        for measure in MEASURES:
            secs = args.udp_seconds if measure == "udp" else args.seconds
            for c in comparisons:
                order = ((c.subject, c.names[0]), (c.baseline, c.names[1]))
                got = {}
                for pair, side in order if r % 2 == 0 else order[::-1]:
                    res = pair.iperf3(measure, secs)
                    got[side] = res["value"]
                    values.setdefault((c.figure_id(measure), measure, side), []).append(
                        res["value"])
                    detail.append({"round": r + 1, "figure": c.figure_id(measure),
                                   "config": side, **res})
                ratio = got[c.names[0]] / got[c.names[1]]
                values.setdefault((c.figure_id(measure), measure, "ratio"), []).append(ratio)
                print(f"round {r + 1} {c.figure_id(measure)}: "
                      + " ".join(f"{k} {v:.3f}" for k, v in got.items())
                      + f" ratio {ratio:.3f}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    prefix = run_prefix("tfd")
    t1, r1, t2, p2, t3, t4, c2, t0, r0, a2, k2, f1, f2 = (
        Pair(tag, prefix) for tag in ("t1", "r1", "t2", "p2", "t3", "t4", "c2", "t0", "r0",
                                      "a2", "k2", "f1", "f2"))
    debian = args.debian and shutil.which(DEBIAN_WIREGUARD_GO) is not None
    ablated = (a2, k2) if args.ablate else ()
    pairs = (t1, r1, t2, p2, t3, t4, f1, f2, *((c2,) if args.control else ()),
             *((t0, r0) if debian else ()), *ablated)
    comparisons = (
        Comparison("D1", t1, r1, ("tfcrypt", "raw"),
                   "selected flow, tfcrypt's tunnel vs wireguard-go by hand"),
        *((Comparison("D1", t0, r0, ("tfcrypt", "raw"),
                      "selected flow on Debian's 2022 wireguard-go, tfcrypt's tunnel vs "
                      "the same wireguard-go by hand", goal=None, label="debian_"),)
          if debian else ()),
        Comparison("D2", t2, p2, ("tfcrypt", "plain"),
                   f"unselected flow, tfcrypt with {args.elements} set elements vs no tfcrypt"),
        Comparison("D1", f1, r1, ("noflows", "raw"),
                   "selected flow, tfcrypt without flow accounting (flows: false) vs "
                   "wireguard-go by hand: what the flow records cost the selected path",
                   goal=None, label="noflows_"),
        Comparison("D2", f2, p2, ("noflows", "plain"),
                   f"unselected flow, tfcrypt with {args.elements} set elements and no flow "
                   "accounting vs no tfcrypt: what the flow records cost", goal=None,
                   label="noflows_"),
        Comparison("D3", t3, t1, (f"nft{args.elements}", "nft1"),
                   f"selected flow, {args.elements} more addresses in its set and allowed "
                   "IPs vs none", goal=0.97, label="selected_"),
        *((Comparison("D2", c2, p2, ("plain2", "plain"),
                      "control: two identical plain labs (the noise floor)", True),)
          if args.control else ()),
        *((Comparison("D2", a2, p2, ("norules", "plain"),
                      "ablation: D2's tfcrypt lab without its ip rules vs no tfcrypt",
                      goal=None, label="ablate_norules_"),
           Comparison("D2", k2, p2, ("ctcache", "plain"),
                      "ablation: D2's tfcrypt lab with a conntrack verdict cache "
                      "prototype vs no tfcrypt", goal=None, label="ablate_ctcache_"))
          if args.ablate else ()))
    values: dict[tuple[str, str, str], list[float]] = {}
    detail: list[dict[str, object]] = []
    setup: dict[str, object] = {}
    tfcrypt_nodes: list[TfcryptNode] = []
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    hands = [HandWireGuard(r1, tmp), *((HandWireGuard(r0, tmp, DEBIAN_WIREGUARD_GO),)
                                       if debian else ())]
    conds = conditions(elements=args.elements, rounds=args.rounds, seconds=args.seconds,
                       udp_seconds=args.udp_seconds, udp_len=UDP_LEN,
                       underlay_mtu=UNDERLAY_MTU, wg_mtu=DEFAULT_MTU, control=args.control,
                       debian_build=debian if args.debian else "left out (--no-debian)")
    if args.debian and not debian:
        conds["debian_build"] = f"left out: no {DEBIAN_WIREGUARD_GO} on PATH"
        print(f"D1.debian_*: no {DEBIAN_WIREGUARD_GO} on PATH, left out", file=sys.stderr)
    loop = asyncio.new_event_loop()
    started = time.monotonic()
    try:
        with namespaces(*(ns for p in pairs for ns in p.namespaces())):
            try:
                for p in pairs:
                    p.wire()
                    p.start_server()
                t = time.perf_counter()
                setup["t1"] = loop.run_until_complete(
                    start_tfcrypt(t1, True, 0, tfcrypt_nodes))
                setup["t2"] = loop.run_until_complete(
                    start_tfcrypt(t2, False, args.elements, tfcrypt_nodes))
                setup["t3"] = loop.run_until_complete(
                    start_tfcrypt(t3, True, args.elements, tfcrypt_nodes))
                setup["t4"] = loop.run_until_complete(
                    start_tfcrypt(t4, True, 0, tfcrypt_nodes))
                setup["f1"] = loop.run_until_complete(
                    start_tfcrypt(f1, True, 0, tfcrypt_nodes, flows=False))
                setup["f2"] = loop.run_until_complete(
                    start_tfcrypt(f2, False, args.elements, tfcrypt_nodes, flows=False))
                if debian:
                    setup["t0"] = loop.run_until_complete(
                        start_tfcrypt(t0, True, 0, tfcrypt_nodes, DEBIAN_WIREGUARD_GO))
                for p in ablated:
                    setup[p.tag] = loop.run_until_complete(
                        start_tfcrypt(p, False, args.elements, tfcrypt_nodes))
                if args.ablate:
                    ablate_rules(a2)
                    ablate_ct_cache(k2)
                for hand in hands:
                    hand.start()
                setup["total_s"] = round(time.perf_counter() - t, 2)
                print(f"setup: {setup}", file=sys.stderr)
                d4, d4_extra = measure_mtu(t4, tmp, args.d4_seconds)
                for p in pairs:
                    if p is not t4:
                        p.iperf3("tcp1", 1)
                run_rounds(comparisons, args, values, detail)
                tunnels = (t0, t1, r0, r1, t2, t3, t4, f1, f2, *ablated)
                counters = {p.tag: lab_counters(p, p in tunnels,
                                                p in (t0, t1, t2, t3, t4, f1, f2, *ablated))
                            for p in pairs}
                if args.ablate:
                    counters["k2_cache_hits"] = ct_cache_hits(k2)
            finally:
                for hand in hands:
                    hand.stop()
                for p in pairs:
                    p.stop_server()
                for node in reversed(tfcrypt_nodes):
                    try:
                        loop.run_until_complete(node.close())
                    except Exception as e:  # keep closing the others
                        print(f"closing {node.netns}: {e}", file=sys.stderr)
    finally:
        loop.close()
        shutil.rmtree(tmp, ignore_errors=True)
    conds["elapsed_s"] = round(time.monotonic() - started)
    conds["loadavg_at_end"] = os.getloadavg()[0]
    figures = figures_of(values, comparisons) + d4
    path = write_results("dataplane", figures, conds, setup=setup, d4=d4_extra,
                         counters=counters, runs=detail)
    print(markdown_table(figures))
    print(f"\nD4: {d4_extra}\ncounters: {counters}\nconditions: {conds}\nresults: {path}")
    return 0


UNITS = {"tcp1": ("gbps", "Gbit/s"), "tcp4": ("gbps", "Gbit/s"), "udp": ("kpps", "kpackets/s")}
MEANING = {"tcp1": "iperf3 TCP, 1 stream", "tcp4": "iperf3 TCP, -P 4",
           "udp": f"iperf3 UDP -b 0 -l {UDP_LEN}, packets/s received (server side)"}


def figures_of(values: dict[tuple[str, str, str], list[float]],
               comparisons: tuple[Comparison, ...]) -> list[Figure]:
    """Ratios (goal >= 0.95, judged > 0.95; none for the control), then the absolute
    medians of D1 and D2 (`D1.tcp1_gbps_tfcrypt`, ...)."""
    figures = []
    for c in comparisons:
        for m in MEASURES:
            figures.append(Figure(c.figure_id(m), tuple(values[(c.figure_id(m), m, "ratio")]),
                                  "x", None if c.control or c.goal is None
                                  else Goal(c.goal, below=False),
                                  f"{c.what}; {MEANING[m]}; {c.names[0]}/{c.names[1]}, "
                                  "same round"))
    for c in comparisons:
        if c.control:
            continue
        for m in MEASURES:
            short, unit = UNITS[m]
            for side in c.names:
                figures.append(Figure(f"{c.fig}.{c.label}{m}_{short}_{side}",
                                      tuple(values[(c.figure_id(m), m, side)]), unit, None,
                                      MEANING[m]))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dataplane")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round of 1 s tests")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (quick: 1)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="per TCP run, default 5 (quick: 1)")
    parser.add_argument("--udp-seconds", type=float, default=None,
                        help="per UDP run, default 3 (quick: 1)")
    parser.add_argument("--elements", type=int, default=100_000,
                        help="selected remote addresses in the D2 tfcrypt lab")
    parser.add_argument("--control", action="store_true",
                        help="add an A/A control (two identical plain labs): D2.control_*")
    parser.add_argument("--no-debian", dest="debian", action="store_false",
                        help="leave out D1.debian_* (D1 on Debian's 2022 wireguard-go, "
                             "side by side with the current build)")
    parser.add_argument("--no-ablate", dest="ablate", action="store_false",
                        help="leave out D2.ablate_* (D2's lab without tfcrypt's ip rules, "
                             "and with a conntrack verdict cache prototype)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 5)
    args.seconds = args.seconds or (1 if quick else 5)
    args.udp_seconds = args.udp_seconds or (1 if quick else 3)
    args.d4_seconds = 1 if quick else 2
    if os.geteuid() != 0:
        parser.error("needs root (network namespaces)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
