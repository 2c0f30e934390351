"""Names and addresses of every lab object, computed from (name, sizes) alone.

Rules: this module is pure (no I/O); everything a lab creates is named here, with the lab
name as prefix, so `down`, `status` and other tools agree without asking the kernel.
Underlay 10.77.0.0/24: etcd member k -> .(1+k), controller -> .9, node i -> .(10+i).
Node i owns workload subnet 10.200.i.0/24; its workload j gets 10.200.i.(10+j)/32.
IPv6 (`ipv6=True`, off by default): ULA beside IPv4. Underlay fd00:77::/64 with the same
last numbers (etcd k -> fd00:77::(1+k), controller ::9, node i ::(10+i), written as hex
digits: node 1 is fd00:77::11); node i owns fd00:200:i::/64, its workload j gets
fd00:200:i::(10+j)/128. `underlay="v6"` (implies ipv6) makes the underlay IPv6-only:
no IPv4 address on it at all, so etcd, the controller and WireGuard endpoints are IPv6
and the workloads' IPv4 subnets are routed via the nodes' IPv6 addresses (RFC 5549).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from tfcrypt.config import DEFAULT_SPIFFE_SOCKET, DEFAULT_STATUS_SOCKET, AgentConfig

from .errors import LabError

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
RUN_ROOT = Path("/run/netns_lab")
TRUST_DOMAIN = "lab.tfcrypt"
UNDERLAY_CIDR = "10.77.0.0/24"
# where a real node's tfcrypt looks by default (tfcrypt/config.py); each lab node's mount
# namespace binds its own directories there (docs/lab.md, "A node's default paths")
NODE_STATE_DIR = Path(AgentConfig.state_dir)
NODE_STATUS_SOCKET = Path(DEFAULT_STATUS_SOCKET)
NODE_SPIFFE_SOCKET = Path(DEFAULT_SPIFFE_SOCKET)
UNDERLAY_PREFIXLEN = 24
UNDERLAY_CIDR6 = "fd00:77::/64"
UNDERLAY_PREFIXLEN6 = 64
UNDERLAYS = ("v4", "v6")
BRIDGE = "br0"
WORKLOAD_GATEWAY = "169.254.1.1"
WORKLOAD_GATEWAY6 = "fe80::1"  # link-local on every node-side workload veth (nodad)
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
MAX_NODES = 50
MAX_WORKLOADS = 50
ETCD_SIZES = (1, 3)


def _url_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise LabError(
            f"invalid lab name {name!r}: use 1-8 chars matching ^[a-z][a-z0-9]{{0,7}}$"
        )
    return name


@dataclass(frozen=True)
class Member:
    """An etcd member: its own namespace on the underlay (https URLs with etcd_tls)."""

    name: str
    netns: str
    underlay_ip: str  # IPv6 on an IPv6-only underlay
    data_dir: Path
    underlay_ip6: str | None = None
    tls: bool = False

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_url_host(self.underlay_ip)}:{ETCD_CLIENT_PORT}"

    @property
    def peer_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_url_host(self.underlay_ip)}:{ETCD_PEER_PORT}"


@dataclass(frozen=True)
class Node:
    """A node: a network namespace plus a persistent mount namespace."""

    index: int
    name: str
    netns: str
    underlay_ip: str
    workload_subnet: str
    mount_ns: Path
    wireguard_dir: Path
    spiffe_socket: Path
    spiffe_id: str
    state_dir: Path  # the agent's state dir, seen as /var/lib/tfcrypt inside the node
    status_socket: Path  # the agent's status API socket, /run/tfcrypt/agent.sock inside
    # `underlay_ip` is what peers send WireGuard to (the agent's advertise address): the
    # IPv6 one on an IPv6-only underlay. `underlay_ip6` is set whenever the lab has IPv6.
    underlay_ip6: str | None = None
    workload_subnet6: str | None = None

    def default_path_binds(self) -> list[tuple[Path, Path]]:
        """(host directory, where the node sees it): tfcrypt's default paths."""
        return [(self.state_dir, NODE_STATE_DIR),
                (self.status_socket.parent, NODE_STATUS_SOCKET.parent),
                (self.spiffe_socket.parent, NODE_SPIFFE_SOCKET.parent)]

    def exec_prefix(self) -> list[str]:
        """argv prefix that runs a command inside this node (net + mount namespace)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", f"--mount={self.mount_ns}", "--"]


@dataclass(frozen=True)
class Workload:
    """A workload: a namespace behind a veth routed by its node (Calico style)."""

    name: str
    netns: str
    ip: str
    node: str
    node_if: str
    ip6: str | None = None

    @property
    def ips(self) -> list[str]:
        """Every address of the workload, IPv4 first (what its record publishes)."""
        return [self.ip, *([self.ip6] if self.ip6 else [])]


@dataclass(frozen=True)
class Layout:
    """The whole lab as names and addresses."""

    name: str
    nodes: int
    workloads_per_node: int
    etcd_members: int = 1
    ipv6: bool = False
    underlay: str = "v4"
    etcd_tls: bool = False  # members serve mutual TLS (netns_lab/etcd_tls.py)
    kubernetes: bool = False  # its own etcd + kube-apiserver (netns_lab/kube.py)

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.underlay not in UNDERLAYS:
            raise LabError(f"--underlay must be v4 or v6, got {self.underlay!r}")
        if self.underlay == "v6" and not self.ipv6:
            object.__setattr__(self, "ipv6", True)  # an IPv6 underlay needs IPv6 in nodes
        if not 1 <= self.nodes <= MAX_NODES:
            raise LabError(f"--nodes must be 1..{MAX_NODES}, got {self.nodes}")
        if not 0 <= self.workloads_per_node <= MAX_WORKLOADS:
            raise LabError(
                f"--workloads-per-node must be 0..{MAX_WORKLOADS}, got {self.workloads_per_node}"
            )
        if self.etcd_members not in ETCD_SIZES:
            raise LabError(f"--etcd-members must be 1 or 3, got {self.etcd_members}")

    @property
    def run_dir(self) -> Path:
        return RUN_ROOT / self.name

    @property
    def underlay_netns(self) -> str:
        return f"{self.name}-ul"

    @property
    def controller_netns(self) -> str:
        return f"{self.name}-ctl"

    @property
    def v6_underlay(self) -> bool:
        return self.underlay == "v6"

    def _underlay(self, last: int) -> tuple[str, str | None]:
        """(primary address, IPv6 address or None) of underlay host number `last`."""
        v6 = f"fd00:77::{last}" if self.ipv6 else None
        return (v6 if self.v6_underlay and v6 else f"10.77.0.{last}"), v6

    @property
    def controller_ip(self) -> str:
        return self._underlay(9)[0]

    @property
    def controller_ip6(self) -> str | None:
        return self._underlay(9)[1]

    @property
    def underlay_cidr(self) -> str:
        return UNDERLAY_CIDR6 if self.v6_underlay else UNDERLAY_CIDR

    controller_spiffe_id = f"spiffe://{TRUST_DOMAIN}/tfcrypt/controller"

    @property
    def controller_socket(self) -> Path:
        return self.run_dir / "spiffe" / "controller.sock"

    @property
    def spire_dir(self) -> Path:
        return self.run_dir / "spire"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    def node(self, i: int) -> Node:
        name = f"n{i}"
        primary, v6 = self._underlay(10 + i)
        return Node(
            index=i,
            name=name,
            netns=f"{self.name}-{name}",
            underlay_ip=primary,
            underlay_ip6=v6,
            workload_subnet=f"10.200.{i}.0/24",
            workload_subnet6=f"fd00:200:{i}::/64" if self.ipv6 else None,
            mount_ns=self.run_dir / "mnt" / name,
            wireguard_dir=self.run_dir / name / "wireguard",
            spiffe_socket=self.run_dir / name / "spire-sockets" / NODE_SPIFFE_SOCKET.name,
            spiffe_id=f"spiffe://{TRUST_DOMAIN}/tfcrypt/node/{name}",
            state_dir=self.run_dir / name / "agent",
            status_socket=self.run_dir / name / "run-tfcrypt" / NODE_STATUS_SOCKET.name,
        )

    def all_nodes(self) -> list[Node]:
        return [self.node(i) for i in range(1, self.nodes + 1)]

    def workloads_of(self, node: Node) -> list[Workload]:
        return [
            Workload(
                name=f"{node.name}-w{j}",
                netns=f"{self.name}-{node.name}-w{j}",
                ip=f"10.200.{node.index}.{10 + j}",
                ip6=f"fd00:200:{node.index}::{10 + j}" if self.ipv6 else None,
                node=node.name,
                node_if=f"w{j}",
            )
            for j in range(1, self.workloads_per_node + 1)
        ]

    def all_workloads(self) -> list[Workload]:
        return [w for n in self.all_nodes() for w in self.workloads_of(n)]

    def member(self, k: int) -> Member:
        return Member(
            name=f"e{k}",
            netns=f"{self.name}-e{k}",
            underlay_ip=self._underlay(1 + k)[0],
            underlay_ip6=self._underlay(1 + k)[1],
            data_dir=self.run_dir / "etcd" / f"e{k}",
            tls=self.etcd_tls,
        )

    def all_members(self) -> list[Member]:
        return [self.member(k) for k in range(1, self.etcd_members + 1)]

    def etcd_endpoints(self) -> list[str]:
        return [m.client_url for m in self.all_members()]

    def all_netns(self) -> list[str]:
        """Every namespace of the lab, in creation order."""
        return [
            self.underlay_netns,
            self.controller_netns,
            *(m.netns for m in self.all_members()),
            *(n.netns for n in self.all_nodes()),
            *(w.netns for w in self.all_workloads()),
        ]
