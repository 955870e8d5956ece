"""The product API: ``hvp`` (one product), ``hvp_fn`` (a reusable matvec) and ``Matvec``."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._types import MatvecFn, Mode, Tree
from ..tree import check_like, check_tree
from .auto import choose
from .compiled import compiled_matvec
from .modes import BUILDERS, differentiable_attention, is_forward_ad_gap, scalar_fn

MODES = (
    "auto",
    "forward-over-reverse",
    "reverse-over-reverse",
    "reverse-over-reverse-recomputed",
    "linearize",
    "compiled",
)


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
        >>> import torch, hvpfunc as hf
        >>> f = lambda p, x: ((x @ p["w"]) ** 2).sum()
        >>> params = {"w": torch.ones(3)}
        >>> hf.hvp(f, params, {"w": torch.tensor([1., 0., 0.])}, torch.eye(3))
        {'w': tensor([2., 0., 0.])}
    """
    check_tree(params, name="params")
    check_like(v, params, name="v")
    grad_f = torch.func.grad(scalar_fn(f))
    with differentiable_attention():
        try:
            return torch.func.jvp(lambda p: grad_f(p, *args, **kwargs), (params,), (v,))[1]
        except RuntimeError as err:
            if not is_forward_ad_gap(err):
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

    def __init__(self, fn: MatvecFn, params: Tree, mode: str,
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
        with differentiable_attention():
            return self._fn(v)

    def __repr__(self) -> str:
        return f"Matvec(mode={self.mode!r})"


def hvp_fn(
    f: Callable[..., Tensor],
    params: Tree,
    *args: Any,
    mode: Mode = "auto",
    **kwargs: Any,
) -> Matvec:
    """A reusable matvec ``v -> H v`` for the Hessian of f at the fixed point ``params``.

    Solvers call the matvec many times at one point, so the modes that build something
    once and replay it cost less per product than those that recompute f each call.
    Every mode's matvec works under ``torch.func.vmap`` (batch the tangents only). The
    modes (measured costs: README's benchmark tables, ``python -m benchmarks``):

    * ``"reverse-over-reverse"``: the gradient's autograd graph is built once
      (``create_graph=True``) and each v back-propagated through it (Pearlmutter's
      trick, as PyHessian does it); keeps the graph alive.
    * ``"linearize"``: ``torch.func.linearize(grad(f))`` traces the tangent map once and
      replays it; tracing is slow, replays are cheap on convolutions.
    * ``"forward-over-reverse"``: ``jvp(grad(f))``, recomputed each call; stores nothing.
    * ``"reverse-over-reverse-recomputed"``: ``vjp(grad(f))``, recomputed each call;
      stores nothing and needs no forward-mode derivatives.
    * ``"auto"``: builds both stored modes, times a few products of each and keeps the
      faster; a mode that fails for lack of a derivative is skipped, and if neither
      stored mode works, the recomputing modes are tried. For one product use :func:`hvp`.
    * ``"compiled"`` (opt-in, never chosen by ``"auto"``): ``torch.compile`` of the
      product that stores nothing, checked against the eager product at construction
      (a failure to compile or a disagreement raises). Code Dynamo cannot trace runs
      eagerly between compiled pieces; under ``torch.func`` transforms the product runs
      eagerly (compiled functions cannot be called inside them, pytorch#128711).

    Missing derivatives are handled, not passed on: every mode evaluates f under the
    math kernel of ``scaled_dot_product_attention`` (the fused kernels have neither
    forward-mode AD nor a double backward); where an operation's forward-mode formula
    is broken (``F.mse_loss``, pytorch#123996) ``"auto"`` skips the forward modes and
    ``"linearize"`` raises a ``RuntimeError`` after checking one forward-mode product
    (tracing such a function crashes the process).

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
        >>> import torch, hvpfunc as hf
        >>> mv = hf.hvp_fn(lambda p: (p["w"] ** 4).sum(), {"w": torch.tensor([1., 2.])})
        >>> mv({"w": torch.ones(2)})["w"]
        tensor([12., 48.])
        >>> torch.func.vmap(mv)({"w": torch.eye(2)})["w"]   # two products at once
        tensor([[12.,  0.],
                [ 0., 48.]])
    """
    return build(f, params, args, kwargs, mode=mode)


def build(f, params, args, kwargs, *, mode: str, cache: Optional[dict] = None) -> Matvec:
    """:func:`hvp_fn`; matvecs built with one ``cache`` for the same f at several points
    or data share what can be shared (the compiled product)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_tree(params, name="params")
    params = pytree.tree_map(lambda t: t.detach(), params)
    f = scalar_fn(f)
    check_deterministic(f, params, args, kwargs)
    if mode == "auto":
        fn, chosen, timings = choose(f, params, args, kwargs)
        return Matvec(fn, params, chosen, timings)
    with differentiable_attention():
        if mode == "compiled":
            fn = compiled_matvec(f, params, args, kwargs, cache)
        else:
            fn = BUILDERS[mode](f, params, args, kwargs)
    return Matvec(fn, params, mode)


def check_deterministic(f, params, args, kwargs) -> None:
    """Evaluate f twice at the point: a function with randomness inside (dropout,
    sampling, augmentation) would make every product random, and a stored mode would
    freeze one random draw into the operator, both silently."""
    with torch.no_grad(), differentiable_attention():
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


