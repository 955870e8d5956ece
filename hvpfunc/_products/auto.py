"""``mode="auto"``: start with the product that is cheapest to build, and trace a faster
one only once the products already spent show that it will pay (ski rental)."""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from typing import Any, Callable, ContextManager, Dict, Hashable, List, NamedTuple, Optional

import torch
from torch.utils import _pytree as pytree

from .._precision import deterministic
from .._types import MatvecFn, Tree
from .checks import Inspection, check_deterministic, check_product, evaluate
from .modes import BUILDERS, differentiable_kernels, routing

# Tracing torch.func.linearize cost about 50 gradients on a ResNet-style CNN (DESIGN.md);
# before a first trace of f is timed, that multiple of building the double-backward graph
# (about one gradient) stands in for it. The traced map then saves only a fraction of each
# product (about a quarter on CPUs: 0.24 s against 0.31 s on the jobs benchmark's CNN), so
# tracing pays only after trace cost / saving of product time: that is the threshold
# (ski rental with a partial refund), so jobs of a few dozen products never trace.
_TRACE_COST_IN_BUILDS = 50.0
# A process's first trace also imports torch._dynamo, which no multiple of the build
# predicts: 0.8 s on the benchmarks' 2-core CPU (a first trace of a 15-parameter f took
# 0.84 s, the second 0.03 s; the 400k-parameter MLP's 1.2 s against 0.18 s). Unpriced,
# it made auto trace after 137 products of that MLP's top-5 job and lose 1.16 s on a
# 1.5 s job; added to the estimate while torch._dynamo is not imported yet.
_FIRST_TRACE_IMPORT_SECONDS = 0.8
_EXPECTED_SAVING = 0.25
_MEMORY_SIZE = 256
# Told how many products follow, auto traces only if their expected saving is this many
# times the experiment's cost (the trace and its check's 6 products): the saving measured
# on a few replays is optimistic (26% and 10% on two runs of the same CNN), and tracing
# at once inside a 100-product trace made it 33-41 s against 27-31 s without.
_PAYBACK = 2.0
_CHECK_PRODUCTS = 6


class Switch(NamedTuple):
    """One decision of ``mode="auto"``, in :attr:`Matvec.switches`."""

    after_products: int  # calls of the matvec before it
    from_mode: str
    to_mode: str
    reason: str


class Outcome(NamedTuple):
    """What ``auto`` learned about one function and input signature."""

    winner: str
    trace_seconds: Optional[float]
    saving: Optional[float] = None  # the fraction of a product's time linearize saved


# Per process: the outcome of auto's experiment for each function and input signature, so
# that the next matvec of the same f (at a new point, or on a new batch of the same shape)
# neither repeats a trace that lost or failed, nor guesses the tracing cost again.
_OUTCOMES: OrderedDict[Hashable, Outcome] = OrderedDict()


def remember(key: Hashable, outcome: Outcome) -> None:
    _OUTCOMES[key] = outcome
    _used(_OUTCOMES, key)


def _used(memory: OrderedDict, key: Hashable) -> None:
    """Mark ``key`` the most recently used entry of a per-process memory, which keeps
    the ``_MEMORY_SIZE`` most recent."""
    memory.move_to_end(key)
    while len(memory) > _MEMORY_SIZE:
        memory.popitem(last=False)


# Per process as well: chunk_size="auto"'s CPU trial of a loop against vmap (seconds per
# product of each, keyed by chunk: 1 and 16; inf where vmap failed), per function and
# input signature, so that a later solver on a matvec of the same f skips the trial: it
# was 5% of a 100-probe trace of the 400k-parameter MLP, where the loop wins.
_CHUNK_TRIALS: OrderedDict[Hashable, Dict[int, float]] = OrderedDict()


def chunk_trials(key: Hashable) -> Dict[int, float]:
    """The (mutable, shared) record of chunk_size="auto"'s trials for ``key``."""
    trials = _CHUNK_TRIALS.setdefault(key, {})
    _used(_CHUNK_TRIALS, key)
    return trials


