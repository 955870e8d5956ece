"""``mode="auto"``: build the stored modes, time them on this function, keep the faster."""

from __future__ import annotations

import time
from typing import Callable, Dict, Tuple

import torch
from torch.utils import _pytree as pytree

from .._types import MatvecFn, Tree
from .modes import BUILDERS, differentiable_attention


def _sync(params: Tree) -> None:
    for leaf in pytree.tree_leaves(params):
        if leaf.is_cuda:
            torch.cuda.synchronize(leaf.device)
            return


def _seconds_per_product(fn: MatvecFn, probe: Tree, params: Tree) -> float:
    """Best of two timed products after one warm-up call."""
    fn(probe)
    best = float("inf")
    for _ in range(2):
        _sync(params)
        start = time.perf_counter()
        fn(probe)
        _sync(params)
        best = min(best, time.perf_counter() - start)
    return best


def choose(f, params, args, kwargs) -> Tuple[MatvecFn, str, Dict[str, float]]:
    """Build and time the two stored modes, keep the faster; if neither can be built,
    fall back to the modes that recompute f (forward-mode first, it is cheaper).

    Returns the chosen matvec, its mode, and the seconds per product of every mode timed.
    """
    probe = pytree.tree_map(torch.ones_like, params)
    errors: Dict[str, Exception] = {}
    timings: Dict[str, float] = {}
    built: Dict[str, Callable] = {}

    def attempt(mode: str) -> bool:
        try:
            built[mode] = BUILDERS[mode](f, params, args, kwargs)
            timings[mode] = _seconds_per_product(built[mode], probe, params)
            return True
        except (RuntimeError, NotImplementedError) as err:
            errors[mode] = err
            built.pop(mode, None)
            return False

    with differentiable_attention():
        stored = [attempt("reverse-over-reverse"), attempt("linearize")]
        if not any(stored) and not attempt("forward-over-reverse"):
            attempt("reverse-over-reverse-recomputed")
    if not timings:
        detail = "; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())
        raise RuntimeError(f"hvp_fn(mode='auto'): no mode could compute a product ({detail})")
    mode = min(timings, key=timings.get)
    return built[mode], mode, timings


