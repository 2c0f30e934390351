"""Where scripts/build-go.sh put a Go program built from tools/<module>/.

Why here: the lab (and tests) start SPIRE from the binaries that script built; the cache
path is keyed by a hash of the module's go.mod + go.sum (+ its optional `ldflags` and
`rename` files, in that order), computed the same way as the script does, so a version bump
in tools/ is never served an old binary.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .errors import LabError

TOOLS_DIR = Path(__file__).resolve().parent.parent / "tools"


def cache_root() -> Path:
    """${TFCRYPT_GO_BIN:-${XDG_CACHE_HOME:-$HOME/.cache}/tfcrypt/go-bin}, as the script."""
    if explicit := os.environ.get("TFCRYPT_GO_BIN"):
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tfcrypt" / "go-bin"


def module_dir(module: str, tools_dir: Path = TOOLS_DIR) -> Path:
    return tools_dir / module


def build_dir(module: str, tools_dir: Path = TOOLS_DIR) -> Path:
    """The cache directory of the current go.mod/go.sum(/ldflags/rename) of tools/<module>."""
    src = module_dir(module, tools_dir)
    try:
        data = (src / "go.mod").read_bytes() + (src / "go.sum").read_bytes()
    except FileNotFoundError:
        raise LabError(f"no Go module tools/{module} (go.mod and go.sum) in {tools_dir}") from None
    for extra in ("ldflags", "rename"):  # the script's order
        if (src / extra).is_file():
            data += (src / extra).read_bytes()
    digest = hashlib.sha256(data)
    return cache_root() / f"{module}-{digest.hexdigest()[:16]}"


def go_binary(module: str, program: str, tools_dir: Path = TOOLS_DIR) -> Path:
    """Path of `program` built from tools/<module>; a clear error if it is not built."""
    d = build_dir(module, tools_dir)
    path = d / program
    if not (d / ".complete").exists() or not path.is_file():
        raise LabError(f"{program} from tools/{module} is not built ({path} missing): run "
                       f"`bash scripts/build-go.sh {module}`")
    return path