def signature(f: Callable[..., Any], params: Tree, args: tuple, kwargs: dict) -> Hashable:
    """f's code (or type) and the structure, shapes, dtypes and devices of its inputs."""
    code = getattr(f, "__code__", None) or type(f)
    leaves, spec = pytree.tree_flatten((params, args, kwargs))
    shapes = tuple(
        (tuple(x.shape), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves
    )
    return (code, str(spec), shapes)


def _import_seconds() -> float:
    """What a trace now would pay in imports (see ``_FIRST_TRACE_IMPORT_SECONDS``)."""
    return 0.0 if "torch._dynamo" in sys.modules else _FIRST_TRACE_IMPORT_SECONDS


def _trace_estimate(build_seconds: float) -> float:
    """The expected seconds of tracing linearize, before any trace of f was timed."""
    return _TRACE_COST_IN_BUILDS * build_seconds + _import_seconds()


def _sync(params: Tree) -> None:
    for leaf in pytree.tree_leaves(params):
        if leaf.is_cuda:
            torch.cuda.synchronize(leaf.device)
            return


def _under_transform() -> bool:
    return torch._C._functorch.peek_interpreter_stack() is not None


class AutoProduct:
    """The product of ``mode="auto"``; it may change mode between calls.

    Start: the reused double-backward graph (one gradient to build, and autograd's own
    second derivative); where f has no double backward, a mode that recomputes f
    (forward-over-reverse, else reverse-over-reverse recomputed). Then, unless f
    dispatches an operation that crashes the tracer or an earlier experiment on the same
    signature lost: once the time spent in products reaches the tracing cost (measured on
    an earlier matvec of the same signature, else estimated from the build), trace
    ``torch.func.linearize``, check its replays against the current mode on two vectors,
    and keep whichever is faster per product. So ``auto`` never costs much more than twice
    the best fixed choice, and approaches it on long solves. A solver that knows how many
    products it will spend says so (:meth:`expect_products`): then the trace happens only
    if the products left repay it, so a job too short to win never pays for the experiment.
    """

    def __init__(self, f, params: Tree, args: tuple, kwargs: dict, inspection: Inspection, key: Hashable):
        self._f, self._params, self._args, self._kwargs, self._key = f, params, args, kwargs, key
        self.chunk_trials = chunk_trials(key)
        self.timings: Dict[str, float] = {}
        self.switches: List[Switch] = []
        self.calls = 0
        self._spent = 0.0  # seconds in the timed products (all but the first)
        self._timed = 0
        errors: Dict[str, BaseException] = {}
        memory = _OUTCOMES.get(key)
        start = time.perf_counter()
        self.mode, self._fn = self._first_mode(errors, inspection)
        self._second_look(inspection)
        _sync(params)
        self.build_seconds = time.perf_counter() - start
        self._pending = False  # whether the linearize experiment may still run
        self._expected: Optional[int] = None  # the products the caller said will come, in all
        fixed = deterministic()  # no switch that a timing decides
        if inspection.linearize_hazard is None and not fixed and (memory is None or memory.winner == "linearize"):
            self._pending = True
            if memory is not None and memory.trace_seconds is not None and memory.saving:
                self._trace_seconds, self._saving = memory.trace_seconds, memory.saving
            else:
                self._trace_seconds, self._saving = _trace_estimate(self.build_seconds), _EXPECTED_SAVING
        reason = "cheapest to build"
        if errors:
            reason += "; " + "; ".join(f"{m} failed: {type(e).__name__}: {e}" for m, e in errors.items())
        if inspection.linearize_hazard is not None:
            reason += f"; never linearize: {inspection.linearize_hazard}"
        elif fixed:
            reason += "; kept: torch.use_deterministic_algorithms is on and tracing is decided by timings"
        elif memory is not None and memory.winner != "linearize":
            reason += f"; an earlier matvec of this f found {memory.winner!r} best"
        self.switches.append(Switch(0, "", self.mode, reason))

    def _first_mode(self, errors: Dict[str, BaseException], inspection: Inspection):
        f, params, args, kwargs = self._f, self._params, self._args, self._kwargs
        for mode in ("reverse-over-reverse", "forward-over-reverse", "reverse-over-reverse-recomputed"):
            if mode == "forward-over-reverse" and inspection.forward_hazard is not None:
                continue
            try:
                with differentiable_kernels():
                    fn = BUILDERS[mode](f, params, args, kwargs)
                    if mode == "forward-over-reverse":
                        fn(pytree.tree_map(torch.ones_like, params))  # forward-mode gaps show here
                return mode, fn
            except (RuntimeError, NotImplementedError) as err:
                errors[mode] = err
        detail = "; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())
        raise RuntimeError(f"hvp_fn(mode='auto'): no mode could compute a product ({detail})")

    def _second_look(self, inspection: Inspection) -> None:
        """f evaluated again for :func:`check_deterministic`: the forward pass that built
        the stored graph where the first mode has one (no extra evaluation), else once
        more without gradients."""
        value = getattr(self._fn, "value", None)
        if value is None:
            value = evaluate(self._f, self._params, self._args, self._kwargs)
        check_deterministic(inspection.value, float(value))

    def expect_products(self, count: int) -> None:
        """A caller's hint that ``count`` more products will follow (a trace's probes): the
        experiment then runs only if the saving on those products repays the tracing,
        instead of when the products spent reach the tracing cost."""
        self._expected = self.calls + count

    def _pays_to_trace(self) -> bool:
        if self._expected is None:  # ski rental: the products spent reach trace / saving
            return self._spent >= self._trace_seconds / self._saving
        remaining = self._expected - self.calls
        per_product = self._spent / max(self._timed, 1)
        cost = self._trace_seconds + _CHECK_PRODUCTS * per_product
        return remaining * per_product * self._saving > _PAYBACK * cost

    @property
    def routing(self) -> Callable[[], ContextManager[None]]:
        return routing(self.mode)

    def __call__(self, v: Tree) -> Tree:
        if not self._pending or _under_transform() or self.calls == 0:
            # The first product is not timed: it pays one-off costs (first kernels, the
            # allocator's first pages; before products went to autograd's engine directly,
            # torch's import of sympy: 0.25 s, a hundred small products), which made auto
            # trace at once.
            self.calls += 1
            return self._fn(v)
        _sync(self._params)
        start = time.perf_counter()
        out = self._fn(v)
        _sync(self._params)
        self._spent += time.perf_counter() - start
        self._timed += 1
        self.calls += 1
        if self._pays_to_trace():
            self._try_linearize()
        return out

    def _try_linearize(self) -> None:
        """Trace, check, time; keep the faster mode and remember the outcome. The check's
        products are the timing: two vectors, each replayed twice, against the current mode."""
        self._pending = False  # one experiment per matvec
        current = self.mode
        seconds: Dict[str, List[float]] = {"linearize": [], current: []}

        def timed(mode: str, fn: MatvecFn) -> MatvecFn:
            def call(v: Tree) -> Tree:
                _sync(self._params)
                start = time.perf_counter()
                out = fn(v)
                _sync(self._params)
                seconds[mode].append(time.perf_counter() - start)
                return out

            return call

        imports = _import_seconds()  # paid once per process: not what the next trace of f costs
        start = time.perf_counter()
        try:
            with differentiable_kernels():
                traced = BUILDERS["linearize"](self._f, self._params, self._args, self._kwargs)
                _sync(self._params)
                trace_seconds = time.perf_counter() - start
                check_product(timed("linearize", traced), timed(current, self._fn), self._params, mode="linearize")
        except (RuntimeError, NotImplementedError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.switches.append(Switch(self.calls, current, current, f"linearize rejected: {reason}"))
            remember(self._key, Outcome(current, None))
            return
        self.timings[current] = min(seconds[current])
        self.timings["linearize"] = min(seconds["linearize"][1:])  # the first replay warms up
        saving = 1.0 - self.timings["linearize"] / self.timings[current]
        if saving > 0:
            self.mode, self._fn = "linearize", traced
            winner, why = "linearize", f"faster per product by {100 * saving:.0f}%"
        else:
            winner, why = current, "linearize was not faster"
        self.switches.append(Switch(self.calls, current, winner,
                                    f"{why} (traced in {trace_seconds:.3g} s after {self._spent:.3g} s of products)"))
        remember(self._key, Outcome(winner, max(trace_seconds - imports, 0.0), saving if saving > 0 else None))
