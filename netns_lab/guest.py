"""Run one command inside a real Linux kernel under qemu (TCG), with the host's root
shared read-only: how the kernel WireGuard backend is tested on machines without the
wireguard module (`python -m netns_lab guest -- CMD`, scripts/test.sh --kernel).

Why a guest: the kernel backend talks to the in-kernel WireGuard over generic netlink;
only a kernel with the module can prove it. Debian's own kernel package is used as
shipped: the version Debian's `linux-image-amd64` depends on today (mirrors drop old
ones), fetched with `apt-get download` and unpacked with `dpkg-deb -x` (never installed)
into a cache outside git, ${XDG_CACHE_HOME:-~/.cache}/tfcrypt/kernel/<package>_<version>.

Rules:
- The initramfs holds busybox and the kernel's own modules: the roots below plus every
  module they depend on, read from each .ko file's `.modinfo` `depends=` (the package
  has no modules.dep; depmod runs only on install). Its /init loads them in dependency
  order, mounts the host root read-only over virtio-9p (tag `host`), a per-run host
  temp dir read-write at the same path (tag `out`), tmpfs on /run, /tmp, /dev/shm, moves
  the host root onto / (so `nsenter --mount` into a lab node lands in it, not in the
  initramfs) and chroots into it to run the command from the same working directory.
- The command's output is the guest's serial console, streamed line by line; its exit
  code is written to the shared temp dir and returned. A guest that ends without one
  (panic, crash) gives 125, a timeout 124; qemu is stopped by its PID on every path.
- KVM is not used: nested virtualisation hangs on these machines; TCG is slow but works.
- Per-run names: the temp dir is `tfc-guest-<random>`, removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import LabError
from .layout import NODE_SPIFFE_SOCKET, NODE_STATE_DIR, NODE_STATUS_SOCKET

QEMU = "qemu-system-x86_64"
META_PACKAGE = "linux-image-amd64"
# What the guest needs: the 9p root and its transport, virtio RNG (getrandom must not
# block), the lab's links (veth, bridge), WireGuard, and nftables with every nft_*
# expression tfcrypt's ruleset or a future one may use (autoloading is not set up).
ROOT_MODULES = ("virtio_pci", "virtio_rng", "9pnet_virtio", "9p", "veth", "bridge",
                "wireguard", "nf_tables")
ROOT_GLOBS = ("kernel/net/netfilter/nft_*.ko", "kernel/net/ipv4/netfilter/nft_*.ko",
              "kernel/net/ipv6/netfilter/nft_*.ko", "kernel/net/bridge/netfilter/nft_*.ko")
# Environment carried into the guest: nothing else of the host's is.
PASS_ENV = ("NETNS_LAB_BACKEND", "NETNS_LAB_TIMEOUT_SCALE", "PYTEST_ADDOPTS")
REBOOT_LINE = re.compile(r"^\[\s*\d+\.\d+\] reboot: ")  # the guest's own way out
EXIT_TIMEOUT = 124
EXIT_NO_STATUS = 125

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/modules/$m" || echo "guest: insmod $m failed"; done < /modules/order
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=loose,ro host /host \
  || { echo "guest: cannot mount the host root"; reboot -f; }
mount -t proc proc /host/proc
mount -t sysfs sysfs /host/sys
mount -t devtmpfs devtmpfs /host/dev
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
for i in 0:stdin 1:stdout 2:stderr; do ln -sf "/proc/self/fd/${i%%:*}" "/host/dev/${i#*:}"; done
ln -sf /proc/self/fd /host/dev/fd
mount -t tmpfs tmpfs /host/dev/shm
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /host/run
mount -t tmpfs -o mode=1777 tmpfs /host/tmp
OUT=$(cat /out-path)
mkdir -p "/host$OUT"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/host$OUT" \
  || { echo "guest: cannot mount the run dir"; reboot -f; }
ip link set lo up 2>/dev/null
# The host root becomes the namespace's root (as switch_root does), not only a chroot:
# `nsenter --mount` into a lab node's namespace enters at the namespace's root.
cd /host && mount --move . / || { echo "guest: cannot move the host root"; reboot -f; }
chroot . /bin/sh "$OUT/command.sh"
echo $? > "./$OUT/exit-code"
sync
/bin/busybox reboot -f
"""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel package: its version string (`uname -r`) and its tree."""

    package: str
    version: str
    root: Path

    @property
    def release(self) -> str:
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules(self) -> Path:
        return self.root / "lib" / "modules" / self.release


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tfcrypt" / "kernel"


def _apt(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise LabError(f"{' '.join(argv)} failed: {err.strip()}") from None


def current_kernel_package() -> tuple[str, str]:
    """(package, version) of the kernel Debian's linux-image-amd64 depends on today."""
    deps = _apt(["apt-cache", "depends", META_PACKAGE])
    names = [line.split(":", 1)[1].strip() for line in deps.splitlines()
             if line.strip().startswith("Depends:") and "linux-image-" in line]
    if not names:
        raise LabError(f"apt-cache depends {META_PACKAGE}: no linux-image dependency "
                       "(run apt-get update)")
    show = _apt(["apt-cache", "show", "--no-all-versions", names[0]])
    version = next((line.split(":", 1)[1].strip() for line in show.splitlines()
                    if line.startswith("Version:")), None)
    if version is None:
        raise LabError(f"apt-cache show {names[0]}: no Version")
    return names[0], version


