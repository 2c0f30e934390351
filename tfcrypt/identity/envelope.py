"""The signed envelope: how every value under tfcrypt's etcd prefix is stored.

Rules:
- The etcd value is UTF-8 JSON `{"v": 1, "payload": "<canonical JSON text>", "sig":
  "<base64>", "chain": ["<base64 DER leaf>", "<base64 DER intermediate>", ...]}`.
- The signature covers the UTF-8 bytes of the payload string exactly as stored.
- The algorithm follows the key: ECDSA with SHA-256 for EC, PKCS#1 v1.5 with SHA-256 for
  RSA, pure Ed25519. A reader picks it from the leaf's public key, never from the envelope,
  so there is no algorithm field to downgrade.
- Version 2 (issue #18 item 3) carries the chain by reference: `{"v": 2, "payload",
  "sig", "chain_ref": "<sha256 hex>"}`, the chain itself stored once at
  `chains/<sha256 hex>` as `{"v": 1, "chain": [...]}` (canonical JSON), the hash taken over
  exactly those stored bytes. A writer's 100,000 records then hold one copy of its chain
  instead of 100,000 (bench C4: 114 MB -> 45 MB for 100,000 workloads). The chain value needs no
  signature: its key is its hash, so the only thing it can say is what the reference
  already names, and its certificates are checked exactly as an attached chain's.
- Every payload carries "kind", "key" (the etcd key relative to the prefix, binding the
  signature to where the value is stored), "epoch" (int >= 0) and "issued_at" (unix
  seconds), plus the fields of its kind.
This module shapes and signs; deciding whether to believe an envelope is `verify.py`'s job.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tfcrypt.identity.canonical import canonical_json, loads_strict
from tfcrypt.text import excerpt

ENVELOPE_VERSION = 1  # the chain attached
ENVELOPE_VERSION_REF = 2  # the chain by reference to chains/<sha256>
ENVELOPE_VERSIONS = (ENVELOPE_VERSION, ENVELOPE_VERSION_REF)
CHAINS = "chains/"
CHAIN_VALUE_VERSION = 1
MAX_CHAIN_LENGTH = 8
MAX_CHAIN_BYTES = 65536
_CHAIN_REF_RE = re.compile(r"[0-9a-f]{64}")
REQUIRED_FIELDS = ("kind", "key", "epoch", "issued_at")

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
VerifyingKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey


class EnvelopeFormatError(ValueError):
    """The bytes are not an envelope of the expected shape; the message names what is wrong."""


class ChainNameMismatch(EnvelopeFormatError):
    """A chain value that is not what its key names (its sha256, or a key that is none)."""


@dataclass(frozen=True)
class Envelope:
    """A decoded but not yet believed envelope; a version-2 one has `chain_ref` and no
    chain until the reader resolves it (tfcrypt.identity.verify)."""

    payload_text: str
    signature: bytes = field(repr=False)
    chain: tuple[x509.Certificate, ...] = field(repr=False)
    chain_ref: str | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def check_payload_fields(payload: Mapping[str, Any]) -> None:
    """Raise ValueError unless the four common fields are present with their types."""
    for name in REQUIRED_FIELDS:
        if name not in payload:
            raise ValueError(f"payload lacks {name!r}")
    if not isinstance(payload["kind"], str) or not payload["kind"]:
        raise ValueError("payload.kind must be a non-empty string")
    if not isinstance(payload["key"], str) or not payload["key"]:
        raise ValueError("payload.key must be a non-empty string")
    epoch = payload["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError("payload.epoch must be an integer >= 0")
    issued_at = payload["issued_at"]
    if isinstance(issued_at, bool) or not isinstance(issued_at, int):
        raise ValueError("payload.issued_at must be an integer (unix seconds)")


def sign_envelope(payload: Mapping[str, Any], private_key: SigningKey,
                  chain: Sequence[x509.Certificate], *, by_ref: bool = False) -> bytes:
    """Sign `payload` with the SVID key; `chain` is leaf first, as the Workload API gives it.

    With `by_ref` the envelope is version 2 and names the chain by `chain_value(chain)`'s
    hash; the writer stores that value at `chains/<hash>` before the record.
    Raises ValueError for a payload without the common fields, an empty chain, or a key
    that does not belong to the leaf: signing with a stale key after rotation would
    produce a value every reader rejects, so it is caught here instead.
    """
    check_payload_fields(payload)
    if not chain:
        raise ValueError("chain is empty")
    if len(chain) > MAX_CHAIN_LENGTH:
        raise ValueError(f"chain longer than {MAX_CHAIN_LENGTH}")
    if _spki(private_key.public_key()) != _spki(chain[0].public_key()):
        raise ValueError("private key does not match the leaf certificate")
    text = canonical_json(payload)
    data = text.encode("utf-8")
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        sig = private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    elif isinstance(private_key, rsa.RSAPrivateKey):
        sig = private_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(private_key, ed25519.Ed25519PrivateKey):
        sig = private_key.sign(data)
    else:
        raise ValueError(f"unsupported key type {type(private_key).__name__}")
    envelope: dict[str, Any] = {"payload": text, "sig": base64.b64encode(sig).decode("ascii")}
    if by_ref:
        envelope |= {"v": ENVELOPE_VERSION_REF, "chain_ref": chain_value(chain)[0]}
    else:
        envelope |= {"v": ENVELOPE_VERSION, "chain": _chain_field(chain)}
    return canonical_json(envelope).encode("utf-8")


def _chain_field(chain: Sequence[x509.Certificate]) -> list[str]:
    return [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii")
            for c in chain]


def chain_value(chain: Sequence[x509.Certificate]) -> tuple[str, bytes]:
    """The hash a version-2 envelope names and the value to store at `chains/<hash>`
    (once per chain: a writer signs thousands of values with the same one)."""
    if not chain or len(chain) > MAX_CHAIN_LENGTH:
        raise ValueError(f"chain must hold 1 to {MAX_CHAIN_LENGTH} certificates")
    return _chain_value(tuple(chain))


@functools.lru_cache(maxsize=64)
def _chain_value(chain: tuple[x509.Certificate, ...]) -> tuple[str, bytes]:
    raw = canonical_json({"v": CHAIN_VALUE_VERSION, "chain": _chain_field(chain)}).encode()
    return hashlib.sha256(raw).hexdigest(), raw


def decode_chain_value(ref: str, raw: bytes) -> tuple[x509.Certificate, ...]:
    """The certificates stored at `chains/<ref>`; EnvelopeFormatError names why not.

    The hash is checked first, over the bytes exactly as stored: a value that is not what
    its key names is refused before anything in it is parsed.
    """
    if not _CHAIN_REF_RE.fullmatch(ref):
        raise ChainNameMismatch("the key is not a lower-case sha256 hex digest")
    if len(raw) > MAX_CHAIN_BYTES:
        raise EnvelopeFormatError(f"{len(raw)} bytes, bound is {MAX_CHAIN_BYTES}")
    if hashlib.sha256(raw).hexdigest() != ref:
        raise ChainNameMismatch("its sha256 is not the one its key names")
    obj = _json_object(raw)
    if set(obj) != {"v", "chain"} or type(obj["v"]) is not int or (
            obj["v"] != CHAIN_VALUE_VERSION):
        raise EnvelopeFormatError(f"fields must be exactly v={CHAIN_VALUE_VERSION}, chain")
    return _chain(obj["chain"])


def verify_signature(public_key: VerifyingKey, signature: bytes, data: bytes) -> bool:
    """True if `signature` over `data` verifies with the algorithm of `public_key`'s type."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def is_supported_key(public_key: object) -> bool:
    return isinstance(public_key, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey,
                                   ed25519.Ed25519PublicKey))


