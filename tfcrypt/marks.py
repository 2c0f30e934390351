"""Packet-mark bits other tools on a Kubernetes node document as theirs.

tfcrypt's `mark`/`mark_mask` must not share bits with them: a shared bit makes their
rules act on tfcrypt's packets (kube-proxy masquerading or dropping selected traffic) or
ours on theirs. Sources (as documented upstream; see docs/operations.md, "Mark bits"):
- kube-proxy: `--iptables-masquerade-bit` default 14 (0x4000, KUBE-MARK-MASQ) and the
  drop bit 15 (0x8000, KUBE-MARK-DROP, also set by the kubelet).
- Calico Felix: `IptablesMarkMask` (FELIX_IPTABLESMARKMASK), default 0xffff0000: Felix
  allocates its accept/pass/scratch/endpoint mark bits from that mask.
- Cilium: the magic-mark nibble 0x0F00 (pkg/datapath/linux/linux_defaults/mark.go:
  MagicMarkHostMask; values 0x0200, 0x0300, 0x0A00, 0x0B00, 0x0E00, 0x0F00, ...).
A value is refused unless `allow_foreign_mark_bits` is set (the operator knows the other
tool is absent or configured elsewhere). tfcrypt's own default (0x00100000) lies inside
Calico's default mask; it is accepted as the documented default (DEFAULT_MARK), and the
agent warns about it, rather than refusing every default install (issue #14).
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MARK = 0x00100000


@dataclass(frozen=True)
class ForeignBits:
    owner: str
    bits: int
    what: str


FOREIGN_MARK_BITS: tuple[ForeignBits, ...] = (
    ForeignBits("kube-proxy", 0x00004000, "masquerade bit, KUBE-MARK-MASQ"),
    ForeignBits("kube-proxy", 0x00008000, "drop bit, KUBE-MARK-DROP"),
    ForeignBits("Calico", 0xFFFF0000, "default FELIX_IPTABLESMARKMASK"),
    ForeignBits("Cilium", 0x00000F00, "magic marks, MagicMarkHostMask"),
)


def foreign_clashes(bits: int) -> list[str]:
    """`owner's bits (what)` for every foreign range `bits` overlaps; empty if none."""
    return [f"{f.bits & bits:#x} is {f.owner}'s ({f.what} {f.bits:#x})"
            for f in FOREIGN_MARK_BITS if f.bits & bits]


def clash_problem(mark: int, mask: int) -> str | None:
    """Why `mark`/`mask` may not be used without `allow_foreign_mark_bits`, or None.

    The documented default (mark and mask DEFAULT_MARK) is let through: see the module
    docstring."""
    if mark == mask == DEFAULT_MARK:
        return None
    clashes = foreign_clashes(mark | mask)
    if not clashes:
        return None
    return (f"{mask:#x} overlaps bits another tool uses: {'; '.join(clashes)} (choose free "
            "bits, or set allow_foreign_mark_bits if that tool is not on this node)")
