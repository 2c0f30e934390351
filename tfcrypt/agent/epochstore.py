"""The epochs a reader has accepted, kept in the state dir so a restart remembers them.

Rules:
- One file, `<state_dir>/epochs.json`: {"version": 1, "epochs": {key: epoch}} with keys
  relative to the prefix, least recently raised first (tfcrypt.identity.epochs.EpochBook).
  Without it a restarted reader would take the first value it reads for a key as the
  floor, and a replayed older record (a WireGuard key a rotation retired) would pass.
- Written atomically (a 0600 temporary in the same directory, fsync, rename, fsync of the
  directory), mode 0600; written only when a floor rose since the last write, and before
  the dataplane uses what was accepted (the agent saves before each reconcile).
- Bounded: a file over `MAX_BYTES` is not read; the book itself holds at most
  EpochBook.max_keys floors, so what is written stays under the bound.
- A missing file is a first start. An unreadable, oversized or malformed file is never
  fatal: `load` returns no floors and a one-line problem naming the file and what is
  wrong; the agent logs it, counts it (tfcrypt_state_problems_total{what="epochs_file"})
  and starts from empty, which is what a reader did before this file existed. The bad
  file is moved aside (`epochs.json.corrupt-<time>`) for the operator to inspect.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tfcrypt import metrics
from tfcrypt.agent.logs import AGENT_LOG as log
from tfcrypt.identity.epochs import EpochBook
from tfcrypt.privatefile import write_private
from tfcrypt.text import excerpt

EPOCHS_FILE = "epochs.json"
VERSION = 1
MAX_BYTES = 32 * 1024 * 1024  # ~200,000 floors of long keys
MAX_KEY = 1024  # characters of one key (etcd keys under the prefix are far shorter)


@dataclass(frozen=True)
class Loaded:
    """What `load` found: the floors, and why none were taken if the file was bad."""

    floors: dict[str, int] = field(default_factory=dict)
    problem: str | None = None
    moved_to: Path | None = None


def load(state_dir: Path) -> Loaded:
    """The floors saved in `state_dir`; never raises for a bad file (module rules)."""
    path = state_dir / EPOCHS_FILE
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return Loaded()
    except OSError as exc:
        return Loaded(problem=f"{path}: unreadable ({exc.strerror or exc})")
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        floors = _parse(raw)
    except ValueError as exc:
        return Loaded(problem=f"{path}: {excerpt(str(exc), 200)}; starting with no "
                      "remembered epochs", moved_to=_move_aside(path))
    return Loaded(floors)


def _parse(raw: bytes) -> dict[str, int]:
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise ValueError(f"not a version {VERSION} epochs file")
    epochs = doc.get("epochs")
    if not isinstance(epochs, dict):
        raise ValueError("'epochs' is not a mapping")
    floors: dict[str, int] = {}
    for key, epoch in epochs.items():
        if not key or len(key) > MAX_KEY or not key.isprintable():
            raise ValueError(f"key {excerpt(key, 60)!r} is not a record key")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch of {excerpt(key, 60)} is not an integer >= 0")
        floors[key] = epoch
    return floors


def _move_aside(path: Path) -> Path | None:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    try:
        os.replace(path, aside)
    except OSError:
        return None
    return aside


def save(state_dir: Path, floors: Mapping[str, int]) -> None:
    """Replace the file atomically with `floors` (raises OSError; the caller logs it)."""
    path = state_dir / EPOCHS_FILE
    data = json.dumps({"version": VERSION, "epochs": dict(floors)},
                      separators=(",", ":")).encode()
    write_private(path, data)


class PersistedFloors:
    """An EpochBook kept in the state dir: `restore()` once at start, before etcd is
    read; `save()` before each reconcile (writes only after a rise, in a worker thread:
    100,000 floors are a few MB to serialise and fsync, which the event loop - lease
    keep-alive, status - should not wait for; one writer at a time, since reconciles
    may overlap). `problem` is what status shows of the file."""

    def __init__(self, book: EpochBook, state_dir: Path) -> None:
        self.book = book
        self.state_dir = state_dir
        self.problem: str | None = None
        self._saved = -1
        self._lock = asyncio.Lock()

    def restore(self) -> None:
        loaded = load(self.state_dir)
        if loaded.problem is not None:
            metrics.STATE_PROBLEMS.labels("epochs_file").inc()
            self.problem = loaded.problem
            aside = f" (moved to {loaded.moved_to.name})" if loaded.moved_to else ""
            log.error("%s%s: a replayed older record is refused only from the first value "
                      "this run accepts", loaded.problem, aside)
        self.book.restore(loaded.floors)
        self._saved = self.book.generation if loaded.problem is None else -1
        if loaded.floors:
            log.info("restored the epochs of %d keys from %s", len(loaded.floors),
                     EPOCHS_FILE)

    async def save(self) -> None:
        async with self._lock:
            generation = self.book.generation
            if generation == self._saved:
                return
            try:
                await asyncio.to_thread(save, self.state_dir, self.book.snapshot())
            except OSError as exc:
                metrics.STATE_PROBLEMS.labels("epochs_file_write").inc()
                self.problem = f"cannot write {EPOCHS_FILE}: {exc}"
                log.warning("%s", self.problem)
                return
            self._saved = generation
            if self.problem is not None and self.problem.startswith("cannot write"):
                self.problem = None
