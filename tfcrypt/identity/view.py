"""A verified view of etcd: raw values in, believed typed records out.

Rules:
- Every value is verified before it is believed; a rejected value never replaces the last
  verified record at that key (etcd is trusted for availability, not authenticity: a
  forged overwrite is ignored, a deletion is honoured).
- A rejection is counted by reason and logged once per key and revision (the value's
  mod_revision; a digest of the value when the caller has no revision): relists and trust
  changes verify it again but do not count it again; a new write, even of the same bytes,
  is a new revision and counts. What is remembered per key (`Rejection`) is the revision,
  the reason and a short escaped message, never value bytes, and it goes when the key is
  deleted, is missing from a relist or becomes believed. At most `max_remembered` keys
  are remembered: a rejection beyond that is still counted, every time it is seen, and
  counted again in `unremembered` (logged individually at debug only, after one warning),
  so an etcd full of junk costs bounded memory and a bounded log.
- Keys arrive printable (tfcrypt.text); a key or message is shown as an excerpt.
- Values that arrive before the trust bundle are kept raw and verified when it arrives;
  a bundle change re-verifies everything. A refused put keeps the last good record (a
  forged overwrite must not unseat the real one), but trust is different: a record that
  no longer verifies under the new bundle (its root was revoked: SPIRE's
  `localauthority x509 revoke`) stops being believed at once, and is counted, so its
  node's peer goes fail-closed instead of living on until its SVID expires.
- Each key family (`nodes/`, `workloads/`, `policies/`) says how its values are parsed and
  when the signer's chain must have been valid (tfcrypt.identity.verify.ChainTime); keys
  of no known family are ignored.
- Records of families checked at NOW become stale when their signer's chain expires
  (`expire`): a node that stopped re-signing is not believed for ever.
- Verifying is pure and can run away from the event loop: `check()` (safe in a worker
  thread: it reads only the families) verifies many values into a `Prepared`, and
  `replace_all`/`set_trust` given it only apply the results, in one synchronous step, so
  nobody ever sees a half-replaced view. A result is used only for the same value under
  the same trust material, and only while still valid at apply time; anything else is
  verified again on the spot. Epochs are always checked at apply time (they are state).
- Chains stored once (`chains/<sha256>`, version-2 envelopes, tfcrypt.identity.envelope)
  are held here by hash once their bytes match it; a value whose chain is not held is
  refused (`unknown_chain`) and verified again when the chain arrives. A chain value
  that is not what its key names is refused like any value (`key_mismatch`, `malformed`)
  and never held. Deleting a chain from etcd changes no believed record (its values were
  verified and have not changed): the chain stays held while a believed record uses it,
  so a deleted chain refuses only new writes that name it, as a missing one does.
  At most `MAX_CHAINS` are held; more are refused (`too_large`), so junk under `chains/`
  costs bounded memory.
- `check()` verifies signatures on every core (tfcrypt.identity.verify.verify_envelopes:
  cryptography checks them with the GIL released; the Python checks around them run on
  one core).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.authz import Authorizer
from tfcrypt.identity.bundles import TrustBundles
from tfcrypt.identity.envelope import (
    CHAINS,
    ChainNameMismatch,
    EnvelopeFormatError,
    decode_chain_value,
)
from tfcrypt.identity.epochs import EpochBook
from tfcrypt.identity.verify import ChainTime, Verified, verify_envelope, verify_envelopes
from tfcrypt.text import excerpt

log = logging.getLogger(__name__)

MAX_REMEMBERED = 10_000  # keys whose rejection is remembered so relists do not recount
MESSAGE = 240  # characters of a rejection's message kept and shown
MAX_CHAINS = 1024  # chains held by hash (one per writer SVID: a few in a healthy cluster)
PARALLEL_MIN = 2000  # below this many values, one thread (the pool costs more than it saves)
# refusals an ahead-of-time result may not stand for at apply time: time may have made
# the value good (not yet valid, issued in the future), or its chain may have arrived
_RECHECK_REASONS = frozenset({RejectReason.EXPIRED, RejectReason.INVALID_FIELD,
                              RejectReason.UNKNOWN_CHAIN})
Chains = dict[str, tuple[Any, ...]]  # sha256 hex -> certificates, leaf first


@dataclass(frozen=True, slots=True)
class Rejection:
    """What the view keeps of a refused value: which write it was, why, and a short
    escaped message (tfcrypt.text.excerpt) - never the value's bytes, so what a
    remembered key costs does not depend on what was written there."""

    mark: int | bytes  # the value's mod_revision, or a 16-byte digest of it
    reason: RejectReason
    message: str


class _Messages(Mapping[str, str]):
    """`last_rejection`: the message of each remembered rejection, by key (read-only)."""

    def __init__(self, rejected: Mapping[str, Rejection]) -> None:
        self._rejected = rejected

    def __getitem__(self, key: str) -> str:
        return self._rejected[key].message

    def __iter__(self) -> Iterator[str]:
        return iter(self._rejected)

    def __len__(self) -> int:
        return len(self._rejected)


@dataclass(frozen=True)
class Checked:
    """One value verified ahead of time: the record it gives, or why it was refused."""

    value: bytes
    verified: Verified | None = None
    record: Any = None
    rejected: Rejected | None = None


@dataclass(frozen=True)
class Prepared:
    """Values verified under one trust material, waiting to be applied."""

    bundles: TrustBundles
    authorizer: Authorizer
    results: Mapping[str, Checked]


@dataclass(frozen=True)
class Family:
    """How the values under one key prefix are read."""

    parse: Callable[[Verified], Any]
    chain_time: ChainTime = ChainTime.NOW


class _Records(dict[str, Any]):
    """The believed records, also kept per family prefix (`VerifiedView.of`). Only the
    writes the view makes are kept in step: item set, item delete, `pop`."""

    def __init__(self, prefixes: Mapping[str, object]) -> None:
        super().__init__()
        self.families: dict[str, dict[str, Any]] = {p: {} for p in prefixes}

    def _family(self, key: str) -> dict[str, Any] | None:
        return next((f for p, f in self.families.items() if key.startswith(p)), None)

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if (family := self._family(key)) is not None:
            family[key] = value

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        if (family := self._family(key)) is not None:
            family.pop(key, None)

    def update(self, *args: Any, **kwargs: Any) -> None:  # bench.fleet fills a view
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def pop(self, key: str, *default: Any) -> Any:
        if (family := self._family(key)) is not None:
            family.pop(key, None)
        return super().pop(key, *default)


class VerifiedView:
    """Believed records by key, and why anything else was refused."""

    def __init__(self, families: Mapping[str, Family],
                 on_reject: Callable[[str], None] | None = None,
                 on_unremembered: Callable[[], None] | None = None,
                 max_remembered: int = MAX_REMEMBERED) -> None:
        self._families = dict(families)
        self._on_reject = on_reject
        self._on_unremembered = on_unremembered
        self.max_remembered = max_remembered
        self.raw: dict[str, bytes] = {}
        self.revisions: dict[str, int] = {}  # mod_revision of raw values, when known
        self.records = _Records(self._families)
        self.not_after: dict[str, dt.datetime] = {}
        self.authority: dict[str, str] = {}  # believed key -> X509 authority of its signer
        self.rejections: Counter[str] = Counter()
        self.rejected: dict[str, Rejection] = {}
        self.unremembered = 0  # rejections counted without being remembered (memory full)
        self._full_warned = False
        self._believed_raw: dict[str, bytes] = {}
        self.chains: Chains = {}  # held chains by hash (module rules)
        self._chain_of: dict[str, str] = {}  # believed key -> the chain hash it names
        self._chain_users: Counter[str] = Counter()  # chain hash -> believed keys naming it
        self._epochs = EpochBook()
        self._bundles: TrustBundles | None = None
        self._authorizer: Authorizer | None = None

    @property
    def last_rejection(self) -> Mapping[str, str]:
        """Why each remembered key was refused (an escaped excerpt)."""
        return _Messages(self.rejected)

    def of(self, prefix: str) -> dict[str, Any]:
        """Believed records under `prefix`, by key (a copy: O(that family) for a family's
        prefix, where scanning every key was most of a one-change reconcile at 5,000
        nodes, bench.fleet F2)."""
        family = self.records.families.get(prefix)
        if family is not None:
            return dict(family)
        return {k: v for k, v in self.records.items() if k.startswith(prefix)}

    def epoch(self, key: str) -> int | None:
        """The highest epoch believed for `key` (remembered across deletions)."""
        return self._epochs.highest(key)

    @property
    def epochs(self) -> EpochBook:
        """The rollback floors, for the agent to persist and restore (tfcrypt/agent/
        epochstore.py); restore before the first listing, or the first value read for a
        key sets its floor again."""
        return self._epochs

    def rollbacks(self, prefix: str) -> dict[str, str]:
        """Keys under `prefix` whose value in etcd is refused as older than one already
        accepted (a replayed or restored record), with the remembered message."""
        return {k: r.message for k, r in self.rejected.items()
                if r.reason is RejectReason.ROLLBACK and k.startswith(prefix)}

    def _family(self, key: str) -> Family | None:
        return next((f for p, f in self._families.items() if key.startswith(p)), None)

    def _known(self, key: str) -> bool:
        """A key this view reads: a family's, or a stored chain."""
        return key.startswith(CHAINS) or self._family(key) is not None

    def trust_changes(self, bundles: TrustBundles, authorizer: Authorizer) -> bool:
        return bundles != self._bundles or authorizer != self._authorizer

    def set_trust(self, bundles: TrustBundles, authorizer: Authorizer,
                  now: dt.datetime, prepared: Prepared | None = None) -> bool:
        """Install new trust material; True if the believed records changed."""
        if not self.trust_changes(bundles, authorizer):
            return False
        self._bundles, self._authorizer = bundles, authorizer
        before = dict(self.records)
        believed, self._believed_raw = self._believed_raw, {}
        for key, value in list(self.raw.items()):
            self._verify(key, value, now, prepared)
        dropped = [k for k in list(self.records) if k not in self._believed_raw
                   and not self._still_trusted(k, believed.get(k), now)]
        if dropped:
            log.warning("%d record(s) no longer believed: they do not verify under the new "
                        "trust bundle (a revoked CA?): %s%s", len(dropped),
                        ", ".join(excerpt(k) for k in dropped[:5]),
                        " ..." if len(dropped) > 5 else "")
        return before != self.records

    def _still_trusted(self, key: str, value: bytes | None, now: dt.datetime) -> bool:
        """`key`'s latest value was refused under the new trust. Keep the record believed
        before only if that value still verifies (a refused overwrite was sitting in
        etcd); otherwise it goes: what its signer's CA vouched for, the bundle no longer
        does. Its refusal was counted when the latest value was verified."""
        family = self._family(key)
        if value is not None and family is not None and value != self.raw.get(key):
            assert self._bundles is not None and self._authorizer is not None
            checked = _checked(key, value, family, self._bundles, self._authorizer, now,
                               self.chains)
            if checked.verified is not None:
                self._believe(key, value, family, checked)
                return True
        self.records.pop(key, None)
        self.not_after.pop(key, None)
        self.authority.pop(key, None)
        self._name_chain(key, None)
        return False

    def pending(self, items: Mapping[str, bytes]) -> dict[str, bytes]:
        """The values of `items` that `replace_all` would verify (new or changed)."""
        return {k: v for k, v in items.items()
                if self._believed_raw.get(k) != v and self._known(k)}

    def check(self, items: Mapping[str, bytes], now: dt.datetime,
              bundles: TrustBundles | None = None,
              authorizer: Authorizer | None = None,
              workers: int | None = None) -> Prepared | None:
        """Verify `items` under the given (default: current) trust, changing nothing.

        Reads only the families and the arguments, so a worker thread may run it while
        the event loop goes on; None when there is no trust material yet.
        """
        bundles = bundles if bundles is not None else self._bundles
        authorizer = authorizer if authorizer is not None else self._authorizer
        if bundles is None or authorizer is None:
            return None
        chain_results = {k: _checked_chain(k, v) for k, v in items.items()
                         if k.startswith(CHAINS)}
        chains = dict(self.chains)
        chains.update((k.removeprefix(CHAINS), c.record) for k, c in chain_results.items()
                      if c.record is not None)
        work = [(key, value, family) for key, value in items.items()
                if (family := self._family(key)) is not None]
        if workers is None:  # every core, for a batch worth a thread pool
            workers = min(os.cpu_count() or 1, 8) if len(work) >= PARALLEL_MIN else 1
        outcomes = verify_envelopes([(k, v, f.chain_time) for k, v, f in work],
                                    bundles=bundles, authorizer=authorizer, now=now,
                                    chains=chains, workers=workers)
        results = {key: _parsed(value, family, outcome)
                   for (key, value, family), outcome in zip(work, outcomes, strict=True)}
        return Prepared(bundles, authorizer, results)

    def replace_all(self, items: Mapping[str, bytes], now: dt.datetime,
                    prepared: Prepared | None = None,
                    revisions: Mapping[str, int] | None = None) -> bool:
        """A full list from etcd: keys missing from it are gone. `revisions` (each key's
        mod_revision) makes rejections count once per write, not once per value."""
        before = dict(self.records)
        known = {k: v for k, v in items.items() if self._known(k)}
        for key in (set(self.raw) | set(self.rejected)) - set(known):
            self._forget(key)
        # chains first, so the records naming them find them (they also sort first)
        for key, value in sorted(known.items(), key=lambda kv: not kv[0].startswith(CHAINS)):
            self.raw[key] = value
            self._set_revision(key, None if revisions is None else revisions.get(key))
            if self._believed_raw.get(key) != value:
                self._verify(key, value, now, prepared)
        self._drop_unused_chains()
        return before != self.records

    def put(self, key: str, value: bytes, now: dt.datetime,
            revision: int | None = None) -> bool:
        """A change from etcd; `revision` is its mod_revision (see `replace_all`)."""
        if not self._known(key):
            return False
        if key.startswith(CHAINS):
            return self._put_chain(key, value, now, revision)
        before = self.records.get(key)
        self.raw[key] = value
        self._set_revision(key, revision)
        self._verify(key, value, now)
        return before != self.records.get(key)

    def _put_chain(self, key: str, value: bytes, now: dt.datetime,
                   revision: int | None) -> bool:
        """A chain arrived: the values refused for want of it are verified again."""
        self.raw[key] = value
        self._set_revision(key, revision)
        if self._believed_raw.get(key) == value:
            return False
        self._verify(key, value, now)
        ref = key.removeprefix(CHAINS)
        if ref not in self.chains:
            return False
        before = dict(self.records)
        needle = ref.encode()  # remembered or not, every refused value naming it
        waiting = [k for k, v in self.raw.items() if self._believed_raw.get(k) != v
                   and needle in v and not k.startswith(CHAINS)]
        for k in waiting:
            self._verify(k, self.raw[k], now)
        return before != self.records

    def _set_revision(self, key: str, revision: int | None) -> None:
        if revision is None:
            self.revisions.pop(key, None)
        else:
            self.revisions[key] = revision

    def delete(self, key: str) -> bool:
        existed = key in self.records
        self._forget(key)
        if key.startswith(CHAINS):
            self._drop_unused_chains()
            return False  # no believed record changes (module rules)
        return existed

    def chain_ref_of(self, key: str) -> str | None:
        """The stored chain the believed value at `key` names (None: attached, version 1)."""
        return self._chain_of.get(key)

    def chains_missing(self) -> dict[str, tuple[Any, ...]]:
        """Held chains that believed values name but etcd no longer holds, by hash: what
        a writer puts back (`chain_value` of the certificates gives the same bytes)."""
        return {r: self.chains[r] for r in self._chain_users
                if CHAINS + r not in self._believed_raw and r in self.chains}

    def _drop_unused_chains(self) -> None:
        """Held chains neither in etcd nor named by a believed record are let go."""
        for ref in [r for r in self.chains if not self._chain_users[r]
                    and CHAINS + r not in self._believed_raw]:
            del self.chains[ref]

    def _name_chain(self, key: str, ref: str | None) -> None:
        """Record which held chain the believed value at `key` names (None: none)."""
        old = self._chain_of.pop(key, None)
        if ref is not None:
            self._chain_of[key] = ref
            self._chain_users[ref] += 1
        if old is not None:
            self._chain_users[old] -= 1
            if not self._chain_users[old]:
                del self._chain_users[old]
                if CHAINS + old not in self._believed_raw:
                    self.chains.pop(old, None)

    def expire(self, now: dt.datetime) -> bool:
        """Drop records whose signer's chain has expired (stale, not re-signed in time)."""
        stale = [k for k, t in self.not_after.items() if t <= now]
        for key in stale:
            log.warning("%s is stale: its signer's SVID expired", key)
            self.records.pop(key, None)
            self.not_after.pop(key, None)
            self.authority.pop(key, None)
            self._believed_raw.pop(key, None)
            self._name_chain(key, None)
        return bool(stale)

    def _forget(self, key: str) -> None:
        self._name_chain(key, None)
        self.raw.pop(key, None)
        self.revisions.pop(key, None)
        self.rejected.pop(key, None)
        self._believed_raw.pop(key, None)
        self.records.pop(key, None)
        self.not_after.pop(key, None)
        self.authority.pop(key, None)

    def _prepared(self, key: str, value: bytes, family: Family, now: dt.datetime,
                  prepared: Prepared | None) -> Checked | None:
        """The ahead-of-time result for this value, if it still holds now."""
        if prepared is None or prepared.bundles != self._bundles or (
                prepared.authorizer != self._authorizer):
            return None
        checked = prepared.results.get(key)
        if checked is None or checked.value != value:
            return None
        if checked.verified is not None:
            stale = family.chain_time is ChainTime.NOW and checked.verified.not_after <= now
            return None if stale else checked
        assert checked.rejected is not None
        return None if checked.rejected.reason in _RECHECK_REASONS else checked

    def _verify(self, key: str, value: bytes, now: dt.datetime,
                prepared: Prepared | None = None) -> None:
        if key.startswith(CHAINS):
            self._hold_chain(key, value)
            return
        family = self._family(key)
        if family is None or self._bundles is None or self._authorizer is None:
            return
        checked = self._prepared(key, value, family, now, prepared) or _checked(
            key, value, family, self._bundles, self._authorizer, now, self.chains)
        verified = checked.verified
        try:
            if checked.rejected is not None:
                raise checked.rejected
            assert verified is not None
            self._epochs.check(verified)
        except Rejected as rej:
            self._reject(key, value, rej)
            return
        self._epochs.accept(verified)
        self.rejected.pop(key, None)
        self._believe(key, value, family, checked)

    def _believe(self, key: str, value: bytes, family: Family, checked: Checked) -> None:
        verified = checked.verified
        assert verified is not None
        self.records[key] = checked.record
        if family.chain_time is ChainTime.NOW:
            self.not_after[key] = verified.not_after
        self.authority[key] = verified.authority
        self._believed_raw[key] = value
        self._name_chain(key, verified.chain_ref)

    def _hold_chain(self, key: str, value: bytes) -> None:
        """Hold the chain stored at `key` if its bytes are what its key names (no trust
        material needed: the certificates are checked with each value that names them)."""
        ref = key.removeprefix(CHAINS)
        checked = _checked_chain(key, value)
        if checked.rejected is None and ref not in self.chains and (
                len(self.chains) >= MAX_CHAINS):
            checked = Checked(value, rejected=Rejected(
                RejectReason.TOO_LARGE, f"{MAX_CHAINS} chains are held, the bound"))
        if checked.rejected is not None:
            self._reject(key, value, checked.rejected)
            return
        self.rejected.pop(key, None)
        self.chains[ref] = checked.record
        self._believed_raw[key] = value

    def _reject(self, key: str, value: bytes, rej: Rejected) -> None:
        """Count and log a refused write once, however often it is relisted (module rules)."""
        revision = self.revisions.get(key)
        mark: int | bytes = (revision if revision is not None
                             else hashlib.blake2b(value, digest_size=16).digest())
        rejection = Rejection(mark, rej.reason, excerpt(str(rej), MESSAGE))
        known = self.rejected.get(key)
        if known is not None and known.mark == mark:
            self.rejected[key] = rejection  # the same write, refused again: the latest why
            return
        shown = excerpt(key)
        self.rejections[rej.reason.value] += 1
        if self._on_reject:
            self._on_reject(rej.reason.value)
        if known is not None or len(self.rejected) < self.max_remembered:
            self.rejected[key] = rejection
            if len(self.rejected) < self.max_remembered:
                self._full_warned = False  # warn again if it fills up again
            log.warning("rejected %s: %s", shown, rejection.message)
            return
        self.unremembered += 1
        if self._on_unremembered:
            self._on_unremembered()
        if not self._full_warned:
            self._full_warned = True
            log.warning("rejected %s: %s; %d rejected keys are remembered, the bound: "
                        "further rejections are counted each time they are seen and logged "
                        "at debug level only", shown, rejection.message, len(self.rejected))
        else:
            log.debug("rejected %s (not remembered): %s", shown, rejection.message)


