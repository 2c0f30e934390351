"""Who may write which etcd key.

Rules (DESIGN.md, "Identity and trust"):
- `nodes/<n>` only by node n's SPIFFE ID (template, default
  `spiffe://{trust_domain}/tfcrypt/node/{node}`): a node can publish its own WireGuard key
  and nobody else's.
- `flows/<n>` (the seen-traffic keyspace, tfcrypt/model/flow.py) likewise only by node n:
  a node reports its own flows and nobody else's.
- `workloads/...` and `policies/...` only by a controller ID (default
  `spiffe://{trust_domain}/tfcrypt/controller`).
- Every other key is unauthorised for everyone: a new kind of value needs a rule here
  before anyone is believed about it.
- Node names are DNS-label-ish; the rule lives here because it is part of what a key means,
  and the model reuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tfcrypt.errors import ConfigError, Rejected, RejectReason

NODE_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
DEFAULT_NODE_ID_TEMPLATE = "spiffe://{trust_domain}/tfcrypt/node/{node}"
DEFAULT_CONTROLLER_IDS = ("spiffe://{trust_domain}/tfcrypt/controller",)


def is_node_name(name: str) -> bool:
    return NODE_NAME_RE.fullmatch(name) is not None


@dataclass(frozen=True)
class Authorizer:
    """Maps a key to the SPIFFE IDs allowed to sign it; templates take {trust_domain}."""

    trust_domain: str
    node_id_template: str = DEFAULT_NODE_ID_TEMPLATE
    controller_ids: tuple[str, ...] = DEFAULT_CONTROLLER_IDS
    _controllers: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if "{node}" not in self.node_id_template:
            raise ConfigError("node_id_template: must contain {node}")
        try:
            self.node_id_template.format(trust_domain=self.trust_domain, node="n")
            controllers = frozenset(c.format(trust_domain=self.trust_domain)
                                    for c in self.controller_ids)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"identity templates: only {{trust_domain}} and {{node}} "
                              f"may be used ({e})") from None
        object.__setattr__(self, "_controllers", controllers)

    def node_id(self, node: str) -> str:
        """The SPIFFE ID that node `node` must present."""
        return self.node_id_template.format(trust_domain=self.trust_domain, node=node)

    def is_controller(self, spiffe_id: str) -> bool:
        return spiffe_id in self._controllers

    def check(self, spiffe_id: str, key: str) -> None:
        """Raise Rejected(UNAUTHORIZED) unless `spiffe_id` may write `key`."""
        kind, _, rest = key.partition("/")
        if kind in ("nodes", "flows"):
            if not is_node_name(rest):
                raise Rejected(RejectReason.UNAUTHORIZED, f"{key}: not a valid node key")
            if spiffe_id != self.node_id(rest):
                raise Rejected(RejectReason.UNAUTHORIZED,
                               f"{spiffe_id} may not write {key} (only {self.node_id(rest)})")
            return
        if kind in ("workloads", "policies"):
            if not rest or any(not part for part in rest.split("/")):
                raise Rejected(RejectReason.UNAUTHORIZED, f"{key}: not a valid {kind} key")
            if not self.is_controller(spiffe_id):
                raise Rejected(RejectReason.UNAUTHORIZED,
                               f"{spiffe_id} is not a controller and may not write {key}")
            return
        raise Rejected(RejectReason.UNAUTHORIZED, f"{key}: no writer is authorised for this key")
