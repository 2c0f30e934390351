"""The lab Kubernetes control plane's keys and certificates, and its kubeconfigs.

Rules:
- One CA of its own (`<run_dir>/kube/pki/ca.crt`), apart from the SPIFFE trust bundle:
  the API server's client CA must not accept every SVID the lab hands out (a node's SVID
  is no Kubernetes credential), and SPIRE's CA rotates on its own schedule.
- The serving certificate carries the API server's underlay address(es) as IP SANs, the
  in-cluster DNS names (`kubernetes.default.svc...`) and 10.96.0.1, the `kubernetes`
  Service address of --service-cluster-ip-range: what a client in a pod would dial.
- Client certificates (x509 authentication: CN = user, O = groups): `admin` is
  `lab-admin` in `system:masters` (cluster-admin, bypasses RBAC, as kubeadm's admin.conf);
  `controller` is the tfcrypt controller's ServiceAccount as the API server names it,
  user `system:serviceaccount:tfcrypt-system:tfcrypt-controller` with the groups a
  ServiceAccount token would carry, so deploy/kubernetes/rbac-controller.yaml's
  ServiceAccount subject applies to it unchanged. Decision: a certificate rather than a
  TokenRequest token: it does not expire within a lab's life, needs no ServiceAccount
  object to exist first, and works with any client library (docs/lab.md, "Kubernetes").
- The service-account key pair signs and verifies ServiceAccount tokens (the API server
  refuses to start without one).
- Written once when the lab comes up; kept across API server restarts.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CERT_TTL = dt.timedelta(days=30)
BACKDATE = dt.timedelta(seconds=60)
SERVICE_IP = "10.96.0.1"  # first address of the API server's --service-cluster-ip-range
SERVICE_DNS = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
               "kubernetes.default.svc.cluster.local")
CONTROLLER_NAMESPACE = "tfcrypt-system"
CONTROLLER_SERVICE_ACCOUNT = "tfcrypt-controller"
CONTROLLER_USER = f"system:serviceaccount:{CONTROLLER_NAMESPACE}:{CONTROLLER_SERVICE_ACCOUNT}"


@dataclass(frozen=True)
class Credential:
    """A client identity of the lab: its kubeconfig's user, and who the server sees."""

    name: str  # "admin" or "controller": file names and the status document's keys
    user: str
    groups: tuple[str, ...]


CREDENTIALS = (
    Credential("admin", "lab-admin", ("system:masters",)),
    Credential("controller", CONTROLLER_USER,
               ("system:serviceaccounts", f"system:serviceaccounts:{CONTROLLER_NAMESPACE}")),
)


def credential(name: str) -> Credential:
    for c in CREDENTIALS:
        if c.name == name:
            return c
    raise KeyError(name)


@dataclass(frozen=True)
class Paths:
    """Every file of the control plane's PKI under `<run_dir>/kube/`."""

    kube_dir: Path

    @property
    def pki(self) -> Path:
        return self.kube_dir / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.pki / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.pki / "apiserver.key"

    @property
    def sa_key(self) -> Path:
        return self.pki / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.pki / "sa.pub"

    def client_cert(self, who: str) -> Path:
        return self.pki / f"{who}.crt"

    def client_key(self, who: str) -> Path:
        return self.pki / f"{who}.key"

    def kubeconfig(self, who: str) -> Path:
        return self.kube_dir / f"{who}.kubeconfig"


def _write(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, now: dt.datetime, *, ca: bool,
          usages: list[x509.ObjectIdentifier] | None = None,
          sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - BACKDATE).not_valid_after(now + CERT_TTL)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                        critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=True, content_commitment=False, key_encipherment=not ca,
             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
             encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False))
    if usages:
        b = b.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def write_pki(paths: Paths, server_ips: list[str]) -> None:
    """CA, serving certificate for `server_ips`, the client certificates of CREDENTIALS
    and the service-account key pair (all EC P-256)."""
    paths.pki.mkdir(parents=True, mode=0o700, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "netns-lab kubernetes CA")])
    ca = _cert(ca_name, ca_key, ca_name, ca_key, now, ca=True)
    _write(paths.ca_cert, ca.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.ca_key, _key_pem(ca_key), 0o600)

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in (*SERVICE_DNS, "localhost")]
    sans += [x509.IPAddress(ipaddress.ip_address(i))
             for i in (*server_ips, SERVICE_IP, "127.0.0.1")]
    cert = _cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
                 key, ca_name, ca_key, now, ca=False,
                 usages=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    _write(paths.serving_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write(paths.serving_key, _key_pem(key), 0o600)

    for c in CREDENTIALS:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([*(x509.NameAttribute(NameOID.ORGANIZATION_NAME, g)
                               for g in c.groups),
                             x509.NameAttribute(NameOID.COMMON_NAME, c.user)])
        cert = _cert(subject, key, ca_name, ca_key, now, ca=False,
                     usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
        _write(paths.client_cert(c.name), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        _write(paths.client_key(c.name), _key_pem(key), 0o600)

    sa = ec.generate_private_key(ec.SECP256R1())
    _write(paths.sa_key, _key_pem(sa), 0o600)
    _write(paths.sa_pub, sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo), 0o644)


def write_kubeconfig(paths: Paths, who: str, server_url: str, cluster: str) -> Path:
    """A kubeconfig for credential `who`, naming files (not embedding them): readable,
    and what `kubectl --kubeconfig` and kubernetes_asyncio both load."""
    doc = {
        "apiVersion": "v1", "kind": "Config", "preferences": {},
        "clusters": [{"name": cluster, "cluster": {
            "server": server_url, "certificate-authority": str(paths.ca_cert)}}],
        "users": [{"name": who, "user": {"client-certificate": str(paths.client_cert(who)),
                                         "client-key": str(paths.client_key(who))}}],
        "contexts": [{"name": f"{who}@{cluster}",
                      "context": {"cluster": cluster, "user": who}}],
        "current-context": f"{who}@{cluster}",
    }
    path = paths.kubeconfig(who)
    _write(path, yaml.safe_dump(doc, sort_keys=False).encode(), 0o600)
    return path
