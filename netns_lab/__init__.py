"""The tfcrypt lab: nodes, workloads, an underlay and real etcd in network namespaces.

Rules: every object carries the lab name as prefix and is written to a ledger before it
is created, so `down` removes exactly what `up` made; only lab namespaces and loopback
ever carry traffic. See docs/lab.md for the layout and the `status --json` document.
"""

from __future__ import annotations

from .errors import LabError
from .lab import Lab, down
from .layout import Layout

__all__ = ["Lab", "LabError", "Layout", "down"]
