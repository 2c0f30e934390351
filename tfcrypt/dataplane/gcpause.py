"""The cyclic garbage collector paused around the dataplane's large synchronous builds.

Rules of this module:
- Why: at 1,000 nodes the agent holds millions of live objects (the inventory of 100,000
  workloads, the core's indexes), and a first apply allocates over a million small
  containers (element keys, plan entries). Every so many allocations CPython runs a full
  collection, which walks the whole live heap; measured in the bench's process, that was
  more than half of `DesiredTable.update` (1.0-1.3 s -> 0.4 s with the heap frozen) and
  a large part of the planning. The builds make no reference cycles worth collecting.
- Only around code with no `await` inside (decide, then act: the builds are synchronous),
  so no other task runs, and allocates, while the collector is off.
- Nests, and leaves the collector as it found it: disabled by someone else stays disabled.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No automatic collection inside the block; the collector's state is restored after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
