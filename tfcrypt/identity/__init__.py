"""Identity and trust: signed envelopes, their verification and who may write what.

Pure code (no I/O, no clock, no asyncio) except `svid_source`, which follows the SPIFFE
Workload API. docs/trust.md has the envelope format, the order of checks and the reasons.
"""

from __future__ import annotations

from tfcrypt.identity.authz import Authorizer, is_node_name
from tfcrypt.identity.bundles import TrustBundles
from tfcrypt.identity.canonical import canonical_json
from tfcrypt.identity.envelope import sign_envelope
from tfcrypt.identity.epochs import EpochBook
from tfcrypt.identity.verify import ChainTime, Verified, verify_envelope

__all__ = [
    "Authorizer",
    "ChainTime",
    "EpochBook",
    "TrustBundles",
    "Verified",
    "canonical_json",
    "is_node_name",
    "sign_envelope",
    "verify_envelope",
]
