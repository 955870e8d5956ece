"""Linear algebra on pytrees of tensors: the layer every other module stands on.

A *tree* is any nesting of dicts, lists, tuples and namedtuples whose leaves are
tensors (``torch.utils._pytree`` decides what a node is). Vectors in hvpfunc are
trees shaped like the parameters; nothing here flattens them.

Element-wise operations use ``torch._foreach_*`` kernels when the leaves allow it
(plain tensors on one device, no ``torch.func`` transform active), which turns one
kernel launch per leaf into a handful per tree; under ``vmap``/``grad`` they fall
back to per-leaf operations, which those transforms support.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._sharding import is_dtensor, rank_generator
from ._sharding import random_like as sharded_random_like
from ._types import Tree

__all__ = [
    "Tree",
    "leaves_with_paths",
    "check_tree",
    "check_like",
    "numel",
    "dot",
    "norm",
    "add",
    "sub",
    "scale",
    "axpy",
    "zeros_like",
    "random_like",
    "stack",
    "unstack",
    "index",
]



def leaves_with_paths(tree: Tree) -> Tuple[List[Tuple[str, Any]], pytree.TreeSpec]:
    """Return ``[(key_path_string, leaf), ...]`` and the tree's spec.

    The key path is written the way ``torch.utils._pytree.keystr`` writes it, e.g.
    ``"['layer']['weight']"`` or ``"[0][1]"``; a bare tensor has the path ``"<root>"``.
    """
    with_path, spec = pytree.tree_flatten_with_path(tree)
    return [(pytree.keystr(path) or "<root>", leaf) for path, leaf in with_path], spec


def check_tree(tree: Tree, *, name: str = "params") -> None:
    """Raise ``TypeError`` unless every leaf of ``tree`` is a real floating-point tensor.

    The message names the first offending leaf by its key path.
    """
    leaves, _ = leaves_with_paths(tree)
    if not leaves:
        raise ValueError(f"{name} has no tensor leaves; expected a pytree of floating-point tensors")
    for path, leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(
                f"{name}{_fmt(path)} is a {type(leaf).__name__}, expected a floating-point tensor"
            )
        if not leaf.is_floating_point():
            raise TypeError(
                f"{name}{_fmt(path)} has dtype {leaf.dtype}, expected a real floating-point tensor"
            )


def check_like(
    tree: Tree, like: Tree, *, name: str = "v", like_name: str = "params", batch_dims: int = 0
) -> None:
    """Raise a clear error unless ``tree`` matches ``like`` leaf for leaf.

    Checks tree structure, then every leaf's type, shape, dtype and device.
    ``batch_dims`` leading dimensions of each leaf of ``tree`` are ignored (and must
    agree across leaves), for stacked trees.

    Raises:
        ValueError: different structure, shape or device (the message names the key path
            and both values).
        TypeError: a leaf is not a tensor or has another dtype.
    """
    if _matches(tree, like, batch_dims):
        return
    leaves, spec = leaves_with_paths(tree)
    like_leaves, like_spec = leaves_with_paths(like)
    if spec != like_spec:
        got = sorted(p for p, _ in leaves)
        want = sorted(p for p, _ in like_leaves)
        missing = [p for p in want if p not in got]
        extra = [p for p in got if p not in want]
        detail = ""
        if missing:
            detail += f" missing leaves {missing}"
        if extra:
            detail += f" unexpected leaves {extra}"
        if not detail and [p for p, _ in leaves] != [p for p, _ in like_leaves]:
            detail = (
                " the same keys in another order (trees are matched leaf by leaf, in order); "
                f"build {name} in the order of {like_name}, e.g. {{k: {name}[k] for k in {like_name}}}"
            )
        if not detail:
            detail = f" container types differ: {_kinds(tree)} vs {_kinds(like)}"
        raise ValueError(f"{name} does not have the tree structure of {like_name}:{detail}")
    batch_shape = None
    for (path, leaf), (_, ref) in zip(leaves, like_leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name}{_fmt(path)} is a {type(leaf).__name__}, expected a tensor")
        if is_dtensor(leaf) != is_dtensor(ref):
            kinds = ("a DTensor", "a plain tensor") if is_dtensor(leaf) else ("a plain tensor", "a DTensor (sharded)")
            raise TypeError(
                f"{name}{_fmt(path)} is {kinds[0]}, but {like_name}{_fmt(path)} is {kinds[1]}: build vectors "
                f"like {like_name}, e.g. with hvpfunc.tree.random_like({like_name}) or torch.ones_like"
            )
        shape = tuple(leaf.shape)
        if batch_dims:
            lead, shape = shape[:batch_dims], shape[batch_dims:]
            if batch_shape is None:
                batch_shape = lead
            elif lead != batch_shape:
                raise ValueError(
                    f"{name}{_fmt(path)} has leading (batch) shape {lead}, but other leaves "
                    f"have {batch_shape}"
                )
        if shape != tuple(ref.shape):
            raise ValueError(
                f"{name}{_fmt(path)} has shape {shape}, but {like_name}{_fmt(path)} has "
                f"shape {tuple(ref.shape)}"
            )
        if leaf.dtype != ref.dtype:
            raise TypeError(
                f"{name}{_fmt(path)} has dtype {leaf.dtype}, but {like_name}{_fmt(path)} has "
                f"dtype {ref.dtype}"
            )
        if leaf.device != ref.device:
            raise ValueError(
                f"{name}{_fmt(path)} is on device {leaf.device}, but {like_name}{_fmt(path)} "
                f"is on {ref.device}"
            )


def _matches(tree: Tree, like: Tree, batch_dims: int) -> bool:
    """The common case, cheaply: every leaf a tensor with the right shape, dtype and device
    (solvers check their vectors on every product). Mismatches go to the slow path,
    which finds the leaf to name."""
    leaves, spec = pytree.tree_flatten(tree)
    like_leaves, like_spec = pytree.tree_flatten(like)
    if spec != like_spec:
        return False
    lead = None
    for leaf, ref in zip(leaves, like_leaves):
        if not isinstance(leaf, Tensor) or leaf.dtype != ref.dtype or leaf.device != ref.device:
            return False
        if is_dtensor(leaf) != is_dtensor(ref):
            return False
        shape = leaf.shape
        if batch_dims:
            if lead is None:
                lead = shape[:batch_dims]
            elif shape[:batch_dims] != lead:
                return False
            shape = shape[batch_dims:]
        if shape != ref.shape:
            return False
    return True


def _kinds(tree: Tree) -> str:
    """The container types of a tree, outermost first, without pytree's spec dump."""
    spec = pytree.tree_structure(tree)
    kinds, todo = [], [spec]
    while todo and len(kinds) < 6:
        node = todo.pop(0)
        if node.type is not None and not node.is_leaf():
            kinds.append(node.type.__name__)
            todo.extend(node.children())
    return " > ".join(dict.fromkeys(kinds)) or "a single leaf"


def _fmt(path: str) -> str:
    return "" if path == "<root>" else path


def _leaves(tree: Tree) -> List[Tensor]:
    return pytree.tree_leaves(tree)


def _foreach_ok(*leaf_lists: Sequence[Tensor]) -> bool:
    """Whether the ``torch._foreach_*`` kernels apply to these leaves."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return False
    first = leaf_lists[0]
    if not first:
        return False
    device = first[0].device
    return all(
        type(t) is Tensor and t.device == device for leaves in leaf_lists for t in leaves
    )


def numel(tree: Tree) -> int:
    """Total number of scalar entries in the tree: the dimension of the vector space."""
    return sum(leaf.numel() for leaf in _leaves(tree))


def dot(a: Tree, b: Tree) -> Tensor:
    """Euclidean inner product ⟨a, b⟩ = Σ_leaves Σ_i a_i b_i, a 0-dim tensor.

    Leaves of different dtypes are promoted before summing.
    """
    la, lb = _leaves(a), _leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"dot: trees have {len(la)} and {len(lb)} leaves")
    if _foreach_ok(la, lb) and len({t.dtype for t in la + lb}) == 1:
        parts = torch._foreach_mul(la, lb)
        return torch.stack([p.sum() for p in parts]).sum()
    total = None
    for x, y in zip(la, lb):
        term = (x * y).sum()
        total = term if total is None else total + term
    return total


def norm(a: Tree) -> Tensor:
    """Euclidean norm ‖a‖ = sqrt(Σ a_i²) over all leaves, a 0-dim tensor."""
    la = _leaves(a)
    if _foreach_ok(la) and len({t.dtype for t in la}) == 1:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(la)))
    return torch.sqrt(sum((x * x).sum() for x in la))


def _map2(fn_foreach: Callable, fn_leaf: Callable, a: Tree, b: Tree) -> Tree:
    la, spec = pytree.tree_flatten(a)
    lb = _leaves(b)
    if len(la) != len(lb):
        raise ValueError(f"trees have {len(la)} and {len(lb)} leaves")
    if _foreach_ok(la, lb):
        out = fn_foreach(la, lb)
    else:
        out = [fn_leaf(x, y) for x, y in zip(la, lb)]
    return pytree.tree_unflatten(list(out), spec)


def add(a: Tree, b: Tree) -> Tree:
    """Leaf-wise a + b."""
    return _map2(torch._foreach_add, torch.add, a, b)


def sub(a: Tree, b: Tree) -> Tree:
    """Leaf-wise a − b."""
    return _map2(torch._foreach_sub, torch.sub, a, b)


def scale(alpha: float | Tensor, a: Tree) -> Tree:
    """α · a for a Python or 0-dim tensor scalar α."""
    la, spec = pytree.tree_flatten(a)
    if _foreach_ok(la) and not isinstance(alpha, Tensor):
        return pytree.tree_unflatten(list(torch._foreach_mul(la, alpha)), spec)
    return pytree.tree_unflatten([alpha * x for x in la], spec)


def axpy(alpha: float | Tensor, x: Tree, y: Tree) -> Tree:
    """α · x + y, the BLAS ``axpy``, leaf-wise."""
    lx, ly = _leaves(x), _leaves(y)
    _, spec = pytree.tree_flatten(y)
    if _foreach_ok(lx, ly) and not isinstance(alpha, Tensor):
        return pytree.tree_unflatten(list(torch._foreach_add(ly, lx, alpha=alpha)), spec)
    return pytree.tree_unflatten([alpha * a + b for a, b in zip(lx, ly)], spec)


def zeros_like(like: Tree) -> Tree:
    """A tree of zeros with the structure, shapes, dtypes and devices of ``like``."""
    return pytree.tree_map(torch.zeros_like, like)


def random_like(
    like: Tree,
    *,
    generator: Optional[torch.Generator] = None,
    kind: str = "rademacher",
    batch: Optional[int] = None,
) -> Tree:
    """A random tree shaped like ``like`` (optionally with a leading batch dimension).

    Args:
        like: tree giving structure, shapes, dtypes and devices.
        generator: source of randomness; the same generator state gives the same tree.
            ``None`` uses PyTorch's global generator (not reproducible: prefer a generator).
        kind: ``"rademacher"`` (entries ±1 with equal probability) or ``"gaussian"``
            (standard normal entries).
        batch: if given, every leaf gets a leading dimension of this size.

    The draw is made leaf by leaf in tree order, on the generator's device, then moved to
    each leaf's device, so a CPU generator gives the same numbers for CPU and GPU params.
    """
    if kind not in ("rademacher", "gaussian"):
        raise ValueError(f"kind must be 'rademacher' or 'gaussian', got {kind!r}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    lead = () if batch is None else (batch,)

    def numbers(shape: tuple, dtype: torch.dtype, source: Optional[torch.Generator]) -> Tensor:
        if kind == "rademacher":
            return torch.randint(0, 2, shape, generator=source, device=gen_device).to(dtype).mul_(2).sub_(1)
        return torch.randn(shape, generator=source, device=gen_device, dtype=dtype)

    # DTensor leaves (sharded parameters): each rank draws its own shards, from a
    # generator seeded by one shared draw and its rank
    own = rank_generator(generator) if any(map(is_dtensor, pytree.tree_leaves(like))) else None

    def draw(leaf: Tensor) -> Tensor:
        if is_dtensor(leaf):
            return sharded_random_like(leaf, lambda shape: numbers(shape, leaf.dtype, own).to(leaf.device), lead)
        return numbers(lead + tuple(leaf.shape), leaf.dtype, generator).to(leaf.device)

    return pytree.tree_map(draw, like)


def stack(trees: Sequence[Tree]) -> Tree:
    """Stack trees of equal structure along a new leading dimension of every leaf."""
    if not trees:
        raise ValueError("stack needs at least one tree")
    flat = [pytree.tree_flatten(t) for t in trees]
    spec = flat[0][1]
    for i, (_, s) in enumerate(flat):
        if s != spec:
            raise ValueError(f"stack: tree {i} has a different structure from tree 0")
    leaves = [torch.stack(group) for group in zip(*(f[0] for f in flat))]
    return pytree.tree_unflatten(leaves, spec)


def unstack(tree: Tree) -> List[Tree]:
    """Inverse of :func:`stack`: split the leading dimension into a list of trees."""
    leaves, spec = pytree.tree_flatten(tree)
    n = leaves[0].shape[0]
    return [pytree.tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(n)]


def index(tree: Tree, i: int | slice) -> Tree:
    """Index the leading dimension of every leaf: ``tree[i]`` leaf-wise."""
    return pytree.tree_map(lambda leaf: leaf[i], tree)
