"""The WireGuard MTU: configured, else the underlay's minus WireGuard's worst-case overhead.

Rules:
- The underlay is the interface holding the advertise address (what peers send to), read
  again on every full apply, so a changed underlay MTU follows within one resync.
- Overhead is 80 bytes (WireGuard over IPv6, tfcrypt/wireguard/model.py); a result below
  IPv6's minimum link MTU (1280) could not carry IPv6, and an unreadable underlay gives
  no answer: both fall back to DEFAULT_MTU, and `source` says why.
"""

from __future__ import annotations

from tfcrypt.config import AgentConfig
from tfcrypt.dataplane.netlink import Netlink, NetlinkError
from tfcrypt.wireguard.model import mtu_for_underlay

DEFAULT_MTU = 1420  # 1500-byte underlay minus the 80 bytes of WireGuard over IPv6: the
# fallback when the interface holding the advertise address cannot be read
MIN_MTU = 1280  # IPv6's minimum link MTU: below it the tunnel could not carry IPv6


async def pick_mtu(cfg: AgentConfig, netlink: Netlink) -> tuple[int, str]:
    """(the MTU, where it came from), for the status document and the log."""
    if cfg.mtu:
        return cfg.mtu, "configured"
    try:
        underlay = await netlink.address_mtu(cfg.advertise_address)
    except (NetlinkError, OSError) as exc:
        underlay, why = None, f"unreadable ({exc})"
    else:
        why = f"no interface holds {cfg.advertise_address}"
    if underlay is not None and mtu_for_underlay(underlay) >= MIN_MTU:
        return mtu_for_underlay(underlay), f"underlay MTU {underlay} - 80"
    if underlay is not None:
        why = f"underlay MTU {underlay} leaves less than {MIN_MTU}"
    return DEFAULT_MTU, f"default: {why}"
