"""Rollback floors that survive a restart: the epoch book, its file, and what a reader
that restarts believes (issue 14 item 3). Pure: no root, no lab."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from test_verified_view import Signers

from tfcrypt import status_view
from tfcrypt.agent import epochstore
from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.epochs import EpochBook
from tfcrypt.identity.verify import Verified

NOW = dt.datetime.now(dt.UTC)


def verified(key: str, epoch: int) -> Verified:
    return Verified(key=key, kind="node", epoch=epoch, issued_at=0, payload={},
                    signer="spiffe://lab.tfcrypt/tfcrypt/node/n2", not_after=NOW)


def test_restored_floors_refuse_an_older_epoch_and_a_higher_one_here_stays() -> None:
    book = EpochBook()
    book.accept(verified("nodes/n3", 9))
    book.restore({"nodes/n2": 7, "nodes/n3": 4})
    assert book.snapshot() == {"nodes/n2": 7, "nodes/n3": 9}
    with pytest.raises(Rejected) as err:
        book.check(verified("nodes/n2", 6))
    assert err.value.reason is RejectReason.ROLLBACK
    book.check(verified("nodes/n2", 7))  # equal: a re-signed record


def test_the_generation_moves_only_when_a_floor_rises() -> None:
    book = EpochBook()
    book.accept(verified("nodes/n2", 3))
    g = book.generation
    book.accept(verified("nodes/n2", 3))
    assert book.generation == g
    book.accept(verified("nodes/n2", 4))
    assert book.generation > g


def test_the_book_is_bounded_and_forgets_the_least_recently_raised_first() -> None:
    book = EpochBook(max_keys=3)
    for i in range(3):
        book.accept(verified(f"nodes/n{i}", 1))
    book.accept(verified("nodes/n0", 2))       # n0 raised again: now the most recent
    book.accept(verified("nodes/n9", 1))
    assert list(book.snapshot()) == ["nodes/n2", "nodes/n0", "nodes/n9"]


def test_the_file_round_trips_in_order_and_is_0600(tmp_path: Path) -> None:
    floors = {"nodes/n2": 7, "workloads/n1/w1": 1_700_000_000, "nodes/n1": 0}
    epochstore.save(tmp_path, floors)
    path = tmp_path / epochstore.EPOCHS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = epochstore.load(tmp_path)
    assert loaded.problem is None and list(loaded.floors.items()) == list(floors.items())
    assert [p.name for p in tmp_path.iterdir()] == [epochstore.EPOCHS_FILE]  # no temporary


def test_a_missing_file_is_a_first_start(tmp_path: Path) -> None:
    assert epochstore.load(tmp_path) == epochstore.Loaded()


@pytest.mark.parametrize("content, why", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe garbage", "not JSON"),
    (b'{"version": 2, "epochs": {}}', "not a version 1"),
    (b'[1, 2]', "not a version 1"),
    (b'{"version": 1, "epochs": [1]}', "not a mapping"),
    (b'{"version": 1, "epochs": {"nodes/n2": "7"}}', "not an integer"),
    (b'{"version": 1, "epochs": {"nodes/n2": true}}', "not an integer"),
    (b'{"version": 1, "epochs": {"nodes/n2": -1}}', "not an integer"),
    (b'{"version": 1, "epochs": {"": 1}}', "not a record key"),
    (b'{"version": 1, "epochs": {"nodes/\\u202en2": 1}}', "not a record key"),
])
def test_a_corrupt_file_is_a_one_line_problem_moved_aside_and_no_floors(
        tmp_path: Path, content: bytes, why: str) -> None:
    (tmp_path / epochstore.EPOCHS_FILE).write_bytes(content)
    loaded = epochstore.load(tmp_path)
    assert loaded.floors == {}
    assert loaded.problem is not None and why in loaded.problem
    assert str(tmp_path / epochstore.EPOCHS_FILE) in loaded.problem
    assert "\n" not in loaded.problem and "\u202e" not in loaded.problem
    assert loaded.moved_to is not None and loaded.moved_to.read_bytes() == content
    assert not (tmp_path / epochstore.EPOCHS_FILE).exists()


def test_an_oversized_file_is_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(epochstore, "MAX_BYTES", 64)
    epochstore.save(tmp_path, {f"nodes/n{i}": i for i in range(20)})
    loaded = epochstore.load(tmp_path)
    assert loaded.floors == {} and "larger than 64 bytes" in (loaded.problem or "")


def test_an_unreadable_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    (tmp_path / epochstore.EPOCHS_FILE).mkdir()  # a directory where the file should be
    loaded = epochstore.load(tmp_path)
    assert loaded.floors == {} and "unreadable" in (loaded.problem or "")


def test_a_restarted_reader_refuses_the_replayed_record_of_a_rotated_key(
        tmp_path: Path) -> None:
    """B rotates (epoch 5 -> 6); the reader saves its floors; B's epoch-5 record is written
    back; a new view (the restarted reader) restored from the file refuses it."""
    s = Signers()
    old, new = s.record("n2", epoch=5, key_byte=5), s.record("n2", epoch=6, key_byte=6)
    before = s.trusting()
    before.put("nodes/n2", old, NOW)
    before.put("nodes/n2", new, NOW)
    epochstore.save(tmp_path, before.epochs.snapshot())

    forgetful = s.trusting()   # what a restart did before the floors were kept
    forgetful.replace_all({"nodes/n2": old}, NOW, revisions={"nodes/n2": 9})
    assert forgetful.records["nodes/n2"].epoch == 5

    after = s.trusting()
    after.epochs.restore(epochstore.load(tmp_path).floors)
    after.replace_all({"nodes/n2": old}, NOW, revisions={"nodes/n2": 9})
    assert "nodes/n2" not in after.records
    assert after.rejections == {"rollback": 1}
    assert list(after.rollbacks("nodes/")) == ["nodes/n2"]
    after.put("nodes/n2", new, NOW, revision=10)    # B puts its record back
    assert after.records["nodes/n2"].epoch == 6 and not after.rollbacks("nodes/")


def _status(**extra: object) -> dict[str, object]:
    base: dict[str, object] = {
        "svid_expires": (NOW + dt.timedelta(hours=1)).isoformat(), "in_sync": True,
        "last_reconcile": {"at": NOW.isoformat(), "errors": []},
        "etcd": {"connected": True}, "peers": [], "missing_peers": [], "node": "n3"}
    base.update(extra)
    return base


def test_an_agent_whose_own_record_is_refused_says_so_and_is_unhealthy() -> None:
    assert status_view.health(_status(own_record={"refused": None}), NOW).healthy
    verdict = status_view.health(_status(own_record={
        "refused": "nodes/n3: epoch 4 < accepted 9", "refused_reason": "rollback"}), NOW)
    assert not verdict.healthy
    assert any("own record" in r and "epoch 4 < accepted 9" in r for r in verdict.reasons)


def test_status_text_names_the_peers_in_rollback() -> None:
    text = status_view.render(_status(rollbacks={"n2": "nodes/n2: epoch 5 < accepted 6"},
                                      health={"healthy": True, "reasons": []}), NOW)
    assert "Rollbacks refused:" in text and "n2" in text


def test_the_file_holds_no_more_than_the_book(tmp_path: Path) -> None:
    book = EpochBook(max_keys=10)
    for i in range(100):
        book.accept(verified(f"workloads/n1/w{i}", i))
    epochstore.save(tmp_path, book.snapshot())
    doc = json.loads((tmp_path / epochstore.EPOCHS_FILE).read_bytes())
    assert len(doc["epochs"]) == 10
    assert os.stat(tmp_path / epochstore.EPOCHS_FILE).st_size < 1000


def _problems(what: str) -> float:
    from tfcrypt import metrics
    return metrics.STATE_PROBLEMS.labels(what)._value.get()


def test_persisted_floors_count_a_corrupt_file_and_save_only_after_a_rise(
        tmp_path: Path) -> None:
    import asyncio

    from tfcrypt.agent.epochstore import PersistedFloors

    (tmp_path / epochstore.EPOCHS_FILE).write_text("{garbage")
    before = _problems("epochs_file")
    floors = PersistedFloors(EpochBook(), tmp_path)
    floors.restore()
    assert _problems("epochs_file") == before + 1
    assert floors.problem is not None and "not JSON" in floors.problem
    asyncio.run(floors.save())   # a bad file is replaced by the (empty) book at once
    assert epochstore.load(tmp_path).floors == {}
    floors.book.accept(verified("nodes/n2", 4))
    asyncio.run(floors.save())
    assert epochstore.load(tmp_path).floors == {"nodes/n2": 4}
    stamp = (tmp_path / epochstore.EPOCHS_FILE).stat().st_mtime_ns
    floors.book.accept(verified("nodes/n2", 4))   # no rise: no write
    asyncio.run(floors.save())
    assert (tmp_path / epochstore.EPOCHS_FILE).stat().st_mtime_ns == stamp


def test_persisted_floors_report_a_write_failure_and_clear_it_when_writing_works(
        tmp_path: Path) -> None:
    import asyncio

    from tfcrypt.agent.epochstore import PersistedFloors

    gone = tmp_path / "gone"
    floors = PersistedFloors(EpochBook(), gone)
    floors.restore()
    assert floors.problem is None
    floors.book.accept(verified("nodes/n2", 4))
    asyncio.run(floors.save())
    assert floors.problem is not None and floors.problem.startswith("cannot write")
    gone.mkdir()
    asyncio.run(floors.save())
    assert floors.problem is None and epochstore.load(gone).floors == {"nodes/n2": 4}
