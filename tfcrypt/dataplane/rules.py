"""The policy routing rule that sends traffic to tfcrypt's route table.

Rules of this module:
- Ownership is the reserved priority: in every managed family, exactly our rule sits at
  that priority and any other rule there is removed. Where the kernel reports rule
  protocols (Linux >= 4.17) our rules also carry our rtproto, and a rule with our proto
  at another priority (left by a run with another configuration) is removed as well.
- One rule shape for both issues: "from all lookup <table>" (no mark) or
  "from all fwmark <mark>/<mask> lookup <table>"; one path for IPv4 and IPv6.
- Make before break: a missing rule is added before a wrong one at our priority is
  deleted, so the priority is never empty during a change.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Iterable
from dataclasses import replace

from tfcrypt.dataplane.delta import DeltaTracker
from tfcrypt.dataplane.netlink import Family, KernelRule, Netlink, NetlinkError
from tfcrypt.dataplane.routes import DEFAULT_PROTO, DEFAULT_TABLE, ApplyReport, ItemError
from tfcrypt.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_PRIORITY = 1820
"""After the local table (0) and the CNI rules below 200 (Calico 99, Cilium 100), before
Tailscale (5210-5270), wg-quick (32764-32765) and main (32766)."""

_ALL_BITS = 0xFFFFFFFF
_GONE = (errno.ENOENT, errno.ESRCH)


class RuleManager:
    """Keeps exactly our rule at our priority in each managed family.

    Order: when adding, the routes of the table go in before this rule sends traffic to
    them; when removing, this rule goes first (`set_desired(False)` then `apply()`), then
    the routes.

    Several managers may share the proto (tfcrypt's tunnel and fail-closed rules): each is
    told its `siblings`' priorities so that neither sweeps the other's rule as a leftover.

    Pitfalls:
    - A fwmark without a mask is reported by the kernel with mask 0xffffffff; the desired
      rule is normalised the same way so a second apply sees no difference.
    - Rules may be duplicated by older kernels or by hand; duplicates of ours are deleted.
    - On kernels without rule protocols the reported proto is None; the priority alone
      then marks ownership.
    """

    def __init__(
        self,
        netlink: Netlink,
        priority: int = DEFAULT_PRIORITY,
        table: int = DEFAULT_TABLE,
        fwmark: int | None = None,
        mask: int | None = None,
        families: Iterable[Family] = (Family.V4, Family.V6),
        proto: int = DEFAULT_PROTO,
        siblings: Iterable[int] = (),
    ) -> None:
        if not 1 <= priority <= 32765:
            raise ConfigError(f"rule priority {priority}: must lie between 1 and 32765")
        if mask is not None and fwmark is None:
            raise ConfigError("rule mask without fwmark")
        if fwmark is not None and mask is None:
            mask = _ALL_BITS
        self.priority = priority
        self.table = table
        self.fwmark = fwmark
        self.mask = mask
        self.families = tuple(dict.fromkeys(Family(f) for f in families))
        if not self.families:
            raise ConfigError("rule families: at least one")
        self.proto = proto
        self.siblings = frozenset(siblings) - {priority}
        self._netlink = netlink
        self._present = True
        self._tracker: DeltaTracker[KernelRule, KernelRule] = DeltaTracker()

    def __repr__(self) -> str:
        mark = "" if self.fwmark is None else f" fwmark {self.fwmark:#x}/{self.mask:#x}"
        return (
            f"RuleManager({self.priority}: from all{mark} lookup {self.table} "
            f"proto {self.proto}, present={self._present})"
        )

    def set_desired(self, present: bool) -> None:
        """Whether our rule should exist; False is how an uninstall removes it."""
        self._present = present

    @property
    def desired_rules(self) -> tuple[KernelRule, ...]:
        if not self._present:
            return ()
        return tuple(
            KernelRule(f, self.priority, self.table, self.fwmark, self.mask, self.proto)
            for f in self.families
        )

    @property
    def pending(self) -> frozenset[KernelRule]:
        plan = self._tracker.plan()
        return frozenset(plan.upserts) | plan.deletions

    async def apply(self) -> ApplyReport:
        found = [rule for f in Family for rule in await self._netlink.rules(f) if self._ours(rule)]

        current: dict[KernelRule, KernelRule] = {}
        extras: list[KernelRule] = []
        for rule in found:
            key = self._normalised(rule)
            if key in current:
                extras.append(rule)
            else:
                current[key] = rule
        self._tracker.set_desired({r: r for r in self.desired_rules})
        self._tracker.load_actual((k, k) for k in current)
        plan = self._tracker.plan()

        ops = 0
        errors: list[ItemError] = []
        for rule in plan.upserts:
            if await self._add(rule, errors):
                self._tracker.applied_upsert(rule)
                ops += 1
        for key in plan.deletions:
            if await self._delete(current[key], errors):
                self._tracker.applied_delete(key)
                ops += 1
        for rule in extras:
            ops += await self._delete(rule, errors)

        for error in errors:
            log.warning("rule priority %d: %s: %s", self.priority, error.key, error.message)
        return ApplyReport(ops, tuple(errors))

    def _ours(self, rule: KernelRule) -> bool:
        """At our priority, or a leftover with our proto that no sibling manager owns."""
        at_our_priority = rule.priority == self.priority and rule.family in self.families
        return at_our_priority or (rule.proto == self.proto
                                   and rule.priority not in self.siblings)

    def _normalised(self, rule: KernelRule) -> KernelRule:
        """A rule at our priority from a kernel without rule protocols counts as ours."""
        if rule.proto is None and rule.priority == self.priority:
            return replace(rule, proto=self.proto)
        return rule

    async def _add(self, rule: KernelRule, errors: list[ItemError]) -> bool:
        try:
            await asyncio.shield(self._netlink.rule_add(rule))
        except NetlinkError as exc:
            errors.append(_item_error(rule, exc))
            return False
        return True

    async def _delete(self, rule: KernelRule, errors: list[ItemError]) -> bool:
        """True if the rule is gone; a rule that vanished on its own counts as gone."""
        try:
            await asyncio.shield(self._netlink.rule_del(rule))
        except NetlinkError as exc:
            if exc.errno in _GONE:
                return True
            errors.append(_item_error(rule, exc))
            return False
        return True


def _item_error(rule: KernelRule, exc: NetlinkError) -> ItemError:
    return ItemError(f"{rule.family.name} {rule.priority}: lookup {rule.table}", str(exc))
