"""Dataplane: one reconciler per kernel object (WireGuard device, nftables, routes, rules).

Every reconciler has the same shape: `set_desired()` records intent in memory and is
cheap; `async apply()` reads what the kernel reports, changes only what differs, and
keeps a failed item pending instead of aborting the rest.
"""
