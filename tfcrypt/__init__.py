"""tfcrypt: tag-selective WireGuard encryption between nodes, keys bound to SPIFFE identities."""

__version__ = "0.1.0"
