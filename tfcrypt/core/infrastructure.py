"""Infrastructure addresses: what no workload may claim for selection (issue #14 item 2).

Why: a workload record is the controller's word for which address belongs to which
workload, and the controller can be wrong. A host-network pod's record carries its
node's underlay address; a careless record may carry the etcd endpoint's. Selecting such
an address steers the nodes' own traffic (WireGuard's UDP, etcd, the API server) into a
tunnel that depends on that very traffic, or drops it as plaintext of a selected pair:
the nodes lock themselves out, and after the record is deleted they never hear of it.

Rules:
- Infrastructure is: every address of a verified node record (its endpoint's IP), the
  agent's own advertise address, the etcd endpoints, and the operator's configured CIDRs
  (the API server's, SPIRE's, the underlay subnet). `Snapshot.infrastructure` carries the
  static part (prefix -> reason); `infrastructure_of` adds the node records' addresses.
- A workload address inside an infrastructure prefix is *refused*: it is removed from
  the workload before selection, so it is in no selector set, no local class and no
  peer's allowed IPs; the workload's other addresses keep their meaning, and a workload
  left with none is left out. Each refused address is reported with the reason of the
  prefix holding it (`Desired.refused`).
- The dataplane holds the same prefixes in `infra_v4`/`infra_v6` and never classifies a
  packet to or from them (tfcrypt/dataplane/nft_rules.py): refusal here keeps the
  state truthful, the ruleset makes it hold whatever the sets say.
- Pure: no I/O, no clock. `Screen` keeps the agent's screening incremental: only the
  changed keys are looked at unless the infrastructure itself changed.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit

from tfcrypt.model.node import NodeRecord
from tfcrypt.model.workload import Workload


class Reason(enum.Enum):
    """Why a prefix is infrastructure (the `reason` label of tfcrypt_refused_addresses)."""

    NODE = "node address"
    ETCD = "etcd endpoint"
    CONFIGURED = "configured"


_PRIORITY = {Reason.NODE.value: 0, Reason.ETCD.value: 1, Reason.CONFIGURED.value: 2}
"""When one address is infrastructure for several reasons, the most specific one wins."""

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def canonical_prefix(text: str) -> str:
    """`text` (an address or a CIDR, host bits allowed) as a network; ValueError if none."""
    net = ipaddress.ip_network(text.strip(), strict=False)
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def etcd_hosts(endpoints: Iterable[str]) -> list[str]:
    """The host part of each etcd endpoint (`http(s)://host:port` or `host:port`)."""
    hosts = []
    for e in endpoints:
        parts = urlsplit(e if "//" in e else f"//{e}")
        if parts.hostname:
            hosts.append(parts.hostname)
    return hosts


def literal_etcd_hosts(endpoints: Iterable[str]) -> dict[str, str]:
    """The etcd endpoints given as IP literals, as infrastructure entries (names need a
    resolver: the agent resolves them at start, tfcrypt/agent/infrastructure.py)."""
    out = {}
    for host in etcd_hosts(endpoints):
        try:
            out[str(ipaddress.ip_address(host))] = Reason.ETCD.value
        except ValueError:
            continue
    return out


def endpoint_host(endpoint: str) -> str:
    """The IP of a normalised node endpoint (`a.b.c.d:port` or `[v6]:port`)."""
    host = endpoint.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") else host


@dataclass(frozen=True)
class Infrastructure:
    """Infrastructure prefixes with their reasons; `reason_for(ip)` answers in O(1) for
    hosts and O(number of wider prefixes) otherwise (a handful: configured CIDRs)."""

    entries: Mapping[str, str] = field(default_factory=dict)
    _hosts: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    _nets: tuple[tuple[Network, str], ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def of(cls, entries: Mapping[str, str]) -> Infrastructure:
        """From prefix -> reason (prefixes normalised here; ValueError for one that is not)."""
        hosts: dict[str, str] = {}
        nets: list[tuple[Network, str]] = []
        for prefix, reason in entries.items():
            net = ipaddress.ip_network(prefix, strict=False)
            if net.prefixlen == net.max_prefixlen:
                hosts[str(net.network_address)] = reason
            else:
                nets.append((net, reason))
        nets.sort(key=lambda n: (_PRIORITY.get(n[1], 9), n[0].version, n[0].network_address))
        normal = merge(hosts, {str(net): reason for net, reason in nets})
        return cls(dict(sorted(normal.items())), hosts, tuple(nets))

    @property
    def prefixes(self) -> frozenset[str]:
        return frozenset(self.entries)

    def reason_for(self, ip: str) -> str | None:
        """The reason `ip` (a normalised workload address) is infrastructure, or None.

        Wider prefixes are compared as integers (an IPv4 address parsed by hand: the
        `ipaddress` objects cost ~6 us each, 0.6 s over 100,000 workloads)."""
        found = self._hosts.get(ip)
        if found is not None or not self._nets:
            return found
        if ":" in ip:
            number, version = int(ipaddress.IPv6Address(ip)), 6
        else:
            a, b, c, d = ip.split(".")
            number, version = (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d), 4
        for first, last, v, reason in self._spans:
            if v == version and first <= number <= last:
                return reason
        return None

    @property
    def _spans(self) -> tuple[tuple[int, int, int, str], ...]:
        spans = self.__dict__.get("_spans_cache")
        if spans is None:
            spans = tuple((int(net.network_address), int(net.broadcast_address), net.version,
                           reason) for net, reason in self._nets)
            object.__setattr__(self, "_spans_cache", spans)
        return spans

    def __bool__(self) -> bool:
        return bool(self.entries)


def merge(*layers: Mapping[str, str]) -> dict[str, str]:
    """Prefix -> reason over several layers; the most specific reason wins a tie."""
    out: dict[str, str] = {}
    for layer in layers:
        for prefix, reason in layer.items():
            have = out.get(prefix)
            if have is None or _PRIORITY.get(reason, 9) < _PRIORITY.get(have, 9):
                out[prefix] = reason
    return out


def node_addresses(nodes: Iterable[NodeRecord]) -> dict[str, str]:
    """The verified node records' addresses, as infrastructure entries."""
    return {endpoint_host(rec.endpoint): Reason.NODE.value for rec in nodes}


