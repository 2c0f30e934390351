"""Errors raised at tfcrypt's edges.

Input from outside the process (etcd values, the Workload API, policy files, config, the
CLI) is parsed into typed values or rejected with a `Rejected` that carries a reason
code. Reason codes are stable strings: they appear in logs, in metrics labels and in the
status API, so renaming one is a breaking change.
"""

from __future__ import annotations

import enum


class TfcryptError(Exception):
    """Base of every error tfcrypt raises on purpose."""


class ConfigError(TfcryptError):
    """Configuration or command-line input that cannot be used; the message names the key."""


class RejectReason(enum.Enum):
    """Why a value read from outside was not believed."""

    MALFORMED = "malformed"                  # not JSON / not the envelope shape
    MISSING_FIELD = "missing_field"          # payload lacks a required field
    INVALID_FIELD = "invalid_field"          # a field of the wrong type or value
    TOO_LARGE = "too_large"                  # over the size bound
    BAD_SIGNATURE = "bad_signature"          # signature does not verify with the leaf key
    UNTRUSTED_CHAIN = "untrusted_chain"      # chain does not validate to the bundle
    UNKNOWN_TRUST_DOMAIN = "unknown_trust_domain"  # no bundle for the claimed trust domain
    NOT_AN_SVID = "not_an_svid"              # leaf breaks the X509-SVID rules
    EXPIRED = "expired"                      # chain not valid at verification time
    UNAUTHORIZED = "unauthorized"            # SPIFFE ID not allowed to write this key
    ROLLBACK = "rollback"                    # epoch lower than one already accepted
    KEY_MISMATCH = "key_mismatch"            # payload names another key than the one it sits at
    UNKNOWN_CHAIN = "unknown_chain"          # a version-2 envelope's chain is not in etcd


class Rejected(TfcryptError):
    """A value from outside that tfcrypt refuses; `reason` is what gets counted."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail
