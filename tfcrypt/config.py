"""Agent configuration: one frozen value, validated once at start.

Every field has a default that works in the lab; sources are, by precedence, command-line
flags, then `TFCRYPT_*` environment variables, then the defaults here. An invalid value
raises ConfigError naming the option, before the agent touches the kernel or etcd.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tfcrypt.errors import ConfigError

NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")

DEFAULT_ETCD = ("http://127.0.0.1:2379",)
DEFAULT_SPIFFE_SOCKET = "/run/spire/sockets/agent.sock"


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    advertise_address: str
    etcd_endpoints: tuple[str, ...] = DEFAULT_ETCD
    spiffe_socket: str = DEFAULT_SPIFFE_SOCKET
    interface: str = "tfcrypt0"
    listen_port: int = 51820
    backend: str = "userspace"
    state_dir: str = "/var/lib/tfcrypt"
    prefix: str = "/tfcrypt/v1"
    mark: int = 0x00100000
    mark_mask: int = 0x00100000
    route_table: int = 29798
    rule_priority: int = 1820
    lease_ttl: int = 15
    resync_interval: float = 10.0
    mtu: int | None = None
    node_id_template: str = "spiffe://{trust_domain}/tfcrypt/node/{node}"
    controller_ids: tuple[str, ...] = ("spiffe://{trust_domain}/tfcrypt/controller",)
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not NODE_NAME.match(self.node_name):
            raise ConfigError(f"--node: {self.node_name!r} is not a valid node name "
                              "(lowercase letters, digits, '-' and '.', at most 63)")
        try:
            ipaddress.ip_address(self.advertise_address)
        except ValueError:
            raise ConfigError(f"--advertise-address: {self.advertise_address!r} is not an "
                              "IP address") from None
        if not IFNAME.match(self.interface):
            raise ConfigError(f"--interface: {self.interface!r} is not a valid interface "
                              "name (1-15 characters)")
        if not 1 <= self.listen_port <= 65535:
            raise ConfigError(f"--listen-port: {self.listen_port} is not in 1..65535")
        if self.backend not in ("userspace", "kernel"):
            raise ConfigError(f"--backend: {self.backend!r} is not one of userspace, kernel")
        if not self.etcd_endpoints:
            raise ConfigError("--etcd: at least one endpoint is needed")
        if not 0 < self.mark <= 0xFFFFFFFF or self.mark & (self.mark - 1):
            raise ConfigError(f"--mark: {self.mark:#x} must be a single bit")
        if self.mark_mask & self.mark != self.mark or self.mark_mask > 0xFFFFFFFF:
            raise ConfigError(f"--mark-mask: {self.mark_mask:#x} must contain the mark "
                              f"{self.mark:#x}")
        if not 1 <= self.route_table < 0xFFFFFFFF or self.route_table in (252, 253, 254, 255):
            raise ConfigError(f"--route-table: {self.route_table} is reserved or out of range")
        if not 1 <= self.rule_priority <= 32764:
            raise ConfigError(f"--rule-priority: {self.rule_priority} is not in 1..32764")
        if self.lease_ttl < 5:
            raise ConfigError(f"--lease-ttl: {self.lease_ttl} is below the minimum of 5 s")
        if self.mtu is not None and not 1280 <= self.mtu <= 65535:
            raise ConfigError(f"--mtu: {self.mtu} is not in 1280..65535")
        if not self.prefix.startswith("/") or self.prefix.endswith("/"):
            raise ConfigError(f"--prefix: {self.prefix!r} must start and not end with '/'")

    @property
    def endpoint(self) -> str:
        ip = ipaddress.ip_address(self.advertise_address)
        host = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{host}:{self.listen_port}"

    def node_spiffe_id(self, trust_domain: str, node: str | None = None) -> str:
        return self.node_id_template.format(trust_domain=trust_domain,
                                            node=node or self.node_name)

    def controller_spiffe_ids(self, trust_domain: str) -> tuple[str, ...]:
        return tuple(c.format(trust_domain=trust_domain) for c in self.controller_ids)


def split_endpoints(value: str | Sequence[str]) -> tuple[str, ...]:
    """`--etcd a,b` and repeated `--etcd a --etcd b` both mean [a, b]."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"TFCRYPT_{name}", default)


def default_node_name() -> str:
    return env_default("NODE_NAME") or socket.gethostname().split(".")[0].lower()
