"""Deciding whether to believe a value read from etcd.

Rules:
- Checks run in a fixed order and the first failure is the reason reported: size, envelope
  shape, payload fields, key match, leaf SPIFFE ID, trust domain known, chain (dates, then
  path to that trust domain's bundle only), X509-SVID leaf rules, signature, authorisation.
  Cheap structural checks come first so junk costs little; the signature is checked only
  on a chain already known to be ours, so the reason names the real problem.
- Pure: `now` is a parameter, nothing is read from the clock, nothing is logged here.
- Every failure is `Rejected` with one reason code; details name the problem, never key
  material or the payload; text taken from the value (a payload's key, a URI SAN) is
  shown as a short escaped excerpt (tfcrypt.text).
- The `spiffe` package does no chain validation; `cryptography.x509.verification` does the
  path building against a store holding only the claimed trust domain's CAs.
"""

from __future__ import annotations

import datetime as dt
import enum
import functools
import re
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.x509.verification import (
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.authz import Authorizer
from tfcrypt.identity.bundles import TrustBundles
from tfcrypt.identity.canonical import loads_strict
from tfcrypt.identity.envelope import (
    REQUIRED_FIELDS,
    EnvelopeFormatError,
    VerifyingKey,
    check_payload_fields,
    decode_envelope,
    is_supported_key,
    verify_signature,
)
from tfcrypt.text import excerpt

DEFAULT_MAX_BYTES = 65536
MAX_SPIFFE_ID_LENGTH = 2048
_SPIFFE_ID_RE = re.compile(r"^spiffe://([a-z0-9._-]+)((?:/[A-Za-z0-9._-]+)+)$")
_CERT_PARSE_ERRORS = (ValueError, TypeError, x509.DuplicateExtension,
                      x509.UnsupportedGeneralNameType)


@dataclass(frozen=True)
class Verified:
    """A value that passed every check; `not_after` is when the signer's chain expires."""

    key: str
    kind: str
    epoch: int
    issued_at: int
    payload: Mapping[str, Any] = field(repr=False)
    signer: str
    not_after: dt.datetime
    # the X509 authority that issued the leaf: its subject key ID in hex, as SPIRE names
    # authorities (`spire-server localauthority x509 show`); what an operator compares
    # before revoking an old one (docs/operations.md, "Rotating SPIRE's CA")
    authority: str = ""
    chain_ref: str | None = None  # the stored chain a version-2 envelope named


class ChainTime(enum.Enum):
    """When the signer's chain must have been valid.

    NOW suits values their writer re-signs before its SVID expires (node records: the agent
    re-signs on every rotation), so a record outlives its writer by at most one SVID
    lifetime. ISSUED_AT suits values written once by a controller whose SVID expires long
    before the value stops mattering (workloads, policies): the chain must have been valid
    when the value says it was signed, and that moment may not lie in the future. The cost
    is that a stolen, expired controller key could still sign a backdated value; epochs
    still refuse replays of older ones.
    """

    NOW = "now"
    ISSUED_AT = "issued_at"


MAX_CLOCK_SKEW = dt.timedelta(minutes=5)


def verify_envelope(raw: bytes, key: str, *, bundles: TrustBundles, authorizer: Authorizer,
                    now: dt.datetime, max_bytes: int = DEFAULT_MAX_BYTES,
                    chain_time: ChainTime = ChainTime.NOW,
                    chains: Mapping[str, tuple[x509.Certificate, ...]] | None = None
                    ) -> Verified:
    """Return the verified value stored at `key` (relative to the prefix) or raise Rejected.

    `chains` holds the chains stored under `chains/` by their hash (already checked
    against it, tfcrypt.identity.envelope.decode_chain_value): a version-2 envelope's
    chain is looked up there and then checked exactly as an attached one.
    """
    pending = _precheck(raw, key, bundles, now, max_bytes, chain_time, chains)
    return _finish(pending, verify_signature(*pending.signed), authorizer)


def verify_envelopes(values: Sequence[tuple[str, bytes, ChainTime]], *,
                     bundles: TrustBundles, authorizer: Authorizer, now: dt.datetime,
                     chains: Mapping[str, tuple[x509.Certificate, ...]] | None = None,
                     max_bytes: int = DEFAULT_MAX_BYTES, workers: int = 1
                     ) -> list[Verified | Rejected]:
    """`verify_envelope` of many (key, value, chain time), each result in its place.

    The same checks in the same order, run in three passes: every check before the
    signature, then the signatures of the values that passed on `workers` threads
    (cryptography verifies with the GIL released, so they run on as many cores; the
    Python checks around them cannot), then the checks after it.
    """
    out: list[Verified | Rejected | _Pending] = []
    for key, raw, chain_time in values:
        try:
            out.append(_precheck(raw, key, bundles, now, max_bytes, chain_time, chains))
        except Rejected as rej:
            out.append(rej)
    todo = [i for i, o in enumerate(out) if isinstance(o, _Pending)]
    signed = [out[i].signed for i in todo]  # type: ignore[union-attr]

    def run(part: Sequence[tuple[VerifyingKey, bytes, bytes]]) -> list[bool]:
        return [verify_signature(*s) for s in part]

    if workers > 1 and len(signed) > workers:
        size = -(-len(signed) // workers)
        with ThreadPoolExecutor(workers, thread_name_prefix="verify") as pool:
            good = [ok for part in pool.map(run, [signed[i:i + size]
                                                  for i in range(0, len(signed), size)])
                    for ok in part]
    else:
        good = run(signed)
    for i, ok in zip(todo, good, strict=True):
        pending = out[i]
        assert isinstance(pending, _Pending)
        try:
            out[i] = _finish(pending, ok, authorizer)
        except Rejected as rej:
            out[i] = rej
    return out  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class _Pending:
    """A value that passed every check before its signature's."""

    key: str
    payload: dict[str, Any]
    signer: str
    signed: tuple[VerifyingKey, bytes, bytes]  # key, signature, the signed bytes
    chain: list[x509.Certificate]  # the validated path, up to the root
    chain_ref: str | None


def _precheck(raw: bytes, key: str, bundles: TrustBundles, now: dt.datetime,
              max_bytes: int, chain_time: ChainTime,
              chains: Mapping[str, tuple[x509.Certificate, ...]] | None) -> _Pending:
    """Checks 1-8 of docs/trust.md, in their order."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    now = now.astimezone(dt.UTC)
    if len(raw) > max_bytes:
        raise Rejected(RejectReason.TOO_LARGE, f"{len(raw)} bytes, bound is {max_bytes}")
    try:
        env = decode_envelope(raw)
    except EnvelopeFormatError as e:
        raise Rejected(RejectReason.MALFORMED, f"envelope: {e}") from None
    payload = _parse_payload(env.payload_text)
    if payload["key"] != key:
        raise Rejected(RejectReason.KEY_MISMATCH, f'payload names "{excerpt(payload["key"])}" '
                       f'but is stored at "{excerpt(key)}"')
    chain = env.chain
    if env.chain_ref is not None:
        found = (chains or {}).get(env.chain_ref)
        if not found:
            raise Rejected(RejectReason.UNKNOWN_CHAIN, f"its chain chains/{env.chain_ref} "
                           "is not in etcd (or was refused)")
        chain = found
    spiffe_id, trust_domain = _leaf_spiffe_id(chain[0])
    cas = bundles.get(trust_domain)
    if not cas:
        raise Rejected(RejectReason.UNKNOWN_TRUST_DOMAIN,
                       f"no trust bundle for {trust_domain!r}")
    at = now
    if chain_time is ChainTime.ISSUED_AT:
        try:
            at = dt.datetime.fromtimestamp(payload["issued_at"], dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise Rejected(RejectReason.INVALID_FIELD,
                           "payload.issued_at: not a usable time") from None
        if at > now + MAX_CLOCK_SKEW:
            raise Rejected(RejectReason.INVALID_FIELD,
                           f"payload.issued_at {at.isoformat()} lies in the future")
    verified_chain = _validate_chain(chain, cas, trust_domain, at)
    public_key = _check_svid_leaf(chain[0])
    return _Pending(key, payload, spiffe_id,
                    (public_key, env.signature, env.payload_text.encode("utf-8")),
                    verified_chain, env.chain_ref)


def _finish(pending: _Pending, signature_ok: bool, authorizer: Authorizer) -> Verified:
    """Checks 9 (the signature, verified by the caller) and 10 (who may write the key)."""
    if not signature_ok:
        raise Rejected(RejectReason.BAD_SIGNATURE,
                       f"signature by {pending.signer} does not verify")
    authorizer.check(pending.signer, pending.key)
    chain, payload = pending.chain, pending.payload
    return Verified(
        key=pending.key,
        kind=payload["kind"],
        epoch=payload["epoch"],
        issued_at=payload["issued_at"],
        payload=MappingProxyType(payload),
        signer=pending.signer,
        not_after=min(c.not_valid_after_utc for c in chain),
        authority=authority_id(chain[1]) if len(chain) > 1 else "",
        chain_ref=pending.chain_ref,
    )


def authority_id(ca: x509.Certificate) -> str:
    """A CA's subject key ID in lower-case hex (SPIRE's X509 authority ID); computed from
    its public key when the certificate carries none."""
    try:
        ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except (x509.ExtensionNotFound, *_CERT_PARSE_ERRORS):
        try:
            ski = x509.SubjectKeyIdentifier.from_public_key(ca.public_key()).digest
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return ""
    return ski.hex()


def _parse_payload(text: str) -> dict[str, Any]:
    try:
        payload = loads_strict(text)
    except ValueError as e:
        raise Rejected(RejectReason.MALFORMED, f"payload: {e}") from None
    if not isinstance(payload, dict):
        raise Rejected(RejectReason.MALFORMED, "payload is not a JSON object")
    missing = [name for name in REQUIRED_FIELDS if name not in payload]
    if missing:
        raise Rejected(RejectReason.MISSING_FIELD, f"payload.{missing[0]}")
    try:
        check_payload_fields(payload)
    except ValueError as e:
        raise Rejected(RejectReason.INVALID_FIELD, str(e)) from None
    return payload


@functools.lru_cache(maxsize=1024)  # pure in the leaf; rejections are not cached
def _leaf_spiffe_id(leaf: x509.Certificate) -> tuple[str, str]:
    """The leaf's one SPIFFE ID and its trust domain (X509-SVID spec, section 2)."""
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf has no subjectAltName") from None
    except _CERT_PARSE_ERRORS:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf extensions cannot be parsed") from None
    if len(uris) != 1:
        raise Rejected(RejectReason.NOT_AN_SVID,
                       f"leaf has {len(uris)} URI SANs, an X509-SVID has exactly one")
    uri = uris[0]
    if len(uri) > MAX_SPIFFE_ID_LENGTH:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf SPIFFE ID is too long")
    m = _SPIFFE_ID_RE.fullmatch(uri)
    if m is None or any(seg in (".", "..") for seg in m.group(2).split("/")):
        raise Rejected(RejectReason.NOT_AN_SVID,
                       f'leaf URI SAN "{excerpt(uri)}" is not a workload SPIFFE ID')
    return uri, m.group(1)


def _validate_chain(chain: tuple[x509.Certificate, ...], cas: tuple[x509.Certificate, ...],
                    trust_domain: str, now: dt.datetime) -> list[x509.Certificate]:
    """Path to the trust domain's own store at `now`; returns the chain up to its root.

    Dates are checked first so an expired SVID reads EXPIRED rather than the verifier's
    generic failure; a chain that fails only because its root has expired reads EXPIRED too.
    """
    for i, cert in enumerate(chain):
        what = "leaf" if i == 0 else f"chain[{i}]"
        if now < cert.not_valid_before_utc:
            raise Rejected(RejectReason.EXPIRED, f"{what} not valid before "
                           f"{cert.not_valid_before_utc.isoformat()}")
        if now > cert.not_valid_after_utc:
            raise Rejected(RejectReason.EXPIRED,
                           f"{what} expired at {cert.not_valid_after_utc.isoformat()}")
    known = _paths.get((chain, cas))
    if known is not None and all(c.not_valid_before_utc <= now <= c.not_valid_after_utc
                                 for c in known):
        return list(known)
    verifier = (
        PolicyBuilder()
        .store(Store(list(cas)))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                            ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        path = tuple(verifier.verify(chain[0], list(chain[1:])).chain)
        _paths.put((chain, cas), path)
        return list(path)
    except VerificationError as e:
        issuers = [ca for ca in cas if ca.subject == chain[-1].issuer]
        if issuers and all(not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc
                           for ca in issuers):
            raise Rejected(RejectReason.EXPIRED,
                           f"trust bundle CA for {trust_domain!r} is not valid now") from None
        raise Rejected(RejectReason.UNTRUSTED_CHAIN,
                       f"chain does not validate to the {trust_domain!r} bundle: {e}") from None


class _PathCache:
    """Validated paths by (presented chain, trust bundle): path building checks signatures,
    constraints and key usage, none of which depend on the time, so a path found once is
    reused while `now` lies inside every certificate's validity; outside it, or for a chain
    never seen, the verifier runs again. Every value one writer signs carries the same
    chain, so 100,000 workload records cost one path validation, not 100,000. Bounded:
    the oldest entry goes first.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._paths: dict[tuple[object, ...], tuple[x509.Certificate, ...]] = {}
        self._lock = threading.Lock()  # the agent verifies big lists in a worker thread

    def get(self, key: tuple[object, ...]) -> tuple[x509.Certificate, ...] | None:
        with self._lock:
            return self._paths.get(key)

    def put(self, key: tuple[object, ...], path: tuple[x509.Certificate, ...]) -> None:
        with self._lock:
            if len(self._paths) >= self.size:
                self._paths.pop(next(iter(self._paths)))
            self._paths[key] = path


_paths = _PathCache()


@functools.lru_cache(maxsize=1024)  # pure in the leaf; rejections are not cached
def _check_svid_leaf(leaf: x509.Certificate) -> VerifyingKey:
    """X509-SVID spec, sections 4.1 and 4.3: a leaf is no CA and signs with its own key."""
    try:
        exts = leaf.extensions
        bc = exts.get_extension_for_class(x509.BasicConstraints).value
        ku = exts.get_extension_for_class(x509.KeyUsage).value
        public_key = leaf.public_key()
    except x509.ExtensionNotFound:
        raise Rejected(RejectReason.NOT_AN_SVID,
                       "leaf lacks basicConstraints or keyUsage") from None
    except (*_CERT_PARSE_ERRORS, UnsupportedAlgorithm):
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf cannot be parsed") from None
    if bc.ca:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf has cA=true")
    if not ku.digital_signature:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf keyUsage lacks digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise Rejected(RejectReason.NOT_AN_SVID, "leaf keyUsage allows certificate signing")
    if not is_supported_key(public_key):
        raise Rejected(RejectReason.NOT_AN_SVID,
                       f"leaf key type {type(public_key).__name__} is not supported")
    return public_key  # type: ignore[return-value]
