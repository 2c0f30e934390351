"""The agent's verified view of etcd: raw values in, believed node records out.

Rules:
- Every value is verified before it is believed; a rejected value is counted by reason and
  logged once per distinct value, and never replaces the last verified record at that key
  (etcd is trusted for availability, not authenticity: a forged overwrite is ignored, a
  deletion is honoured).
- Values that arrive before the trust bundle are kept raw and verified when it arrives;
  a bundle change re-verifies everything.
- Keys outside the families this view knows are ignored here (policies and workloads
  are read by their own views).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping

from tfcrypt.errors import Rejected
from tfcrypt.identity import Authorizer, EpochBook, TrustBundles, verify_envelope
from tfcrypt.model.node import NodeRecord

log = logging.getLogger(__name__)

NODES = "nodes/"
MAX_REMEMBERED = 10_000  # distinct rejected values remembered so relists do not recount


class NodeView:
    """Verified NodeRecords by node name, and why anything else was refused."""

    def __init__(self, on_reject: Callable[[str], None] | None = None) -> None:
        self._on_reject = on_reject
        self.raw: dict[str, bytes] = {}
        self.records: dict[str, NodeRecord] = {}
        self.not_after: dict[str, dt.datetime] = {}
        self.rejections: Counter[str] = Counter()
        self.last_rejection: dict[str, str] = {}
        self._believed_raw: dict[str, bytes] = {}
        self._logged: set[bytes] = set()
        self._epochs = EpochBook()
        self._bundles: TrustBundles | None = None
        self._authorizer: Authorizer | None = None

    def set_trust(self, bundles: TrustBundles, authorizer: Authorizer,
                  now: dt.datetime) -> bool:
        """Install new trust material; True if the believed records changed."""
        if bundles == self._bundles and authorizer == self._authorizer:
            return False
        self._bundles, self._authorizer = bundles, authorizer
        before = dict(self.records)
        self._believed_raw.clear()
        for key, value in list(self.raw.items()):
            self._verify(key, value, now)
        return before != self.records

    def replace_all(self, items: Mapping[str, bytes], now: dt.datetime) -> bool:
        """A full list from etcd: keys missing from it are gone."""
        before = dict(self.records)
        nodes = {k: v for k, v in items.items() if k.startswith(NODES)}
        for key in set(self.raw) - set(nodes):
            self._forget(key)
        for key, value in nodes.items():
            self.raw[key] = value
            if self._believed_raw.get(key) != value:
                self._verify(key, value, now)
        return before != self.records

    def put(self, key: str, value: bytes, now: dt.datetime) -> bool:
        if not key.startswith(NODES):
            return False
        before = self.records.get(key[len(NODES):])
        self.raw[key] = value
        self._verify(key, value, now)
        return before != self.records.get(key[len(NODES):])

    def delete(self, key: str) -> bool:
        if not key.startswith(NODES):
            return False
        existed = key[len(NODES):] in self.records
        self._forget(key)
        return existed

    def expire(self, now: dt.datetime) -> bool:
        """Drop records whose signer's chain has expired (stale, not re-signed in time)."""
        stale = [n for n, t in self.not_after.items() if t <= now]
        for node in stale:
            log.warning("node record nodes/%s is stale: its signer's SVID expired", node)
            self.records.pop(node, None)
            self.not_after.pop(node, None)
            self._believed_raw.pop(NODES + node, None)
        return bool(stale)

    def _forget(self, key: str) -> None:
        node = key[len(NODES):]
        self.raw.pop(key, None)
        self._believed_raw.pop(key, None)
        self.records.pop(node, None)
        self.not_after.pop(node, None)

    def _verify(self, key: str, value: bytes, now: dt.datetime) -> None:
        if self._bundles is None or self._authorizer is None:
            return
        try:
            verified = verify_envelope(value, key, bundles=self._bundles,
                                       authorizer=self._authorizer, now=now)
            record = NodeRecord.from_verified(verified)
            self._epochs.check(verified)
        except Rejected as rej:
            self._reject(key, value, rej)
            return
        self._epochs.accept(verified)
        self.records[record.node] = record
        self.not_after[record.node] = verified.not_after
        self._believed_raw[key] = value

    def _reject(self, key: str, value: bytes, rej: Rejected) -> None:
        """Count and log each distinct refused value once, however often it is relisted."""
        self.last_rejection[key] = str(rej)
        digest = hashlib.sha256(key.encode() + b"\0" + value).digest()
        if digest in self._logged:
            return
        if len(self._logged) >= MAX_REMEMBERED:
            self._logged.clear()
        self._logged.add(digest)
        self.rejections[rej.reason.value] += 1
        if self._on_reject:
            self._on_reject(rej.reason.value)
        log.warning("rejected %s: %s", key, rej)
