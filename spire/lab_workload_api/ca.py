"""A lab certificate authority that issues X509-SVIDs by the SPIFFE X509-SVID spec.

Rules this module keeps (X509-SVID spec, sections 4 and 5):
- the CA carries the trust domain's own SPIFFE ID (no path), cA=true, keyCertSign;
- a leaf carries exactly one URI SAN, cA=false (critical), digitalSignature (critical),
  EKU serverAuth+clientAuth, and an AKI taken from the CA's SKI.
`build_leaf` takes explicit arguments that break these rules on purpose, so tests of a
verifier can build every kind of bad certificate from one place.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_TTL = dt.timedelta(days=365)
BACKDATE = dt.timedelta(seconds=30)  # tolerate small clock differences between namespaces


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class IssuedSVID:
    """A leaf and its key; `chain` is leaf first, without the root."""

    spiffe_id: str
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def chain_der(self) -> bytes:
        """The Workload API's x509_svid field: ASN.1 DER certificates concatenated."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain)

    def key_der(self) -> bytes:
        """The Workload API's x509_svid_key field: PKCS#8 DER."""
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class LabCA:
    """One self-signed ECDSA P-256 root per trust domain."""

    def __init__(self, trust_domain: str, key: ec.EllipticCurvePrivateKey,
                 cert: x509.Certificate) -> None:
        self.trust_domain = trust_domain
        self.key = key
        self.cert = cert

    @classmethod
    def generate(cls, trust_domain: str, now: dt.datetime | None = None) -> LabCA:
        now = now or _utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tfcrypt lab"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"lab CA {trust_domain}"),
        ])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert)

    @staticmethod
    def paths(directory: Path, trust_domain: str) -> tuple[Path, Path]:
        """(certificate, key) files of the CA kept in `directory` (PEM; key PKCS8)."""
        return (directory / f"ca-{trust_domain}.crt.pem",
                directory / f"ca-{trust_domain}.key.pem")

    @classmethod
    def load_or_create(cls, directory: Path, trust_domain: str) -> LabCA:
        """Keep the CA across server restarts, so a restart does not change the bundle."""
        cert_path, key_path = cls.paths(directory, trust_domain)
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path}: not an EC private key")
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            return cls(trust_domain, key, cert)
        ca = cls.generate(trust_domain)
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ca.key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption()))
        cert_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def bundle_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def issue(self, spiffe_id: str, ttl: dt.timedelta,
              now: dt.datetime | None = None) -> IssuedSVID:
        """A conforming X509-SVID for `spiffe_id`, valid for `ttl` from `now`."""
        now = now or _utcnow()
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = build_leaf(self, key.public_key(), uris=[spiffe_id],
                          not_before=now - BACKDATE, not_after=now + ttl)
        return IssuedSVID(spiffe_id, key, (leaf,))


def build_leaf(
    ca: LabCA,
    public_key: ec.EllipticCurvePublicKey,
    *,
    uris: Sequence[str],
    not_before: dt.datetime,
    not_after: dt.datetime,
    is_ca: bool = False,
    digital_signature: bool = True,
) -> x509.Certificate:
    """Build a leaf signed by `ca`; the keyword arguments can break the SVID rules."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                key_cert_sign=is_ca, crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
            critical=False,
        )
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
    return builder.sign(ca.key, hashes.SHA256())
