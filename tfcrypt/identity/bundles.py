"""Trust bundles, one store per trust domain.

Rules:
- A chain is validated only against the bundle of the trust domain its leaf claims. A CA
  of another trust domain that we also trust must not be able to vouch for our IDs, so
  bundles are never pooled into one store.
- Immutable: a bundle update from the Workload API produces a new TrustBundles value, and
  "nothing changed" is `==`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


class TrustBundles(Mapping[str, tuple[x509.Certificate, ...]]):
    """Trust domain name -> its CA certificates (sorted by DER, so equal sets compare equal)."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: Mapping[str, Iterable[x509.Certificate]] | None = None) -> None:
        frozen: dict[str, tuple[x509.Certificate, ...]] = {}
        for td, cas in (bundles or {}).items():
            frozen[td] = tuple(sorted(set(cas), key=_der))
        self._bundles = frozen

    @classmethod
    def from_spiffe(cls, bundle_set: Any) -> TrustBundles:
        """From py-spiffe's X509BundleSet (its `.bundles`, each with `.trust_domain.name`)."""
        return cls({b.trust_domain.name: b.x509_authorities for b in bundle_set.bundles})

    def __getitem__(self, trust_domain: str) -> tuple[x509.Certificate, ...]:
        return self._bundles[trust_domain]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._bundles))

    def __len__(self) -> int:
        return len(self._bundles)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TrustBundles):
            return self._bundles == other._bundles
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._bundles.items()))

    def __repr__(self) -> str:
        inner = ", ".join(f"{td}: {len(cas)} CA" for td, cas in sorted(self._bundles.items()))
        return f"TrustBundles({{{inner}}})"
