"""Traffic and capture inside a lab: ping between targets, tcpdump on the underlay.

Used by the demo and by tests to prove claims on the wire. Everything runs inside lab
namespaces through `Lab.exec_prefix`; nothing sends lab addresses from the root namespace.
"""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import LabError
from .lab import Lab

_PING_RE = re.compile(r"(\d+) packets transmitted, (\d+) received")


def parse_ping(output: str) -> tuple[int, int]:
    """(sent, received) from ping's summary line; (0, 0) if there is none."""
    m = _PING_RE.search(output)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def ping_argv(dst_ip: str, count: int, interval: float) -> list[str]:
    return ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "2", dst_ip]


def ping(lab: Lab, src: str, dst_ip: str, count: int = 3, interval: float = 0.2) -> int:
    """Packets received of `count` sent from target `src` to `dst_ip`."""
    out = subprocess.run([*lab.exec_prefix(src), *ping_argv(dst_ip, count, interval)],
                         capture_output=True, text=True, timeout=count * interval + 30)
    return parse_ping(out.stdout)[1]


@contextlib.contextmanager
def capture(lab: Lab, path: Path, bpf: str = "ip", target: str = "underlay") -> Iterator[Path]:
    """tcpdump on every interface of the underlay namespace for the `with` block (or of
    another lab `target`, such as a receiving workload, to see what it was handed).

    Not on br0 alone: a bridge's own interface sees only frames flooded to it or meant
    for it, so unicast between two learned ports would pass unseen and a "no plaintext"
    claim would be vacuous. On `any` each frame shows on its ingress and egress port,
    so counts are doubled; claims are about zero or non-zero. `--immediate-mode`, or
    packets wait in the kernel's ring buffer and are lost when tcpdump is stopped.
    Stopped by its PID, after a short grace so the last replies are in.
    """
    proc = subprocess.Popen(
        [*lab.exec_prefix(target), "tcpdump", "-i", "any", "-n", "-U",
         "--immediate-mode", "-w", str(path), bpf],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert proc.stderr is not None
        said = []
        while not said or "listening on" not in said[-1]:
            line = proc.stderr.readline().decode()
            if not line:
                raise LabError(f"tcpdump did not start: {' '.join(said).strip()}")
            said.append(line)
        yield path
        time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def count_packets(path: Path, bpf: str) -> int:
    """Packets in a capture file that match a BPF filter."""
    out = subprocess.run(["tcpdump", "-n", "-r", str(path), bpf], capture_output=True,
                         text=True, check=True).stdout
    return len(out.splitlines())


def syn_mss(path: Path, bpf: str) -> list[int]:
    """The MSS option of every TCP SYN and SYN-ACK in a capture that matches `bpf`, in
    capture order (tcpdump prints the options as `[mss 1380,sackOK,...]`)."""
    out = subprocess.run(["tcpdump", "-n", "-r", str(path),
                          f"({bpf}) and tcp[tcpflags] & tcp-syn != 0"],
                         capture_output=True, text=True, check=True).stdout
    return [int(m) for m in re.findall(r"\bmss (\d+)", out)]