def _checked_chain(key: str, value: bytes) -> Checked:
    """A chain value's certificates as `Checked.record`, or why it is refused."""
    try:
        return Checked(value, record=decode_chain_value(key.removeprefix(CHAINS), value))
    except EnvelopeFormatError as e:
        reason = (RejectReason.KEY_MISMATCH if isinstance(e, ChainNameMismatch)
                  else RejectReason.MALFORMED)
        return Checked(value, rejected=Rejected(reason, f"chain value: {e}"))


def _parsed(value: bytes, family: Family, outcome: Verified | Rejected) -> Checked:
    if isinstance(outcome, Rejected):
        return Checked(value, rejected=outcome)
    try:
        return Checked(value, outcome, family.parse(outcome))
    except Rejected as rej:
        return Checked(value, rejected=rej)


def _checked(key: str, value: bytes, family: Family, bundles: TrustBundles,
             authorizer: Authorizer, now: dt.datetime,
             chains: Chains | None = None) -> Checked:
    """Verify and parse one value (pure: no view state, safe in a worker thread)."""
    try:
        verified = verify_envelope(value, key, bundles=bundles, authorizer=authorizer, now=now,
                                   chain_time=family.chain_time, chains=chains)
        return Checked(value, verified, family.parse(verified))
    except Rejected as rej:
        return Checked(value, rejected=rej)
