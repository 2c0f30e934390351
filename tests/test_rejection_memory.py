"""Hostile keys and values in the verified view: counted once, remembered in bounded
memory, shown escaped (issue #14, items 1, 8 and 9).

What a user notices: a key of any bytes is a counted rejection and never an exception;
relists and trust changes do not inflate `tfcrypt_records_rejected_total`; deleting junk
frees what the agent remembered of it; a log line never carries a raw control or bidi
character.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_verified_view import NOW, TD, Signers

from tfcrypt.agent.logs import TextFormatter
from tfcrypt.identity import Authorizer, TrustBundles
from tfcrypt.identity.view import MESSAGE, Family, Rejection, VerifiedView
from tfcrypt.model.node import NodeRecord
from tfcrypt.registry.keys import Keyspace
from tfcrypt.text import escape_key, excerpt, unescape_key

RLO = "\u202e"
JUNK = b"{not an envelope"


def trusting(s: Signers, **kw: int) -> tuple[VerifiedView, list[str], list[None]]:
    counted: list[str] = []
    overflow: list[None] = []
    view = VerifiedView({"nodes/": Family(NodeRecord.from_verified)},
                        on_reject=counted.append,
                        on_unremembered=lambda: overflow.append(None), **kw)
    view.set_trust(TrustBundles({TD: [s.ca.cert]}), Authorizer(TD), NOW)
    return view, counted, overflow


@pytest.fixture(scope="module")
def signers() -> Signers:
    return Signers()


# -- keys of any bytes --------------------------------------------------------------

@given(st.binary(max_size=64))
def test_every_key_is_shown_printable_and_round_trips(raw: bytes) -> None:
    keys = Keyspace("/tfcrypt/v1")
    rel = keys.relative(keys.root + raw)
    assert rel.isprintable()
    rel.encode("utf-8")  # strict: what logging, json and status.json writers do
    assert unescape_key(rel) == raw
    if raw and not raw.startswith(b"/"):
        assert keys.key(rel) == keys.root + raw


@pytest.mark.parametrize(("raw", "shown"), [
    (b"nodes/n1", "nodes/n1"),
    (b"nodes/\xff\xfe", "nodes/\\xff\\xfe"),
    (f"nodes/{RLO}1n".encode(), "nodes/\\u202e1n"),
    (b"nodes/a\\xff", "nodes/a\\\\xff"),  # a literal backslash: no confusion with a byte
    (b"nodes/a\nb\x1b[31m", "nodes/a\\x0ab\\x1b[31m"),
    ("nodes/\u0085".encode(), "nodes/\\u0085"),  # a C1 control is a character, not a byte
])
def test_escaped_key_forms(raw: bytes, shown: str) -> None:
    assert escape_key(raw) == shown
    assert unescape_key(shown) == raw


def test_a_non_utf8_key_is_a_counted_rejection_not_an_exception(
        signers: Signers, caplog: pytest.LogCaptureFixture) -> None:
    """On main the view encoded the key strictly to remember it: UnicodeEncodeError, and
    every agent's etcd follower (so the agent) died."""
    keys = Keyspace("/tfcrypt/v1")
    view, counted, _ = trusting(signers)
    bad, rlo = keys.relative(keys.root + b"nodes/\xff"), f"nodes/{RLO}evil"
    with caplog.at_level(logging.WARNING, "tfcrypt.identity.view"):
        view.replace_all({bad: JUNK, rlo: signers.record("n2"), "nodes/n2":
                          signers.record("n2")}, NOW, revisions={bad: 7, rlo: 8, "nodes/n2": 9})
    assert set(view.records) == {"nodes/n2"}
    assert view.rejections == {"malformed": 1, "key_mismatch": 1} and len(counted) == 2
    text = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert "nodes/\\xff" in text and "nodes/\\u202eevil" in text
    assert RLO not in text and "\udcff" not in text
    assert all(line.isprintable() for line in text.splitlines())


def test_log_lines_escape_control_and_bidi_characters_whatever_their_source() -> None:
    record = logging.LogRecord("t", logging.WARNING, __file__, 1, "got %s", (
        f"a{RLO}b\x1b[2J\udcff\u2028",), None)
    line = TextFormatter().format(record)
    assert line.endswith("got a\\u202eb\\x1b[2J\\xff\\u2028")
    line.encode("utf-8")