def infrastructure_of(static: Mapping[str, str], nodes: Mapping[str, NodeRecord]
                      ) -> Infrastructure:
    """The static entries (configured, own, etcd) plus every node record's address."""
    return Infrastructure.of(merge(static, node_addresses(nodes.values())))


def screen_one(w: Workload, infra: Infrastructure) -> tuple[Workload | None, dict[str, str]]:
    """(the workload without its refused addresses, or None if none is left; refused
    address -> reason). The workload itself when nothing is refused."""
    refused = {}
    for ip in w.ips:
        reason = infra.reason_for(ip)
        if reason is not None:
            refused[ip] = reason
    if not refused:
        return w, refused
    kept = tuple(ip for ip in w.ips if ip not in refused)
    return (replace(w, ips=kept) if kept else None), refused


def screened(workloads: Mapping[str, Workload], infra: Infrastructure
             ) -> tuple[Mapping[str, Workload], dict[str, str]]:
    """One-shot screening (compute() over a plain mapping): (workloads, refused)."""
    if not infra:
        return workloads, {}
    out: dict[str, Workload] = {}
    refused: dict[str, str] = {}
    for key, w in workloads.items():
        kept, why = screen_one(w, infra)
        refused.update(why)
        if kept is not None:
            out[key] = kept
    return (workloads if not refused else out), dict(sorted(refused.items()))


class _Overlay(Mapping[str, Workload]):
    """`base` with some keys replaced (a screened workload) or hidden (None): no copy of
    the 100,000-entry base mapping."""

    def __init__(self, base: Mapping[str, Workload],
                 overrides: Mapping[str, Workload | None]) -> None:
        self._base = base
        self._over = overrides

    def __getitem__(self, key: str) -> Workload:
        if key in self._over:
            found = self._over[key]
            if found is None:
                raise KeyError(key)
            return found
        return self._base[key]

    def __iter__(self) -> Iterator[str]:
        over = self._over
        return (k for k in self._base if k not in over or over[k] is not None)

    def __len__(self) -> int:
        hidden = sum(1 for k, v in self._over.items() if v is None and k in self._base)
        return len(self._base) - hidden


class Screen:
    """The agent's screening, kept across reconciles.

    `update(workloads, infra, changed)` returns the screened mapping and the keys whose
    screened value may differ from last time (None: unknown, compare everything). Only
    the changed keys are screened again, unless `infra` differs from the last one (or
    `changed` is None): then every workload is.
    """

    def __init__(self) -> None:
        self.infra = Infrastructure()
        self._screened: dict[str, Workload | None] = {}
        self._why: dict[str, dict[str, str]] = {}

    def update(self, workloads: Mapping[str, Workload], infra: Infrastructure,
               changed: set[str] | None) -> tuple[Mapping[str, Workload], set[str] | None]:
        if changed is None or infra != self.infra:
            before = set(self._why)
            self._screened, self._why = {}, {}
            if infra:
                for key, w in workloads.items():
                    self._screen_key(key, w, infra)
            if changed is not None:
                changed = changed | before | set(self._why)
        else:
            for key in changed:
                self._screened.pop(key, None)
                self._why.pop(key, None)
                found = workloads.get(key)
                if found is not None and infra:
                    self._screen_key(key, found, infra)
        self.infra = infra
        return (_Overlay(workloads, dict(self._screened)) if self._screened else workloads,
                changed)

    def _screen_key(self, key: str, w: Workload, infra: Infrastructure) -> None:
        kept, why = screen_one(w, infra)
        if why:
            self._screened[key] = kept
            self._why[key] = why

    @property
    def refused(self) -> dict[str, str]:
        """Refused address -> reason, over every workload."""
        out: dict[str, str] = {}
        for why in self._why.values():
            out.update(why)
        return dict(sorted(out.items()))

    @property
    def refused_keys(self) -> list[str]:
        """The workload keys with a refused address."""
        return sorted(self._why)
