"""Data-parallel Hessian-vector products with ``torch.distributed``."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree

from ._types import MatvecFn, Tree

__all__ = ["data_parallel"]

_REDUCTIONS = ("mean", "sum")


def data_parallel(
    matvec: MatvecFn,
    *,
    group: Optional[Any] = None,
    reduce: Literal["mean", "sum"] = "mean",
    weight: Optional[float] = None,
) -> MatvecFn:
    """A matvec whose products are all-reduced across the ranks of a process group.

    Each rank builds the matvec of its own shard of the data (e.g. with
    :func:`hvpfunc.model_hvp_fn`) and wraps it; every rank then gets the product of the
    full-data Hessian,

    .. math:: H v = \\frac{\\sum_r w_r H_r v}{\\sum_r w_r}
              \\;(\\text{"mean"}: w_r = 1), \\qquad H v = \\sum_r H_r v \\;(\\text{"sum"}),

    so every solver runs unchanged on top, in lockstep on all ranks. Solvers must start
    from the same vector on every rank: draw it from a generator seeded identically
    (as hvpfunc's defaults are) or broadcast it.

    All leaves of a product go through one ``all_reduce`` per dtype (one collective, not
    one per parameter). Collectives cannot run under ``torch.func.vmap``, so the matvec
    raises there before any collective; instead it carries its own batched product,
    ``batched_matvec``: ``vmap`` of this rank's matvec over a stack of vectors, then one
    all-reduce for the stack. ``trace``, ``diagonal``, ``squared_frobenius_norm``,
    ``cg_batched`` and ``spectral_density`` use it with their default
    ``chunk_size="auto"``, which for this matvec means 16 vectors a collective on every
    device (a fixed rule, not a timing, so that all ranks make the same calls). If this
    rank's matvec cannot run under ``vmap``, the error comes before any collective on
    every rank alike, and ``"auto"`` loops from then on; wrapping the returned matvec
    in another function hides ``batched_matvec`` (the solvers then loop).

    Args:
        matvec: this rank's ``v -> H_r v``.
        group: the process group (default: the world).
        reduce: ``"mean"`` (default) or ``"sum"`` of the ranks' products.
        weight: with ``reduce="mean"``, this rank's weight w_r, usually its number of
            examples, so that shards of unequal size give the exact full-data average
            (default: equal weights).

    Returns:
        The all-reduced matvec.

    Raises:
        RuntimeError: ``torch.distributed`` is not initialized, or the matvec is called
            under ``vmap``.
        ValueError: unknown ``reduce``, or ``weight`` with ``reduce="sum"``.

    Example:
        Each process (here one: a real job's launcher, e.g. ``torchrun``, starts several
        and sets up the group) wraps the matvec of its shard, e.g. from
        ``hf.model_hvp_fn(model, loss_fn, my_shard)``:

        >>> import torch, torch.distributed as dist, hvpfunc as hf
        >>> from hvpfunc.distributed import data_parallel
        >>> dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        >>> H = torch.diag(torch.arange(1.0, 4.0, dtype=torch.float64))
        >>> matvec = data_parallel(lambda v: H @ v, weight=3)      # weight: my shard's examples
        >>> hf.lanczos(matvec, torch.ones(3, dtype=torch.float64), k=1).eigenvalues
        tensor([3.], dtype=torch.float64)
        >>> dist.destroy_process_group()
    """
    if reduce not in _REDUCTIONS:
        raise ValueError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
    if weight is not None and reduce != "mean":
        raise ValueError("weight applies to reduce='mean' only")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "data_parallel needs an initialized process group: call "
            "torch.distributed.init_process_group first"
        )
    share = 1.0 if weight is None else float(weight)
    # NCCL reduces CUDA tensors only; gloo and mpi take CPU tensors.
    on_cuda = dist.get_backend(group) == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    total = torch.tensor([share], dtype=torch.float64, device=device)
    dist.all_reduce(total, group=group)
    scale = share / float(total) if reduce == "mean" else 1.0
    return _Reduced(matvec, group, scale)


class _Reduced:
    """A data-parallel matvec: this rank's products, scaled and all-reduced."""

    def __init__(self, matvec: MatvecFn, group: Optional[Any], scale: float):
        self._matvec, self._group, self._scale = matvec, group, scale

    def __call__(self, v: Tree) -> Tree:
        if torch._C._functorch.peek_interpreter_stack() is not None:
            raise RuntimeError(
                "a data_parallel matvec cannot run under torch.func transforms (vmap): "
                "collectives have no batching rule. Pass chunk_size=1 to the solver."
            )
        return self._reduce(self._matvec(v))

    def batched_matvec(self, V: Tree) -> Tree:
        """Products of a stack of vectors (a leading batch dimension on every leaf):
        ``vmap`` of this rank's matvec, then one all-reduce per dtype for the whole
        stack. Solvers use it for their batched products (``op.batch``)."""
        return self._reduce(torch.func.vmap(self._matvec)(V))

    def _reduce(self, product: Tree) -> Tree:
        """All leaves through one ``all_reduce`` per dtype (one collective, not one per
        parameter)."""
        leaves, spec = pytree.tree_flatten(product)
        out = list(leaves)
        by_dtype: dict = {}
        for i, leaf in enumerate(leaves):
            by_dtype.setdefault(leaf.dtype, []).append(i)
        for indices in by_dtype.values():
            flat = torch.cat([leaves[i].reshape(-1) for i in indices]) * self._scale
            dist.all_reduce(flat, group=self._group)
            for i, part in zip(indices, torch.split(flat, [leaves[i].numel() for i in indices])):
                out[i] = part.view_as(leaves[i])
        return pytree.tree_unflatten(out, spec)