def fetch_kernel(log: Iterable[str] | None = None) -> Kernel:
    """The current kernel package, downloaded and unpacked once into the cache. Without
    apt (offline) the newest cached one is used, and said so."""
    cache = cache_root()
    try:
        package, version = current_kernel_package()
    except LabError as e:
        cached = sorted(p for p in cache.glob("*/.complete"))
        if not cached:
            raise
        root = cached[-1].parent
        package, version = root.name.split("_", 1)
        _say(f"guest: {e}; using the cached {package} {version}")
        return Kernel(package, version, root)
    root = cache / f"{package}_{version}"
    if not (root / ".complete").exists():
        _say(f"guest: fetching {package} {version} into {root}")
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="tfc-kdl-") as tmp:
            _apt_in(tmp, ["apt-get", "download", f"{package}={version}"])
            (deb,) = Path(tmp).glob("*.deb")
            _apt(["dpkg-deb", "-x", str(deb), str(root)])
        (root / ".complete").write_text(f"{package} {version}\n")
    return Kernel(package, version, root)


def _apt_in(cwd: str, argv: list[str]) -> None:
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, cwd=cwd)
    except (OSError, subprocess.CalledProcessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        raise LabError(f"{' '.join(argv)} failed: {err.strip()}") from None


def modinfo(path: Path) -> dict[str, list[str]]:
    """The `.modinfo` section of an (uncompressed) ELF64 .ko: key -> values."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise LabError(f"{path}: not an uncompressed ELF64 module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _t, _f, _a, off, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, off, size

    _, str_off, _ = section(shstrndx)
    for i in range(shnum):
        name, off, size = section(i)
        end = data.index(b"\0", str_off + name)
        if data[str_off + name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in data[off:off + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    info.setdefault(key, []).append(value)
            return info
    raise LabError(f"{path}: no .modinfo section")


def module_index(modules: Path) -> dict[str, Path]:
    """Module name (dashes as underscores, as the kernel does) -> its .ko file."""
    return {p.name.removesuffix(".ko").replace("-", "_"): p
            for p in modules.glob("kernel/**/*.ko")}


def load_order(index: dict[str, Path], roots: Iterable[str]) -> list[str]:
    """Every root and its dependencies (from each file's modinfo `depends`), each after
    everything it depends on."""
    order: list[str] = []
    state: dict[str, str] = {}
    aliases = _aliases(index)

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise LabError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in index:
            raise LabError(f"module {name} (needed by {chain[-1] if chain else 'the guest'}) "
                           "is not in the kernel package")
        state[name] = "visiting"
        info = modinfo(index[name])
        needed = [d for dep in info.get("depends", []) for d in dep.split(",") if d]
        needed += [aliases.get(d, d) for d in _softdeps_pre(info)]
        for d in needed:
            visit(d.replace("-", "_"), (*chain, name))
        state[name] = "done"
        order.append(name)

    for root in roots:
        visit(root.replace("-", "_"), ())
    return order


def _softdeps_pre(info: dict[str, list[str]]) -> list[str]:
    """`softdep=pre: a b post: c` -> [a, b]: modules that must be loaded first although
    no symbol says so (libcrc32c needs a crc32c implementation)."""
    names: list[str] = []
    for value in info.get("softdep", []):
        words, keep = value.split(), False
        for w in words:
            if w.endswith(":"):
                keep = w == "pre:"
            elif keep:
                names.append(w)
    return names


def _aliases(index: dict[str, Path]) -> dict[str, str]:
    """Exact (non-glob) aliases -> module name, for softdeps naming an algorithm
    (`crc32c` -> crc32c_generic). Read lazily: only the crypto modules declare them."""
    found: dict[str, str] = {}
    for name, path in index.items():
        if "/crypto/" in str(path):
            for alias in modinfo(path).get("alias", []):
                if not any(c in alias for c in "*?[") and alias not in index:
                    found.setdefault(alias, name)
    return found


def guest_roots(kernel: Kernel) -> list[str]:
    names = list(ROOT_MODULES)
    for pattern in ROOT_GLOBS:
        names += sorted(p.name.removesuffix(".ko") for p in kernel.modules.glob(pattern))
    return names


def build_initramfs(kernel: Kernel, out_dir: Path, dest: Path) -> list[str]:
    """An uncompressed newc cpio at `dest` (TCG unpacks it faster than a gzip one);
    returns the modules it loads, in order."""
    if shutil.which("cpio") is None:
        raise LabError("cpio not found: install the Debian package cpio")
    busybox = shutil.which("busybox")
    if busybox is None:
        raise LabError("busybox not found: install the Debian package busybox-static")
    index = module_index(kernel.modules)
    order = load_order(index, guest_roots(kernel))
    with tempfile.TemporaryDirectory(prefix="tfc-initrd-") as tmp:
        root = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "modules", "host"):
            (root / d).mkdir()
        shutil.copy(busybox, root / "bin" / "busybox")
        (root / "init").write_text(INIT)
        (root / "init").chmod(0o755)
        (root / "out-path").write_text(str(out_dir))
        for name in order:
            shutil.copy(index[name], root / "modules" / f"{name}.ko")
        (root / "modules" / "order").write_text("".join(f"{n}.ko\n" for n in order))
        files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        with open(dest, "wb") as f:
            subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "--owner=0:0"],
                           input="\n".join(files).encode(), stdout=f, cwd=root, check=True)
    return order


def command_script(argv: Sequence[str], cwd: str, env: dict[str, str]) -> str:
    lines = ["set -e", f"cd {shlex.quote(cwd)}",
             "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "export HOME=/root TERM=dumb PYTHONDONTWRITEBYTECODE=1 NETNS_LAB_GUEST=1"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())]
    lines += ["set +e", f"exec {shlex.join(argv)}"]
    return "\n".join(lines) + "\n"


def qemu_argv(kernel: Kernel, initrd: Path, out_dir: Path, memory_mb: int,
              cpus: int) -> list[str]:
    return [
        QEMU, "-accel", "tcg", "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none", "-monitor", "none", "-serial", "stdio",
        "-m", str(memory_mb), "-smp", str(cpus), "-cpu", "max",
        "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init",
        "-device", "virtio-rng-pci",
        "-virtfs", "local,path=/,mount_tag=host,security_model=none,readonly=on,"
                   "multidevs=remap",
        "-virtfs", f"local,path={out_dir},mount_tag=out,security_model=none,"
                   "multidevs=remap",
    ]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(argv: Sequence[str], *, timeout: float = 1800, memory_mb: int = 3072,
        cpus: int = 2, env: dict[str, str] | None = None) -> int:
    """Boot the guest, run `argv` in the current directory inside it, stream its output
    to stdout; returns its exit code (124 timeout, 125 no exit code)."""
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} not found: install the Debian package qemu-system-x86")
    kernel = fetch_kernel()
    _host_mount_points()
    carried = {k: os.environ[k] for k in PASS_ENV if k in os.environ}
    carried.update(env or {})
    out_dir = Path(tempfile.gettempdir()) / f"tfc-guest-{secrets.token_hex(4)}"
    out_dir.mkdir(mode=0o700)
    try:
        initrd = out_dir / "initramfs.cpio"
        modules = build_initramfs(kernel, out_dir, initrd)
        (out_dir / "command.sh").write_text(command_script(argv, os.getcwd(), carried))
        _say(f"guest: {kernel.package} {kernel.version} (TCG, {len(modules)} modules), "
             f"running: {shlex.join(argv)}")
        started = time.monotonic()
        code = _boot(qemu_argv(kernel, initrd, out_dir, memory_mb, cpus), timeout)
        status = out_dir / "exit-code"
        if code is None:
            _say(f"guest: timed out after {timeout:.0f}s; qemu stopped")
            return EXIT_TIMEOUT
        if not status.exists():
            _say(f"guest: ended without the command's exit code (qemu exit {code})")
            return EXIT_NO_STATUS
        rc = int(status.read_text().strip() or EXIT_NO_STATUS)
        _say(f"guest: exit {rc} after {time.monotonic() - started:.0f}s")
        return rc
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _host_mount_points() -> None:
    """A lab binds node directories onto tfcrypt's default paths (netns_lab/mountns.py),
    and a mount point must exist. In the guest the host root is read-only: those outside
    the guest's tmpfs (/var/lib/tfcrypt) are made here, empty, as the lab leaves them."""
    for path in (NODE_STATE_DIR, NODE_STATUS_SOCKET.parent, NODE_SPIFFE_SOCKET.parent):
        if not any(path.is_relative_to(t) for t in ("/run", "/tmp", "/dev")):
            path.mkdir(parents=True, exist_ok=True)


def _boot(argv: list[str], timeout: float) -> int | None:
    """Run qemu, copying its console to stdout; None on timeout. qemu is killed by PID
    on every way out of here (timeout, KeyboardInterrupt, a broken stdout)."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    timer = _Watchdog(proc.pid, deadline)
    try:
        timer.start()
        assert proc.stdout is not None
        _copy_console(proc.stdout.fileno())
        proc.wait()
        return None if timer.fired else proc.returncode
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _copy_console(fd: int) -> None:
    """Console to stdout as it comes (pytest's progress dots have no newline), without
    the serial line's CRs and the guest's final reboot message."""
    pending = b""
    while chunk := os.read(fd, 65536):
        pending += chunk.replace(b"\r\n", b"\n")
        head, sep, pending = pending.rpartition(b"\n")
        text = head + sep
        if pending and not pending.startswith(b"["):  # a partial line that is no kernel
            text, pending = text + pending, b""       # message: out now
        lines = text.decode(errors="replace").splitlines(keepends=True)
        sys.stdout.write("".join(x for x in lines if not REBOOT_LINE.match(x)))
        sys.stdout.flush()
    sys.stdout.write(pending.decode(errors="replace"))
    sys.stdout.flush()


class _Watchdog:
    """Kills the qemu PID at the deadline (the console read blocks, so it is a thread)."""

    def __init__(self, pid: int, deadline: float) -> None:
        self.pid, self.deadline, self.fired = pid, deadline, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        if not self._stop.wait(max(0.0, self.deadline - time.monotonic())):
            self.fired = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
