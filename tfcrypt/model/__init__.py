"""Values that cross boundaries: frozen, validated on construction, compared with `==`."""

from __future__ import annotations

from tfcrypt.model.node import NodeRecord

__all__ = ["NodeRecord"]
