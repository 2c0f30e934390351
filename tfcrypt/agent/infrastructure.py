"""The agent's static infrastructure: what its configuration says no workload may claim.

Rules (the core's side: tfcrypt/core/infrastructure.py; docs/policy.md "Infrastructure
addresses"):
- Static entries are the operator's `infrastructure_cidrs` (reason "configured"), this
  node's advertise address ("node address") and the hosts of the etcd endpoints ("etcd
  endpoint"). The verified node records' addresses are added on every reconcile by
  CoreInput (tfcrypt/agent/snapshot.py).
- An etcd endpoint given by name is resolved once, at start (every address it resolves
  to is infrastructure); a name that does not resolve is logged and left out until the
  agent restarts. Literal IPs need no resolution.
"""

from __future__ import annotations

import ipaddress
import socket

from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.config import AgentConfig
from tfcrypt.core.infrastructure import Reason, canonical_prefix, etcd_hosts, merge


def resolve(host: str) -> list[str]:
    """A literal IP as itself, a name as every address it resolves to now ([] if none)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("etcd endpoint %s does not resolve (%s): not treated as infrastructure "
                    "until the agent restarts", host, exc)
        return []
    found = sorted({str(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
                    for info in infos})
    log.info("etcd endpoint %s resolved at start to %s (infrastructure)", host,
             ", ".join(found))
    return found


def static_infrastructure(cfg: AgentConfig) -> dict[str, str]:
    """Prefix -> reason of the configured CIDRs, this node's address and etcd's hosts."""
    configured = {canonical_prefix(c): Reason.CONFIGURED.value for c in cfg.infrastructure_cidrs}
    own = {canonical_prefix(cfg.advertise_address): Reason.NODE.value}
    etcd = {ip: Reason.ETCD.value for h in etcd_hosts(cfg.etcd_endpoints) for ip in resolve(h)}
    return merge(configured, own, etcd)