def decode_envelope(raw: bytes) -> Envelope:
    """Parse the outer JSON shape; raises EnvelopeFormatError naming the first problem."""
    obj = _json_object(raw)
    version = obj.get("v")
    if type(version) is not int or version not in ENVELOPE_VERSIONS:
        raise EnvelopeFormatError(f"unsupported envelope version {excerpt(repr(version))}")
    chain_name = "chain" if version == ENVELOPE_VERSION else "chain_ref"
    if set(obj) != {"v", "payload", "sig", chain_name}:
        raise EnvelopeFormatError(f"fields of version {version} must be exactly v, payload, "
                                  f"sig, {chain_name}")
    if not isinstance(obj["payload"], str):
        raise EnvelopeFormatError("payload is not a string")
    try:
        obj["payload"].encode("utf-8")
    except UnicodeEncodeError:
        raise EnvelopeFormatError("payload is not encodable as UTF-8 (lone surrogate)") from None
    sig = _b64(obj["sig"], "sig")
    if version == ENVELOPE_VERSION_REF:
        ref = obj["chain_ref"]
        if not isinstance(ref, str) or not _CHAIN_REF_RE.fullmatch(ref):
            raise EnvelopeFormatError("chain_ref is not a lower-case sha256 hex digest")
        return Envelope(obj["payload"], sig, (), ref)
    return Envelope(obj["payload"], sig, _chain(obj["chain"]))


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeFormatError("not UTF-8") from None
    try:
        obj = loads_strict(text)
    except ValueError as e:
        raise EnvelopeFormatError(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise EnvelopeFormatError("not a JSON object")
    return obj


def _chain(chain_field: object) -> tuple[x509.Certificate, ...]:
    if not isinstance(chain_field, list) or not chain_field:
        raise EnvelopeFormatError("chain is not a non-empty list")
    if len(chain_field) > MAX_CHAIN_LENGTH:
        raise EnvelopeFormatError(f"chain longer than {MAX_CHAIN_LENGTH}")
    chain = []
    for i, item in enumerate(chain_field):
        if not isinstance(item, str):  # lists and dicts cannot be cache keys
            raise EnvelopeFormatError(f"chain[{i}] is not a base64 string")
        try:
            chain.append(_certificate(item))
        except EnvelopeFormatError as e:
            raise EnvelopeFormatError(f"chain[{i}] {e}") from None
    return tuple(chain)


@functools.lru_cache(maxsize=1024)
def _certificate(item: str) -> x509.Certificate:
    """One chain entry, parsed once: every value a writer signs carries the same chain, so
    100,000 workload records hold one or two distinct certificates (errors are not cached).
    """
    der = _b64(item, "")
    try:
        cert = x509.load_der_x509_certificate(der)
        cert.subject, cert.issuer  # noqa: B018 - parsed lazily; fail here, not mid-check
    except (ValueError, TypeError, x509.InvalidVersion):
        raise EnvelopeFormatError("is not a DER certificate") from None
    return cert


def _b64(value: object, name: str) -> bytes:
    what = f"{name} is" if name else "is"
    if not isinstance(value, str) or not value:
        raise EnvelopeFormatError(f"{what} not a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise EnvelopeFormatError(f"{what} not valid base64") from None


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
