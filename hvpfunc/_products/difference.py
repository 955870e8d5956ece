"""Hessian-vector products from gradient differences: any engine that gives gradients.

H v ≈ (∇f(θ + hv) − ∇f(θ − hv)) / 2h needs two gradients and no second derivative, so it
works where double backward and forward-mode AD do not: FSDP2's and DDP's hooks, fused
kernels without a double backward, compiled or wrapped models. It is an approximation
whose error this module bounds by choosing h (:func:`step_size`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from .._sharding import whole
from .._types import Tree


def richardson_by_dtype(dtype: torch.dtype) -> bool:
    """The default: a Richardson step below float64. A central difference alone gives
    about ε^{2/3} (2e-5 in float32, measured up to 9e-5 on a BatchNorm network, whose
    eigenvalues it moved by 2.5e-4); with Richardson's step 3e-5 and 7e-5, at four
    gradients a product instead of two. In float64 the central difference gives 1e-10."""
    return torch.finfo(dtype).eps > 1e-10


def step_size(theta: Tree, v: Tree, *, richardson: bool) -> Tensor:
    """The difference step h: ε^{1/3} · max(1, ‖θ‖) / ‖v‖, or ε^{1/5} · ... with Richardson.

    A central difference has truncation error O(h²) (O(h⁴) after one Richardson step) and
    rounding error O(ε/h) in the gradients: h ∝ ε^{1/3} (ε^{1/5}) balances them, for a
    relative error about ε^{2/3} (ε^{4/5}); the step moves θ by a fixed fraction of its
    size, or of 1 near the origin (Nocedal & Wright, *Numerical Optimization*, §8.1).
    Returned as a tensor, so that it works under ``vmap`` over v.
    """
    leaves = pytree.tree_leaves(theta)
    eps = torch.finfo(leaves[0].dtype).eps
    scale = _norm(leaves).clamp(min=1.0)
    return eps ** (0.2 if richardson else 1 / 3) * scale / _norm(pytree.tree_leaves(v))


def quotient(gradient: Callable[[Any], Tree], h: Any, *, richardson: bool) -> Tree:
    """(g(h) − g(−h)) / 2h with g(s) = ∇f(θ + s v); with ``richardson``, the combination
    (4 D(h/2) − D(h)) / 3 of two such quotients, which cancels the h² term."""

    def central(step: Any) -> Tree:
        plus, minus = gradient(step), gradient(-step)
        return pytree.tree_map(lambda a, b: (a - b) / (2 * step), plus, minus)

    if not richardson:
        return central(h)
    coarse, fine = central(h), central(h / 2)
    return pytree.tree_map(lambda c, f: (4 * f - c) / 3, coarse, fine)


def _norm(leaves: List[Tensor]) -> Tensor:
    """‖(leaves)‖₂ as a plain tensor (a sharded DTensor's norm is over all its shards)."""
    total = sum(whole(torch.linalg.vector_norm(leaf.detach().double())) ** 2 for leaf in leaves)
    return torch.as_tensor(total).sqrt()


def functional(f: Callable[..., Tensor], params: Tree, args: tuple, kwargs: dict, *,
               richardson: Optional[bool] = None) -> Callable[[Tree], Tree]:
    """The matvec of ``mode="gradient-difference"`` for a function f(params, ...);
    ``richardson`` defaults to :func:`richardson_by_dtype`."""
    grad_f = torch.func.grad(f)
    if richardson is None:
        richardson = richardson_by_dtype(pytree.tree_leaves(params)[0].dtype)

    def matvec(v: Tree) -> Tree:
        h = step_size(params, v, richardson=richardson)

        def gradient(s: Tensor) -> Tree:
            moved = pytree.tree_map(lambda p, d: p + (s * d).to(p.dtype), params, v)
            return grad_f(moved, *args, **kwargs)

        return quotient(gradient, h.to(pytree.tree_leaves(params)[0].dtype), richardson=richardson)

    return matvec


def live_module(
    model: nn.Module,
    names: List[str],
    base: Dict[str, Tensor],
    passes: Callable[[], Iterable[Tuple[float, Callable[[], Tensor]]]],
    around: Callable[[], Any],
    *,
    richardson: Optional[bool] = None,
    buffers_at: Optional[Dict[str, Tensor]] = None,
) -> Callable[[Tree], Tree]:
    """The matvec of ``mode="gradient-difference"`` on a live module.

    Each gradient runs the module's own forward and backward (``loss.backward()``, so
    the hooks of FSDP2, DDP or any wrapper run as in training) with the parameters
    ``names`` set to base + s·v in place and the others at ``base``; ``passes()`` yields
    (weight, loss thunk) per batch and ``around()`` is a context for each loss (dropout
    off). Before returning, the module's parameters, their ``.grad`` and its buffers are
    put back from copies taken first (bit for bit, not by subtracting the step), also
    when the loss raises. ``richardson`` defaults to :func:`richardson_by_dtype`;
    ``buffers_at`` gives buffers' values for every pass in place of the module's.
    """
    live = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    if richardson is None:
        richardson = richardson_by_dtype(next(iter(base.values())).dtype)

    def gradient(point: Dict[str, Tensor], saved_buffers: Dict[str, Tensor]) -> Dict[str, Tensor]:
        with torch.no_grad():
            for name, value in point.items():
                live[name].copy_(value)
            for name, value in saved_buffers.items():  # running statistics: every pass from the same state
                buffers[name].copy_(value)
        for p in live.values():
            p.grad = None
        for weight, loss in passes():
            with around():
                value = loss()
            (value * weight).backward()
        return {n: live[n].grad.detach().clone() if live[n].grad is not None else torch.zeros_like(live[n])
                for n in names}

    def matvec(v: Tree) -> Tree:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError(
                "mode='gradient-difference' on a module cannot run under torch.func transforms "
                "(vmap): it sets the module's parameters in place. Pass chunk_size=1 to the solver."
            )
        saved = {n: p.detach().clone() for n, p in live.items()}
        grads = {n: p.grad for n, p in live.items()}
        saved_buffers = {n: b.detach().clone() for n, b in buffers.items() if b is not None}
        start_buffers = {**saved_buffers, **(buffers_at or {})}
        try:
            # a number, not a tensor: a plain 0-dim tensor does not mix with DTensor parameters
            h = float(step_size({n: base[n] for n in names}, v, richardson=richardson))

            def at(s: float) -> Tree:
                point = dict(base)
                for n in names:
                    point[n] = base[n] + s * v[n]
                return gradient(point, start_buffers)

            return quotient(at, h, richardson=richardson)
        finally:
            with torch.no_grad():
                for n, p in live.items():
                    p.copy_(saved[n])
                for n, b in saved_buffers.items():
                    buffers[n].copy_(b)
            for n, p in live.items():
                p.grad = grads[n]

    return matvec
