"""Agent configuration: one frozen value, resolved from four layers and validated once.

Rules:
- Precedence, highest first: command-line flags, `TFCRYPT_*` environment variables, the
  YAML file given by `--config` (or `TFCRYPT_CONFIG`), the defaults of `AgentConfig`.
  A layer that does not mention a key leaves it to the layers below.
- Every key is described once in `KEYS`: its file name (`listen_port`), its flag
  (`--listen-port`) and its environment variable (`TFCRYPT_LISTEN_PORT`) derive from it.
- Every value is validated before the agent touches the kernel or etcd; an error names
  where the value came from and the key: `tfcrypt.yaml: listen_port: 70000 is not in
  1..65535`, `TFCRYPT_LISTEN_PORT: ...`, `--listen-port: ...`.
- Unknown keys in the file are refused (a typo must not silently fall back to a
  default). Unknown `TFCRYPT_*` variables are only reported by `unknown_env()`: the
  environment is shared with the controller commands and other tools.
- Defaults work in the lab with flags only (no file needed).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tfcrypt import safeyaml
from tfcrypt.config_values import (
    absolute_problem,
    as_bool,
    as_float,
    as_int,
    as_list,
    as_str,
    cidrs_problem,
    cross_problem,
    dns_name_problem,
    endpoints_problem,
    etcd_tls_problem,
    host_port_problem,
    ifname_problem,
    in_range,
    ip_problem,
    mask_problem,
    node_name_problem,
    one_of,
    optional,
    prefix_problem,
    program_problem,
    runnable_problem,
    single_bit_problem,
    socket_path_problem,
    spiffe_ids_problem,
    state_dir_problem,
    table_problem,
    template_problem,
)
from tfcrypt.errors import ConfigError
from tfcrypt.marks import DEFAULT_MARK, clash_problem, foreign_clashes

ENV_PREFIX = "TFCRYPT_"

DEFAULT_ETCD = ("http://127.0.0.1:2379",)
DEFAULT_SPIFFE_SOCKET = "/run/spire/sockets/agent.sock"
DEFAULT_STATUS_SOCKET = "/run/tfcrypt/agent.sock"
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AgentConfig:
    node_name: str
    advertise_address: str
    etcd_endpoints: tuple[str, ...] = DEFAULT_ETCD
    etcd_tls: bool = False
    etcd_server_name: str | None = None
    spiffe_socket: str = DEFAULT_SPIFFE_SOCKET
    interface: str = "tfcrypt0"
    listen_port: int = 51820
    backend: str = "userspace"
    state_dir: str = "/var/lib/tfcrypt"
    prefix: str = "/tfcrypt/v1"
    mark: int = DEFAULT_MARK
    mark_mask: int = DEFAULT_MARK
    allow_foreign_mark_bits: bool = False
    route_table: int = 29798
    rule_priority: int = 1820
    lease_ttl: int = 15
    resync_interval: float = 10.0
    mtu: int | None = None
    persistent_keepalive: int = 25
    workload_grace: float = 30.0
    node_id_template: str = "spiffe://{trust_domain}/tfcrypt/node/{node}"
    controller_ids: tuple[str, ...] = ("spiffe://{trust_domain}/tfcrypt/controller",)
    status_socket: str = DEFAULT_STATUS_SOCKET
    metrics_address: str | None = None
    etcd_grace: float = 60.0
    log_format: str = "text"
    log_level: str = "info"
    wireguard_log: str | None = None
    wireguard_go: str = "wireguard-go"
    infrastructure_cidrs: tuple[str, ...] = ()
    flows: bool = True
    flows_interval: float = 10.0
    flows_publish_interval: float = 30.0
    flows_max_records: int = 20000
    flows_retention: float = 3600.0
    flows_set_size: int = 65536

    def __post_init__(self) -> None:
        for f in fields(self):
            key = KEYS_BY_FIELD[f.name]
            if (problem := key.problem(getattr(self, f.name))) is not None:
                raise ConfigError(f"{key.name}: {problem}")
        if (problem := cross_problem(self.mark, self.mark_mask)) is not None:
            raise ConfigError(f"mark_mask: {problem}")
        if (problem := etcd_tls_problem(self.etcd_endpoints, self.etcd_tls,
                                        self.etcd_server_name)) is not None:
            raise ConfigError(problem)

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


@dataclass(frozen=True)
class Key:
    """One configuration key: how it is spelled in each layer, parsed and checked."""

    name: str
    field: str
    parse: Callable[[object], Any]
    check: Callable[[Any], str | None] | None
    help: str
    flag: str = ""

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None
        return self.check(value) if self.check is not None else None


KEYS: tuple[Key, ...] = (
    Key("node_name", "node_name", as_str, node_name_problem, "this node's name",
        "--node"),
    Key("advertise_address", "advertise_address", as_str, ip_problem,
        "underlay address peers reach this node at"),
    Key("etcd", "etcd_endpoints", as_list, endpoints_problem, "etcd endpoints, comma separated"),
    Key("etcd_tls", "etcd_tls", as_bool, None,
        "connect to etcd over mutual TLS: the SVID is the client certificate, its trust "
        "bundle verifies etcd's certificate; endpoints may then be https:// "
        "(docs/registry.md)"),
    Key("etcd_server_name", "etcd_server_name", optional(as_str), dns_name_problem,
        "name etcd's certificate must carry instead of the endpoint's host (a DNS SAN "
        "of etcd's SPIRE entry when endpoints are IPs); with etcd_tls only"),
    Key("spiffe_socket", "spiffe_socket", as_str, socket_path_problem,
        "SPIFFE Workload API socket"),
    Key("interface", "interface", as_str, ifname_problem, "WireGuard interface name"),
    Key("listen_port", "listen_port", as_int, in_range(1, 65535), "WireGuard UDP port"),
    Key("backend", "backend", as_str, one_of("userspace", "kernel"),
        "userspace (wireguard-go) or kernel"),
    Key("state_dir", "state_dir", as_str, state_dir_problem,
        "where the private key (0600), its epoch and status.json live"),
    Key("prefix", "prefix", as_str, prefix_problem, "etcd key prefix"),
    Key("mark", "mark", as_int, single_bit_problem,
        "fwmark bit for selected packets; bits kube-proxy, Calico or Cilium document as "
        "theirs are refused (docs/operations.md)"),
    Key("mark_mask", "mark_mask", as_int, mask_problem,
        "mask of the mark bits tfcrypt owns (default: the mark); same refusal"),
    Key("allow_foreign_mark_bits", "allow_foreign_mark_bits", as_bool, None,
        "accept mark bits kube-proxy, Calico or Cilium use (when that tool is not on "
        "the node)"),
    Key("route_table", "route_table", as_int, table_problem,
        "tunnel route table; the next id holds the fail-closed prohibit routes"),
    Key("rule_priority", "rule_priority", as_int, in_range(1, 32764),
        "ip rule priority of the tunnel rule; the fail-closed rule takes the next one"),
    Key("lease_ttl", "lease_ttl", as_int, in_range(5, 3600),
        "seconds the node record outlives a dead agent"),
    Key("resync_interval", "resync_interval", as_float, in_range(0.5, 3600),
        "seconds between full reconciles"),
    Key("mtu", "mtu", optional(as_int), in_range(1280, 65535),
        "WireGuard MTU (default 1420: 1500 minus 80 bytes of overhead)"),
    Key("persistent_keepalive", "persistent_keepalive", as_int, in_range(0, 65535),
        "seconds between keepalives to each peer (0: off); a new peer is greeted at once"),
    Key("workload_grace", "workload_grace", as_float, in_range(0, 3600),
        "seconds a deleted workload's addresses stay selected (a terminating pod may still "
        "send), unless reused; 0: off"),
    Key("node_id_template", "node_id_template", as_str, template_problem,
        "SPIFFE ID of a node; {trust_domain} and {node} are filled in"),
    Key("controller_ids", "controller_ids", as_list, spiffe_ids_problem,
        "SPIFFE IDs allowed to write workloads and policies", "--controller-id"),
    Key("status_socket", "status_socket", as_str, socket_path_problem,
        "Unix socket of the local status API"),
    Key("metrics_address", "metrics_address", optional(as_str), host_port_problem,
        "IP:PORT to serve Prometheus metrics on (default: off)"),
    Key("etcd_grace", "etcd_grace", as_float, in_range(0, 86400),
        "seconds etcd may be unreachable before the agent reports itself unhealthy"),
    Key("log_format", "log_format", as_str, one_of(*LOG_FORMATS), "text or json"),
    Key("log_level", "log_level", as_str, one_of(*LOG_LEVELS), "debug, info, warning, error"),
    Key("wireguard_log", "wireguard_log", optional(as_str), absolute_problem,
        "file for wireguard-go's output (default: in the state dir)"),
    Key("wireguard_go", "wireguard_go", as_str, program_problem,
        "the wireguard-go program the userspace backend starts: a name looked up on PATH "
        "or an absolute path, e.g. a current build (docs/wireguard.md \"Which "
        "wireguard-go\"); checked when the backend is userspace"),
    Key("infrastructure_cidrs", "infrastructure_cidrs", as_list, cidrs_problem,
        "addresses or CIDRs no workload may claim for selection and that are never "
        "classified (API server, SPIRE, the underlay subnet); every node's address, this "
        "node's and the etcd endpoints' are added automatically (docs/policy.md)",
        "--infrastructure-cidr"),
    Key("flows", "flows", as_bool, None,
        "count every forwarded flow in the kernel and keep flow records (docs/flows.md); "
        "off: no forward chain and no flow sets"),
    Key("flows_interval", "flows_interval", as_float, in_range(1, 60),
        "seconds between reads of the kernel's flow counters (less than the kernel's "
        "120 s element timeout)"),
    Key("flows_publish_interval", "flows_publish_interval", as_float, in_range(5, 3600),
        "seconds between the signed flow reports this node puts in etcd and the flow "
        "records it saves in the state dir"),
    Key("flows_max_records", "flows_max_records", as_int, in_range(100, 1_000_000),
        "flow records kept; beyond it the oldest are folded into per-verdict totals"),
    Key("flows_retention", "flows_retention", as_float, in_range(60, 7 * 86400),
        "seconds a flow record is kept after it was last seen"),
    Key("flows_set_size", "flows_set_size", as_int, in_range(1024, 1 << 20),
        "flows each kernel flow set holds; a full set stops counting new flows until old "
        "ones time out (reported in status)"),
)
KEYS_BY_NAME = {k.name: k for k in KEYS}
KEYS_BY_FIELD = {k.field: k for k in KEYS}
ENV_ONLY = frozenset({"CONFIG"})


def read_config_file(path: str | Path) -> dict[str, object]:
    """The YAML mapping in `path`; unknown keys and non-mappings are ConfigError.

    Read by tfcrypt.safeyaml: bounded size, UTF-8, no duplicate keys, anchors or aliases."""
    data = safeyaml.load_file(path, noun="config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config file must be a mapping of key: value")
    for key in data:
        if key not in KEYS_BY_NAME:
            shown = key if isinstance(key, str) and len(key) <= safeyaml.MAX_EXCERPT \
                else safeyaml.excerpt(key)
            close = difflib.get_close_matches(str(shown), KEYS_BY_NAME, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{path}: {shown}: unknown key{hint}")
    return data


def unknown_env(env: Mapping[str, str]) -> list[str]:
    """`TFCRYPT_*` variables that are not configuration keys (worth a warning)."""
    known = {k.env for k in KEYS} | {ENV_PREFIX + n for n in ENV_ONLY}
    return sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known)


def resolve(flags: Mapping[str, object], env: Mapping[str, str],
            file: str | Path | None, names: Sequence[str] | None = None) -> dict[str, Any]:
    """Validated values of `names` (default all keys) by field name; absent keys omitted.

    `flags` maps key names to the values typed on the command line (None = not given).
    """
    data = read_config_file(file) if file else {}
    out: dict[str, Any] = {}
    for key in KEYS if names is None else [KEYS_BY_NAME[n] for n in names]:
        if flags.get(key.name) is not None:
            raw, origin = flags[key.name], key.option
        elif key.env in env:
            raw, origin = env[key.env], key.env
        elif key.name in data:
            raw, origin = data[key.name], f"{file}: {key.name}"
        else:
            continue
        try:
            value = key.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{origin}: {exc}") from None
        if (problem := key.problem(value)) is not None:
            raise ConfigError(f"{origin}: {problem}")
        out[key.field] = value
        out.setdefault("_origin", {})[key.field] = origin
    return out


def agent_config(flags: Mapping[str, object], env: Mapping[str, str] | None = None,
                 file: str | Path | None = None) -> AgentConfig:
    """The agent's configuration from flags, environment and file, or ConfigError."""
    env = os.environ if env is None else env
    values = resolve(flags, env, file)
    origin: dict[str, str] = values.pop("_origin", {})
    if "advertise_address" not in values:
        raise ConfigError("advertise_address: required (the underlay IP peers use); set "
                          "--advertise-address, TFCRYPT_ADVERTISE_ADDRESS or "
                          "advertise_address in the config file")
    values.setdefault("node_name", default_node_name())
    if "mark_mask" not in values and "mark" in values:
        values["mark_mask"] = values["mark"]
    mark = values.get("mark", AgentConfig.mark)
    mask = values.get("mark_mask", AgentConfig.mark_mask)
    if (problem := cross_problem(mark, mask)) is not None:
        raise ConfigError(f"{origin.get('mark_mask', 'mark_mask')}: {problem}")
    if not values.get("allow_foreign_mark_bits") and (
            problem := clash_problem(mark, mask)) is not None:
        key = "mark" if foreign_clashes(mark) else "mark_mask"
        raise ConfigError(f"{origin.get(key, origin.get('mark', key))}: {problem}")
    if values.get("backend", AgentConfig.backend) == "userspace" and (
            problem := runnable_problem(values.get("wireguard_go",
                                                   AgentConfig.wireguard_go))) is not None:
        raise ConfigError(f"{origin.get('wireguard_go', 'wireguard_go')}: {problem} (the "
                          "userspace backend runs it; set wireguard_go, docs/wireguard.md)")
    return AgentConfig(**values)


def env_default(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"{ENV_PREFIX}{name}", default)


def default_node_name() -> str:
    return socket.gethostname().split(".")[0].lower()
