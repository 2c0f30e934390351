"""Pausing CPython's cyclic garbage collector around the core's bulk computations.

Why: compute() at 1,000 nodes x 100 workloads builds containers of 100,000 elements (posting
lists and sets, selector results). While they are young, every generation-0 collection
(one per 700 container allocations) traverses them element by element, and generation-1
collections do it again: measured with gc.callbacks, 0.15-0.3 s of a ~1 s compute(), for
nothing, since the core makes no reference cycles (its values are tuples, frozensets and
frozen dataclasses of strings) and everything it drops is freed by reference counting.
The collector is re-enabled on the way out, so cycles made elsewhere are collected at the
next threshold as usual. The same reasoning is behind gc.freeze() in large Python services.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def collector_paused(fn: Callable[P, R]) -> Callable[P, R]:
    """Run `fn` with the cyclic collector disabled (restored after, even on error).

    If the collector is already off (an outer call, or the embedding program chose so),
    it is left as it is.
    """
    @functools.wraps(fn)
    def paused(*args: P.args, **kwargs: P.kwargs) -> R:
        if not gc.isenabled():
            return fn(*args, **kwargs)
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.enable()
    return paused
