"""Starting and stopping lab processes by PID, safe against PID reuse.

Rules: a process is identified by (pid, starttime from /proc/<pid>/stat); before any
signal its starttime must be unchanged and its /proc/<pid>/cmdline must still be the argv
we started (or the namespace-entering prefix + argv, if caught before exec). Processes
start in their own session so a stop signals the whole process group it leads. Stop =
SIGTERM, wait, then SIGKILL. Zombies count as gone (reaped if they are our children).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ProcessRecord:
    """One process a lab started; `argv` is the program without the namespace prefix."""

    pid: int
    starttime: int
    what: str
    node: str | None
    log: str
    argv: tuple[str, ...]
    prefix: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        d["prefix"] = list(self.prefix)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProcessRecord:
        return cls(
            pid=int(d["pid"]),
            starttime=int(d["starttime"]),
            what=str(d["what"]),
            node=d.get("node"),
            log=str(d["log"]),
            argv=tuple(d["argv"]),
            prefix=tuple(d.get("prefix", ())),
        )


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return [raw[: raw.index(" ")], "comm", *raw[raw.rindex(")") + 2 :].split()]


def starttime_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[21]) if fields else None


def _cmdline(pid: int) -> tuple[str, ...]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ()
    return tuple(p.decode(errors="replace") for p in raw.split(b"\0") if p)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(rec: ProcessRecord) -> bool:
    """True while the recorded process (not a reused PID) is alive and not a zombie."""
    _reap(rec.pid)
    fields = _stat_fields(rec.pid)
    if fields is None or fields[2] in ("Z", "X") or int(fields[21]) != rec.starttime:
        return False
    cmd = _cmdline(rec.pid)
    return cmd in (rec.argv, rec.prefix + rec.argv) or (not cmd and fields[2] != "Z")


def start(
    argv: list[str], *, what: str, node: str | None, log: Path,
    prefix: list[str] | None = None, env: dict[str, str] | None = None,
) -> ProcessRecord:
    """Start `prefix + argv` in a new session with stdout/stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    full = [*(prefix or []), *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            full, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, env=env,
        )
    st = starttime_of(proc.pid)
    return ProcessRecord(
        pid=proc.pid, starttime=st if st is not None else -1, what=what, node=node,
        log=str(log), argv=tuple(argv), prefix=tuple(prefix or ()),
    )


def _wait_gone(rec: ProcessRecord, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_running(rec):
            return True
        time.sleep(0.05)
    return not is_running(rec)


def _signal(rec: ProcessRecord, sig: signal.Signals) -> None:
    try:
        if os.getpgid(rec.pid) == rec.pid:
            os.killpg(rec.pid, sig)
        else:
            os.kill(rec.pid, sig)
    except ProcessLookupError:
        pass


def stop(rec: ProcessRecord, *, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM
         ) -> bool:
    """Signal the process if it is still ours; SIGKILL after `timeout`. True if it was running."""
    if not is_running(rec):
        return False
    _signal(rec, sig)
    if sig != signal.SIGKILL and _wait_gone(rec, timeout):
        return True
    if is_running(rec):
        _signal(rec, signal.SIGKILL)
        _wait_gone(rec, 5.0)
    return True


def pids_in_netns(netns: str) -> list[int]:
    """PIDs whose network namespace is the named one (compared by device and inode)."""
    try:
        st = os.stat(f"/run/netns/{netns}")
    except FileNotFoundError:
        return []
    ident = (st.st_dev, st.st_ino)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ns = os.stat(entry / "ns" / "net")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if (ns.st_dev, ns.st_ino) == ident:
            pids.append(int(entry.name))
    return pids


def stop_netns_residents(netns: str, timeout: float = 5.0) -> list[int]:
    """Stop what still runs inside a lab namespace: processes the lab did not start
    itself but that live only there (wireguard-go left running by an agent, by design).
    Identified by namespace identity, never by name pattern."""
    pids = pids_in_netns(netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        for p in pids:
            _reap(p)
        time.sleep(0.05)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids
