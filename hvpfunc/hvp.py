"""Hessian-vector products on pytrees: ``hvp`` (one product) and ``hvp_fn`` (a reusable matvec).

The Hessian of a scalar f at ``params`` is never formed. Each mode computes H·v a
different way, with different costs (ratios to one gradient, measured in DESIGN.md and
``benchmarks/``):

* ``"forward-over-reverse"``: ``jvp(grad(f))``; recomputes the forward and backward
  pass on every call (about 2–4× a gradient per product), memory of one gradient, and
  composes with every ``torch.func`` transform.
* ``"reverse-over-reverse"``: builds the gradient's autograd graph once
  (``create_graph=True``) and back-propagates each v through it (Pearlmutter's trick as
  PyHessian does it): about 1× a gradient on MLPs and transformers; keeps the graph alive.
* ``"reverse-over-reverse-recomputed"``: ``vjp(grad(f))``, recomputed every call
  (about 2.5× a gradient): stores nothing, composes with ``torch.func``, and needs no
  forward-mode derivatives.
* ``"linearize"``: ``torch.func.linearize(grad(f))`` traces the tangent map once and
  replays it; about 1× a gradient on CNNs, where the reused graph costs 3×; tracing
  takes 0.3–1 s.
* ``"auto"``: builds both stored modes, times three products of each and keeps the
  faster (neither wins everywhere: the reused graph on MLPs and transformers,
  ``linearize`` on CNNs); a mode that fails for lack of a derivative is skipped, and if
  neither stored mode works, the recomputing modes are tried. Building costs about a
  gradient plus ``linearize``'s tracing (0.3–1 s), which a solver's hundreds of
  products repay; for one product, use :func:`hvp`.
* ``"compiled"`` (opt-in, never chosen by ``"auto"``): ``torch.compile`` of the product
  that stores nothing (``jvp(grad(f))``, or ``vjp(grad(f))`` when f lacks forward-mode
  derivatives), for when the stored modes' memory is too much. Construction compiles
  (seconds to a minute) and checks one compiled product against the eager one; a
  failure to compile raises then. It pays where Python overhead dominates (small
  models) and on GPUs (DESIGN.md: 1.25× a gradient and a gradient's memory on an MLP,
  against 3.5× eager); on CPUs the stored modes were faster for larger models in
  ``benchmarks/``, and code Dynamo cannot trace (``nn.TransformerEncoderLayer``'s fused
  fast path) runs eagerly between compiled pieces, at eager speed. Under ``torch.func``
  transforms (``vmap`` over tangents) the product runs eagerly: compiled functions
  cannot be called from inside them (pytorch/pytorch#128711).

Missing derivatives are handled, not passed on:

* Fused attention: ``scaled_dot_product_attention``'s flash, memory-efficient and cuDNN
  kernels have neither forward-mode AD nor a double backward. Every mode evaluates f
  under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``, the math backend that has
  both, so models with default attention work in every mode.
* Broken forward-mode formulas, such as ``F.mse_loss`` with ``reduction="mean"``
  ("ZeroTensors are immutable", pytorch/pytorch#123996): :func:`hvp` then computes
  ``vjp(grad(f))`` instead, ``"auto"`` skips the forward-mode modes, and
  ``"linearize"`` raises a ``RuntimeError`` (tracing such a function crashes the
  process in torch 2.13, so a forward-mode product is checked first).
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .tree import check_like, check_tree, norm, random_like, sub

__all__ = ["hvp", "hvp_fn", "Matvec", "MODES"]

Tree = Any
MODES = (
    "auto",
    "forward-over-reverse",
    "reverse-over-reverse",
    "reverse-over-reverse-recomputed",
    "linearize",
    "compiled",
)


@contextlib.contextmanager
def _differentiable_attention() -> Iterator[None]:
    """Route scaled_dot_product_attention through the math kernel, which has the
    forward-mode and double-backward derivatives the fused kernels lack."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the older per-backend switches
        with torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        ):
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _scalar_fn(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap f so that a non-scalar or non-float output is a clear error."""

    def wrapped(*args: Any, **kwargs: Any) -> Tensor:
        out = f(*args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"f must return a scalar tensor, it returned a {type(out).__name__}"
            )
        if out.dim() != 0:
            raise ValueError(
                f"f must return a scalar (0-dim) tensor, it returned shape {tuple(out.shape)}; "
                "reduce it first, e.g. with .mean() or .sum()"
            )
        if not out.is_floating_point():
            raise TypeError(f"f must return a floating-point scalar, it returned {out.dtype}")
        return out

    return wrapped


def hvp(f: Callable[..., Tensor], params: Tree, v: Tree, *args: Any, **kwargs: Any) -> Tree:
    """The Hessian-vector product H v of a scalar function at ``params``.

    .. math:: H v = \\nabla^2_{\\theta} f(\\theta, \\ldots)\\, v
              = \\frac{d}{dt} \\nabla_\\theta f(\\theta + t v)\\big|_{t=0}

    computed forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), one
    forward and backward pass with tangents, without forming H; if an operation in f
    has no working forward-mode derivative, reverse-over-reverse (``torch.func.vjp`` of
    ``torch.func.grad``) instead. ``params`` and ``v`` are
    pytrees of tensors of the same structure; nothing is flattened. It composes with
    ``torch.func`` transforms: ``vmap`` over ``v`` gives many products at once.

    Args:
        f: ``f(params, *args, **kwargs)`` returning a 0-dim floating tensor.
        params: the point, a pytree of floating tensors.
        v: the tangent, a pytree matching ``params`` leaf for leaf.
        *args, **kwargs: passed to ``f`` unchanged (data, targets...); not differentiated.

    Returns:
        A pytree shaped like ``params``.

    Raises:
        ValueError, TypeError: ``v`` differs from ``params`` in structure, shape, dtype or
            device (the message names the leaf), or ``f`` does not return a scalar.

    Example:
        >>> f = lambda p, x: ((x @ p["w"]) ** 2).sum()
        >>> params = {"w": torch.ones(3)}
        >>> hvp(f, params, {"w": torch.tensor([1., 0., 0.])}, torch.eye(3))
        {'w': tensor([2., 0., 0.])}
    """
    check_tree(params, name="params")
    check_like(v, params, name="v")
    grad_f = torch.func.grad(_scalar_fn(f))
    with _differentiable_attention():
        try:
            return torch.func.jvp(lambda p: grad_f(p, *args, **kwargs), (params,), (v,))[1]
        except RuntimeError as err:
            if not _is_forward_ad_gap(err):
                raise
            return torch.func.vjp(lambda p: grad_f(p, *args, **kwargs), params)[1](v)[0]


class Matvec:
    """``v -> H v`` at a fixed point: the operator the solvers take.

    Calling it checks ``v`` against the parameters (structure, shapes, dtypes, devices)
    and returns a tree shaped like them. It works under ``torch.func.vmap`` over ``v``.

    Attributes:
        mode: the mode that computes the product (for ``"auto"``, the one it chose).
        params: the point, as given (detached).
        timings: for ``"auto"``, seconds per product of each mode it timed.
    """

    def __init__(self, fn: Callable[[Tree], Tree], params: Tree, mode: str,
                 timings: Optional[Dict[str, float]] = None):
        self._fn = fn
        self.params = params
        self.mode = mode
        self.timings = dict(timings or {})
        # The stored modes replay what was built under the math attention kernel; only
        # the modes that evaluate f again need the kernel switched on each call.
        self._evaluates_f = mode not in ("reverse-over-reverse", "linearize")

    def __call__(self, v: Tree) -> Tree:
        check_like(v, self.params, name="v")
        if not self._evaluates_f:
            return self._fn(v)
        with _differentiable_attention():
            return self._fn(v)

    def __repr__(self) -> str:
        return f"Matvec(mode={self.mode!r})"


def hvp_fn(
    f: Callable[..., Tensor],
    params: Tree,
    *args: Any,
    mode: str = "auto",
    **kwargs: Any,
) -> Matvec:
    """A reusable matvec ``v -> H v`` for the Hessian of f at the fixed point ``params``.

    Solvers call the matvec many times at one point, so the modes that build something
    once (a gradient graph, a linearized tangent map) and replay it pay 1–3× less per
    product than recomputing ``jvp(grad(f))``. The module docstring compares the modes.
    Every mode's matvec works under ``torch.func.vmap`` (batch the tangents only).

    Args:
        f: ``f(params, *args, **kwargs)`` returning a 0-dim floating tensor.
        params: the point, a pytree of floating tensors. It is detached, not copied:
            after an in-place update of the parameters the matvec is no longer at one
            well-defined point (the reused graph then raises; the other modes would mix
            the old and new values), so build a new matvec after each update.
        *args, **kwargs: passed to ``f``; not differentiated.
        mode: ``"auto"`` (default), ``"forward-over-reverse"``, ``"reverse-over-reverse"``,
            ``"reverse-over-reverse-recomputed"``, ``"linearize"`` or ``"compiled"``.

    Returns:
        A :class:`Matvec`; its ``mode`` attribute says which mode computes products.

    Raises:
        ValueError: unknown ``mode``; ``f`` does not return a scalar; ``f`` is not
            deterministic (two evaluations at ``params``, made at construction, differ).
        TypeError: a leaf of ``params`` is not a floating tensor.
        RuntimeError: no mode can differentiate f twice (the message lists each error);
            ``mode="compiled"`` and ``torch.compile`` fails on f or disagrees with the
            eager product.

    Example:
        >>> mv = hvp_fn(lambda p: (p["w"] ** 4).sum(), {"w": torch.tensor([1., 2.])})
        >>> mv({"w": torch.ones(2)})["w"]
        tensor([12., 48.])
        >>> torch.func.vmap(mv)({"w": torch.eye(2)})["w"]   # two products at once
        tensor([[12.,  0.],
                [ 0., 48.]])
    """
    return _hvp_fn(f, params, args, kwargs, mode=mode)


def _hvp_fn(f, params, args, kwargs, *, mode: str, cache: Optional[dict] = None) -> Matvec:
    """:func:`hvp_fn`; matvecs built with one ``cache`` for the same f at several points
    or data share what can be shared (the compiled product)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_tree(params, name="params")
    params = pytree.tree_map(lambda t: t.detach(), params)
    f = _scalar_fn(f)
    _check_deterministic(f, params, args, kwargs)
    if mode == "auto":
        return _auto(f, params, args, kwargs)
    with _differentiable_attention():
        if mode == "compiled":
            fn = _compiled(f, params, args, kwargs, cache)
        else:
            fn = _BUILDERS[mode](f, params, args, kwargs)
    return Matvec(fn, params, mode)


def _check_deterministic(f, params, args, kwargs) -> None:
    """Evaluate f twice at the point: a function with randomness inside (dropout,
    sampling, augmentation) would make every product random, and a stored mode would
    freeze one random draw into the operator, both silently."""
    with torch.no_grad(), _differentiable_attention():
        first, second = f(params, *args, **kwargs), f(params, *args, **kwargs)
    a, b = float(first), float(second)
    # GPU reductions may differ in the last bits between runs; randomness does not hide there
    if abs(a - b) > 1e-6 * max(abs(a), abs(b)) + 1e-30:
        raise ValueError(
            f"f is not deterministic: two evaluations at the same params gave {a!r} and "
            f"{b!r}. Randomness inside f (dropout, sampling, data augmentation) would make "
            "every Hessian-vector product random and solvers would not converge: make f "
            "deterministic (model.eval(), fixed noise, or model_hvp_fn(..., dropout='off'))."
        )


def _forward_over_reverse(f, params, args, kwargs):
    grad_f = torch.func.grad(f)

    def matvec(v: Tree) -> Tree:
        try:
            return torch.func.jvp(lambda p: grad_f(p, *args, **kwargs), (params,), (v,))[1]
        except RuntimeError as err:
            if _is_forward_ad_gap(err):
                raise RuntimeError(
                    "mode='forward-over-reverse': an operation in f has no working forward-mode "
                    f"derivative ({err}). Use mode='reverse-over-reverse' or mode='auto'."
                ) from err
            raise

    return matvec


def _reverse_over_reverse_recomputed(f, params, args, kwargs):
    grad_f = torch.func.grad(f)
    return lambda v: torch.func.vjp(lambda p: grad_f(p, *args, **kwargs), params)[1](v)[0]


def _reverse_over_reverse(f, params, args, kwargs):
    leaves, spec = pytree.tree_flatten(params)
    inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        out = f(pytree.tree_unflatten(inputs, spec), *args, **kwargs)
        grads = torch.autograd.grad(
            out, inputs, create_graph=True, allow_unused=True, materialize_grads=True
        )
    # Leaves whose gradient does not depend on the parameters (f linear in them) have no
    # graph; their rows of H are zero and autograd must not be asked about them.
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def matvec(v: Tree) -> Tree:
        v_leaves = pytree.tree_leaves(v)
        if not live:
            return pytree.tree_map(torch.zeros_like, v)
        out = torch.autograd.grad(
            [grads[i] for i in live],
            inputs,
            [v_leaves[i] for i in live],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
        )
        return pytree.tree_unflatten(list(out), spec)

    return matvec


def _linearize(f, params, args, kwargs):
    # torch.func.linearize crashes the process (segmentation fault, torch 2.13) on some
    # functions whose forward-mode derivative is broken, e.g. F.mse_loss with
    # reduction="mean" (pytorch/pytorch#123996). One eager forward-over-reverse product
    # turns that into a RuntimeError first.
    probe = pytree.tree_map(torch.ones_like, params)
    _forward_over_reverse(f, params, args, kwargs)(probe)
    grad_f = torch.func.grad(f)
    with warnings.catch_warnings():
        # linearize's constant folding warns about attributes it creates itself.
        warnings.filterwarnings("ignore", module=r"torch\.fx\..*")
        _, jvp_fn = torch.func.linearize(lambda p: grad_f(p, *args, **kwargs), params)
    return jvp_fn


class _CompiledProduct:
    """``(p, v, args, kwargs) -> H(p) v`` compiled once for f, shared by the matvecs of
    several points or batches of f (``model_hvp_fn`` builds one per batch): their
    arguments are the compiled graph's inputs, so a new batch of the same shape reuses
    the graph instead of compiling again."""

    def __init__(self, f: Callable[..., Tensor], params: Tree, args: tuple, kwargs: dict):
        grad_f = torch.func.grad(f)
        if _memory_light_mode(f, params, *args, **kwargs) == "forward-over-reverse":
            def product(p, v, args, kwargs):
                return torch.func.jvp(lambda q: grad_f(q, *args, **kwargs), (p,), (v,))[1]
        else:
            def product(p, v, args, kwargs):
                return torch.func.vjp(lambda q: grad_f(q, *args, **kwargs), p)[1](v)[0]
        self.eager = product
        self.compiled = torch.compile(_own_code(product))

    def matvec(self, params: Tree, args: tuple, kwargs: dict) -> Callable[[Tree], Tree]:
        """The matvec at one point, after one compiled product there agreed with the eager one."""
        probe = random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
        try:
            got = self.compiled(params, probe, args, kwargs)
        except Exception as err:  # Dynamo and Inductor raise many types; all mean "cannot compile"
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise RuntimeError(
                f"mode='compiled': torch.compile could not compile the product "
                f"({type(err).__name__}: {first}). Use mode='auto', or "
                "mode='forward-over-reverse' for the same product uncompiled."
            ) from err
        want = self.eager(params, probe, args, kwargs)
        # Compiled kernels fuse and reorder reductions, so the last bits differ; a wrong
        # compiled graph is off by far more than the square root of the rounding unit.
        error, size = norm(sub(got, want)), norm(want)
        if not bool(error <= _agreement(params) * size):
            raise RuntimeError(
                f"mode='compiled': the compiled product disagrees with the eager one (relative "
                f"error {float(error / size):.2e} on a random vector); torch.compile "
                "miscompiled f. Use mode='auto' or mode='forward-over-reverse'."
            )
        eager, compiled = self.eager, self.compiled

        def matvec(v: Tree) -> Tree:
            if torch._C._functorch.peek_interpreter_stack() is not None:
                return eager(params, v, args, kwargs)
            return compiled(params, v, args, kwargs)

        return matvec


def _compiled(f, params, args, kwargs, cache: Optional[dict] = None):
    cache = {} if cache is None else cache
    if "compiled" not in cache:
        cache["compiled"] = _CompiledProduct(f, params, args, kwargs)
    return cache["compiled"].matvec(params, args, kwargs)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompilations, per code object: matvecs compiled from one definition would share
    its 8 cache slots, and from the ninth on run eagerly with only a logged warning."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _agreement(params: Tree) -> float:
    eps = max(torch.finfo(leaf.dtype).eps for leaf in pytree.tree_leaves(params))
    return 10 * eps**0.5


_BUILDERS = {
    "forward-over-reverse": _forward_over_reverse,
    "reverse-over-reverse": _reverse_over_reverse,
    "reverse-over-reverse-recomputed": _reverse_over_reverse_recomputed,
    "linearize": _linearize,
}

_FORWARD_AD_GAPS = ("forward ad", "forward-mode", "forward mode", "zerotensor", "jvp")


def _is_forward_ad_gap(err: BaseException) -> bool:
    """Whether an error says that some operation lacks a usable forward-mode derivative."""
    text = str(err).lower()
    return any(pattern in text for pattern in _FORWARD_AD_GAPS)


def _sync(params: Tree) -> None:
    for leaf in pytree.tree_leaves(params):
        if leaf.is_cuda:
            torch.cuda.synchronize(leaf.device)
            return


def _seconds_per_product(fn: Callable[[Tree], Tree], probe: Tree, params: Tree) -> float:
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


def _auto(f, params, args, kwargs) -> Matvec:
    """Build and time the two stored modes, keep the faster; if neither can be built,
    fall back to the modes that recompute f (forward-mode first, it is cheaper)."""
    probe = pytree.tree_map(torch.ones_like, params)
    errors: Dict[str, Exception] = {}
    timings: Dict[str, float] = {}
    built: Dict[str, Callable] = {}

    def attempt(mode: str) -> bool:
        try:
            built[mode] = _BUILDERS[mode](f, params, args, kwargs)
            timings[mode] = _seconds_per_product(built[mode], probe, params)
            return True
        except (RuntimeError, NotImplementedError) as err:
            errors[mode] = err
            built.pop(mode, None)
            return False

    with _differentiable_attention():
        stored = [attempt("reverse-over-reverse"), attempt("linearize")]
        if not any(stored) and not attempt("forward-over-reverse"):
            attempt("reverse-over-reverse-recomputed")
    if not timings:
        detail = "; ".join(f"{m}: {type(e).__name__}: {e}" for m, e in errors.items())
        raise RuntimeError(f"hvp_fn(mode='auto'): no mode could compute a product ({detail})")
    mode = min(timings, key=timings.get)
    return Matvec(built[mode], params, mode, timings)


def _memory_light_mode(f: Callable[..., Tensor], params: Tree, *args: Any, **kwargs: Any) -> str:
    """The mode that stores nothing between products: forward-over-reverse where f's
    operations support forward-mode AD (cheaper), else reverse-over-reverse-recomputed."""
    probe = pytree.tree_map(torch.ones_like, params)
    try:
        with _differentiable_attention():
            _forward_over_reverse(_scalar_fn(f), params, args, kwargs)(probe)
        return "forward-over-reverse"
    except RuntimeError as err:
        if _is_forward_ad_gap(err):
            return "reverse-over-reverse-recomputed"
        raise
