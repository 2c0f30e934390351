"""etcd over mutual TLS in the lab: the certificates etcd serves and the flags that use them.

Rules:
- One trust bundle for everything: etcd's client CA (--trusted-ca-file) and peer CA are
  the SPIFFE trust bundle of the lab's trust domain, so every X509-SVID the Workload API
  serves (agents, controller) is a client certificate etcd accepts, and nothing else is.
- Each member's certificate is an X509-SVID of its own (spiffe://<td>/tfcrypt/etcd/<member>)
  carrying the member's underlay IP as an IP SAN and two DNS SANs: `<member>.etcd.<td>`
  and the shared peer name `etcd.<td>`. Peers must present the shared name
  (--peer-cert-allowed-hostname): a node's SVID, which etcd's client CA accepts, is not
  a raft peer.
- The issuer is the lab CA (spire/lab_workload_api, kept in the run dir's spire/): the lab
  Workload API server signs SVIDs with it directly; with SPIRE (`--workload-api spire`)
  it is the upstream root of SPIRE's X509 CA (netns_lab/spire.py, `disk`
  UpstreamAuthority), so SPIRE's bundle is this same root and etcd's flags and the
  clients stay the same. The members keep certificates from the lab CA, not SPIRE SVIDs:
  SPIRE issues no IP SANs, which etcd's peers check without DNS.
- `etcdctl` of the lab (health checks, tests) presents a lab-admin SVID of its own.
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .layout import TRUST_DOMAIN, Layout, Member

CERT_TTL = dt.timedelta(days=30)
BACKDATE = dt.timedelta(seconds=30)
ADMIN = "lab-admin"


def peer_name(trust_domain: str = TRUST_DOMAIN) -> str:
    return f"etcd.{trust_domain}"


@dataclass(frozen=True)
class Issuer:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def tls_dir(layout: Layout) -> Path:
    return layout.run_dir / "etcd-tls"


def bundle_path(layout: Layout) -> Path:
    return tls_dir(layout) / "bundle.pem"


def cert_path(layout: Layout, who: str) -> Path:
    return tls_dir(layout) / f"{who}.crt"


def key_path(layout: Layout, who: str) -> Path:
    return tls_dir(layout) / f"{who}.key"


def issuer(layout: Layout) -> Issuer:
    """The CA that signs the lab's SVIDs (created now if the server has not yet)."""
    from lab_workload_api.ca import LabCA

    ca = LabCA.load_or_create(layout.spire_dir, TRUST_DOMAIN)
    return Issuer(ca.key, ca.cert)


def upstream_ca_paths(layout: Layout) -> tuple[Path, Path]:
    """(certificate, key) of the lab CA on disk: SPIRE's `disk` UpstreamAuthority signs
    its X509 CA with them, so SPIRE's SVIDs chain to the root etcd trusts."""
    from lab_workload_api.ca import LabCA

    issuer(layout)  # make sure it exists
    return LabCA.paths(layout.spire_dir, TRUST_DOMAIN)


def issue(ca: Issuer, spiffe_id: str, *, ips: tuple[str, ...] = (),
          dns: tuple[str, ...] = (), now: dt.datetime | None = None,
          ttl: dt.timedelta = CERT_TTL) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM): an X509-SVID for `spiffe_id` with extra IP/DNS SANs."""
    import ipaddress

    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]
    if dns:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, dns[0]))  # as SPIRE does
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=False, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_certs(layout: Layout) -> None:
    """The bundle, one certificate per member and the lab-admin client certificate.
    Kept across member restarts (written once, when the lab comes up)."""
    d = tls_dir(layout)
    d.mkdir(mode=0o700, exist_ok=True)
    ca = issuer(layout)
    _write(bundle_path(layout), ca.cert.public_bytes(serialization.Encoding.PEM), 0o644)
    for m in layout.all_members():
        cert, key = issue(ca, f"spiffe://{TRUST_DOMAIN}/tfcrypt/etcd/{m.name}",
                          ips=(m.underlay_ip,),
                          dns=(f"{m.name}.etcd.{TRUST_DOMAIN}", peer_name()))
        _write(cert_path(layout, m.name), cert, 0o644)
        _write(key_path(layout, m.name), key, 0o600)
    cert, key = issue(ca, f"spiffe://{TRUST_DOMAIN}/tfcrypt/{ADMIN}")
    _write(cert_path(layout, ADMIN), cert, 0o644)
    _write(key_path(layout, ADMIN), key, 0o600)


def member_flags(layout: Layout, member: Member) -> list[str]:
    """etcd's TLS flags: serve the member SVID, require client certificates from the
    trust bundle, and the same for peers, which must also carry the peer name."""
    cert, key, bundle = (str(cert_path(layout, member.name)),
                         str(key_path(layout, member.name)), str(bundle_path(layout)))
    return [
        "--cert-file", cert, "--key-file", key,
        "--client-cert-auth", "--trusted-ca-file", bundle,
        "--peer-cert-file", cert, "--peer-key-file", key,
        "--peer-client-cert-auth", "--peer-trusted-ca-file", bundle,
        "--peer-cert-allowed-hostname", peer_name(),
    ]


def etcdctl_flags(layout: Layout) -> list[str]:
    """What the lab's etcdctl adds to talk to a TLS etcd (nothing without TLS)."""
    if not layout.etcd_tls:
        return []
    return ["--cacert", str(bundle_path(layout)), "--cert", str(cert_path(layout, ADMIN)),
            "--key", str(key_path(layout, ADMIN))]
