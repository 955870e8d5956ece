"""Exact Hessian-vector products of a model whose parameters are sharded DTensors (FSDP2).

FSDP2's hooks support neither double backward (pytorch#172543) nor forward-mode AD
(pytorch#182641), so the loss is evaluated with the module's forward hooks switched
off (no copy: FSDP modules refuse ``deepcopy``) and its parameters passed through
``functional_call`` as plain tensors: each sharded parameter is all-gathered
(``redistribute`` to ``Replicate()``) and taken ``to_local`` with a ``Partial("avg")``
gradient, so that backward reduce-scatters the ranks' averaged gradient back into
shards. Both backward passes go through those collectives; products come back sharded
like the parameters. Each rank holds its own data: H is the mean over ranks of the
Hessians of the ranks' losses, as FSDP averages gradients.

What is gathered and kept alive: the reused graph holds every layer's full parameters
and activations (as a training step holds them without resharding), once per matvec.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List

import torch
from torch import Tensor, nn

from .._sharding import is_dtensor
from .._types import Tree
from .modes import reverse_over_reverse

# Where a module keeps the hooks its __call__ runs around forward (FSDP2 registers its
# all-gather and reshard there, and its backward hooks from inside them).
_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
MODES = ("auto", "reverse-over-reverse", "reverse-over-reverse-recomputed", "gradient-difference")


def is_sharded(named: Dict[str, Tensor]) -> bool:
    return any(is_dtensor(t) for t in named.values())


@contextlib.contextmanager
def hooks_off(model: nn.Module) -> Iterator[None]:
    """The module's own forward: every submodule's forward and backward hooks removed for
    the duration, and put back after (also when the forward raises)."""
    saved = []
    for module in model.modules():
        for attr in _HOOKS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved.append((hooks, dict(hooks)))
                hooks.clear()
    try:
        yield
    finally:
        for hooks, items in saved:
            hooks.update(items)


def gathered(t: Any) -> Any:
    """A sharded parameter as the full plain tensor, differentiably: all-gather forward;
    backward reduce-scatters the ranks' average into shards."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    mesh = t.device_mesh
    return t.redistribute(mesh, [Replicate()] * mesh.ndim).to_local(grad_placements=[Partial("avg")] * mesh.ndim)


def check_twice_differentiable(leaves: Iterable[Tensor]) -> None:
    """Raise unless DTensor's all-gather (``gathered``) has a second derivative in this
    torch, where any of ``leaves`` is a DTensor: in torch 2.11 its backward is not
    itself differentiable, so every exact product through it came back as zeros
    (autograd reported the parameters unused), with no error. Probed on the smallest
    sharded leaf with ½‖u‖², whose Hessian is the identity: one all-gather and two
    reduce-scatters, on every rank alike (every rank builds the matvec)."""
    sharded = [t for t in leaves if is_dtensor(t)]
    if not sharded:
        return
    t = min(sharded, key=lambda t: t.numel())
    x = t.detach().requires_grad_(True)
    with torch.enable_grad():
        u = gathered(x)
        (g,) = torch.autograd.grad((u * u).sum() / 2, x, create_graph=True)
        (h,) = torch.autograd.grad(g, x, torch.ones_like(g), allow_unused=True) if g.requires_grad else (None,)
    if h is None:
        raise RuntimeError(
            f"exact Hessian-vector products with sharded (DTensor) parameters need a second "
            f"derivative of DTensor's all-gather, which torch {torch.__version__} does not have (its products "
            "would be zero). Use mode='gradient-difference' (first derivatives only), or torch 2.13 or later."
        )


def matvec(loss: Callable[[Dict[str, Tensor]], Tensor], params: Dict[str, Tensor], mode: str) -> Callable[[Tree], Tree]:
    """The product for ``loss(params)`` (whose DTensors ``gathered`` makes plain):
    the reused graph (``"auto"``, ``"reverse-over-reverse"``; a fixed choice, never by
    timing, since every rank must make the same collectives), or a new graph per
    product (``"reverse-over-reverse-recomputed"``)."""
    if mode == "reverse-over-reverse-recomputed":
        return lambda v: reverse_over_reverse(loss, params, (), {})(v)
    return reverse_over_reverse(loss, params, (), {})


def batches_loss(model: nn.Module, parts: List, forward: Callable[[Dict[str, Tensor], Any], Any],
                 loss_fn: Any) -> Callable[[Dict[str, Tensor]], Tensor]:
    """Σ_b w_b loss_fn(model(x_b), y_b) with the parameters gathered and hooks off."""

    def loss(p: Dict[str, Tensor]) -> Tensor:
        with hooks_off(model):
            full = {k: gathered(t) for k, t in p.items()}
            total = None
            for weight, (x, y) in parts:
                term = loss_fn(forward(full, x), y) * weight
                total = term if total is None else total + term
            return total

    return loss