def test_huge_keys_and_values_give_short_messages(signers: Signers,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    view, _, _ = trusting(signers)
    def envelope(version: bytes) -> bytes:
        return b'{"v": "' + version + b'", "payload": "", "sig": "", "chain": []}'

    with caplog.at_level(logging.WARNING, "tfcrypt.identity.view"):
        view.put("nodes/" + "k" * 100_000, envelope(b"A" * 1_000_000), NOW, revision=3)
        view.put("nodes/n9", envelope(RLO.encode() * 20_000), NOW, revision=4)
    assert view.rejections == {"too_large": 1, "malformed": 1}
    assert "\\u202e" in view.last_rejection["nodes/n9"]
    assert all(len(m) < MESSAGE + 40 for m in view.last_rejection.values())
    assert all(len(r.getMessage()) < 500 for r in caplog.records)


# -- counted once per key and revision -----------------------------------------------

def test_relists_and_trust_changes_do_not_count_a_write_again(signers: Signers) -> None:
    """On main each relist counted every rejected value again once more than 10,000
    were remembered; here 20,000 junk keys relisted three times count 20,000."""
    view, counted, overflow = trusting(signers, max_remembered=20_000)
    junk = {f"nodes/j{i}": JUNK + str(i).encode() for i in range(20_000)}
    revisions = {k: 100 + i for i, k in enumerate(junk)}
    for _ in range(3):
        view.replace_all(junk, NOW, revisions=revisions)
    view.set_trust(TrustBundles({TD: [signers.ca.cert, signers.rogue.cert]}), Authorizer(TD),
                   NOW)
    assert view.rejections == {"malformed": 20_000} and len(counted) == 20_000
    assert not overflow and view.unremembered == 0


def test_a_new_write_counts_even_with_the_same_bytes(signers: Signers) -> None:
    view, counted, _ = trusting(signers)
    view.put("nodes/x", JUNK, NOW, revision=5)
    view.replace_all({"nodes/x": JUNK}, NOW, revisions={"nodes/x": 5})
    view.put("nodes/x", JUNK, NOW, revision=6)  # written again: a new event
    view.replace_all({"nodes/x": JUNK}, NOW, revisions={"nodes/x": 6})
    assert view.rejections == {"malformed": 2} and len(counted) == 2
    assert view.rejected["nodes/x"].mark == 6


def test_without_revisions_a_value_is_counted_once_by_its_content(signers: Signers) -> None:
    """The controller's one-shot views pass no revisions: the value's digest stands in."""
    view, counted, _ = trusting(signers)
    for _ in range(3):
        view.replace_all({"nodes/x": JUNK}, NOW)
    view.put("nodes/x", JUNK + b"!", NOW)
    assert len(counted) == 2


# -- bounded memory --------------------------------------------------------------------

def test_remembered_state_holds_no_value_bytes(signers: Signers) -> None:
    view, _, _ = trusting(signers)
    small, huge = b"\xff" * 10, b"\xff" * 1_000_000
    view.put("nodes/a", small, NOW, revision=1)
    view.put("nodes/b", huge, NOW, revision=2)
    a, b = view.rejected["nodes/a"], view.rejected["nodes/b"]
    assert isinstance(a, Rejection) and not hasattr(a, "__dict__")
    for memo in (a, b):
        fields = [getattr(memo, f.name) for f in dataclasses.fields(memo)]
        assert not any(isinstance(v, bytes | bytearray | memoryview) for v in fields)
        assert sum(sys.getsizeof(v) for v in fields) < 1_000
    assert len(repr(b)) < 500


def test_the_bound_on_remembered_keys_is_hard_and_its_overflow_counted(
        signers: Signers, caplog: pytest.LogCaptureFixture) -> None:
    view, counted, overflow = trusting(signers, max_remembered=100)
    junk = {f"nodes/j{i:03d}": JUNK for i in range(150)}
    revisions = dict.fromkeys(junk, 9)
    with caplog.at_level(logging.DEBUG, "tfcrypt.identity.view"):
        view.replace_all(junk, NOW, revisions=revisions)
    assert len(view.rejected) == 100
    assert view.unremembered == len(overflow) == 50 and len(counted) == 150
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 101  # 100 remembered, then one "memory full"
    assert "counted each time they are seen" in warnings[-1].getMessage()
    # documented behaviour: what is not remembered is counted again at every relist
    view.replace_all(junk, NOW, revisions=revisions)
    assert len(view.rejected) == 100 and view.unremembered == 100 and len(counted) == 200


def test_deleting_junk_frees_what_was_remembered(signers: Signers) -> None:
    view, counted, _ = trusting(signers, max_remembered=100)
    junk = {f"nodes/j{i}": JUNK for i in range(100)}
    view.replace_all(junk, NOW, revisions=dict.fromkeys(junk, 3))
    assert len(view.rejected) == 100
    for key in list(junk)[:40]:
        view.delete(key)
    assert len(view.rejected) == 60 and len(view.raw) == 60
    view.replace_all({}, NOW)  # the rest missing from a relist
    assert view.rejected == {} and view.raw == {} and view.revisions == {}
    # room again: a new junk key is remembered, and a relist does not count it twice
    view.replace_all({"nodes/new": JUNK}, NOW, revisions={"nodes/new": 11})
    view.replace_all({"nodes/new": JUNK}, NOW, revisions={"nodes/new": 11})
    assert len(counted) == 101 and view.unremembered == 0


def test_a_key_that_becomes_believed_is_forgotten_as_rejected(signers: Signers) -> None:
    view, _, _ = trusting(signers)
    view.put("nodes/n2", JUNK, NOW, revision=1)
    assert "nodes/n2" in view.rejected
    view.put("nodes/n2", signers.record("n2"), NOW, revision=2)
    assert "nodes/n2" in view.records and view.rejected == {}


def test_excerpt_is_short_and_escaped() -> None:
    assert excerpt("a" * 500) == "a" * 120 + "... (380 more characters)"
    assert excerpt(f"{RLO}\x00") == "\\u202e\\x00"


@pytest.mark.parametrize("rel_key", ["workloads/n1/a\\q", "nodes/\\x4", "nodes/\\ud800", ""])
def test_a_key_that_names_no_etcd_key_is_a_clear_error(rel_key: str) -> None:
    """CLI input such as `tfcrypt workload delete 'a\\q'`: a one-line TfcryptError (the
    CLI prints it), not a traceback."""
    from tfcrypt.errors import TfcryptError
    with pytest.raises(TfcryptError, match="key"):
        Keyspace("/tfcrypt/v1").key(rel_key)
