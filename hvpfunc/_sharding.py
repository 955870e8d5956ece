"""Vectors whose leaves are DTensors sharded across processes (FSDP2's ``fully_shard``).

Each rank keeps its local shards: a solver's flat vector on a rank is the concatenation
of that rank's local pieces, and the global vector is the concatenation of all ranks'
flat vectors, a fixed permutation of the parameters. Inner products and norms are
invariant under that permutation, so a solver needs only one change: every sum over the
vector dimension is completed by an all-reduce over the mesh (one per Gram–Schmidt pass,
not one per leaf). Nothing is gathered whole, so a basis takes 1/world of its memory.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def _dtensor_type() -> Optional[type]:
    # No DTensor exists before its module is imported; importing it only to ask (0.4 s,
    # with torch.fx's symbolic shapes) would slow down every process's first matvec
    api = sys.modules.get("torch.distributed.tensor._api")
    return None if api is None else api.DTensor


def is_dtensor(x: Any) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(x, DTensor)


class Sharding:
    """How the leaves of a tree are sharded: one mesh, each leaf's placements, global
    shape and stride."""

    def __init__(self, leaves: Sequence[Tensor], paths: Sequence[str], name: str):
        first = next(i for i, leaf in enumerate(leaves) if is_dtensor(leaf))
        self.mesh = leaves[first].device_mesh
        for path, leaf in zip(paths, leaves):
            if not is_dtensor(leaf):
                raise ValueError(
                    f"{name}{path} is a plain tensor but {name}{paths[first]} is a DTensor: "
                    "sharded vectors need every leaf sharded on one device mesh"
                )
            if leaf.device_mesh != self.mesh:
                raise ValueError(f"{name}{path} is on another device mesh than {name}{paths[first]}")
            if self.mesh.ndim != 1 or any(not p.is_shard() for p in leaf.placements):
                raise NotImplementedError(
                    f"{name}{path} has placements {leaf.placements} on a {self.mesh.ndim}-D mesh: hvpfunc "
                    "supports leaves sharded (Shard(dim)) on a 1-D mesh, as fully_shard makes them"
                )
        self.group = self.mesh.get_group()
        self.placements = [leaf.placements for leaf in leaves]
        self.global_shapes = [tuple(leaf.shape) for leaf in leaves]
        self.strides = [leaf.stride() for leaf in leaves]

    def allsum(self, t: Tensor) -> Tensor:
        """The sum over ranks of t (each rank's partial sums over its shards)."""
        t = t.contiguous().clone()
        dist.all_reduce(t, group=self.group)
        return t

    def rebuild(self, parts: List[Tensor], lead: tuple = ()) -> List[Tensor]:
        """DTensors from local pieces shaped as this rank's shards, after ``lead``
        leading dimensions (a stack of vectors: eigenvectors, iterates)."""
        return [wrap(part, self.mesh, placements, shape, stride, lead)
                for part, placements, shape, stride in zip(parts, self.placements, self.global_shapes, self.strides)]


def wrap(part: Tensor, mesh: Any, placements: tuple, shape: tuple, stride: Optional[tuple], lead: tuple = ()) -> Tensor:
    """The DTensor whose local piece on this rank is ``part``, placed as a leaf of global
    ``shape`` with ``placements``, after ``lead`` stacking dimensions (its shards then
    lie ``len(lead)`` dimensions further)."""
    from torch.distributed.tensor import DTensor, Shard

    if lead:
        placements = tuple(Shard(p.dim + len(lead)) if p.is_shard() else p for p in placements)
        shape = tuple(lead) + tuple(shape)
        stride = _contiguous_strides(shape)
    return DTensor.from_local(part.contiguous(), mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=stride)


def random_like(leaf: Tensor, draw: Callable[[tuple], Tensor], lead: tuple) -> Tensor:
    """A random DTensor placed as ``leaf`` (stacked after ``lead``): this rank draws its
    own shard with ``draw(shape)``."""
    part = draw(tuple(lead) + tuple(leaf.to_local().shape))
    return wrap(part, leaf.device_mesh, leaf.placements, tuple(leaf.shape), leaf.stride(), lead)


def rank_generator(generator: Optional[torch.Generator]) -> torch.Generator:
    """A generator for this rank's shards of a random vector: seeded from one draw of
    ``generator`` (the same on every rank, which keeps the ranks' generators in step)
    and the rank, so that the ranks' parts are independent."""
    device = generator.device if generator is not None else torch.device("cpu")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=device))
    return torch.Generator(device=device).manual_seed(seed + dist.get_rank())


def _contiguous_strides(shape: tuple) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def whole(t: Tensor) -> Tensor:
    """A DTensor as its full value on every rank (for 0-dim results: norms, inner
    products); other tensors unchanged."""
    return t.full_tensor() if is_dtensor(t) else t


def local(leaf: Tensor) -> Tensor:
    """A leaf's local piece (the leaf itself when it is not a DTensor)."""
    return leaf.to_local() if is_dtensor(leaf) else leaf
