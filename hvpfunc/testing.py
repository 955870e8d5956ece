"""Helpers for property-based test suites of Hessian code (hvpfunc's own and its users').

Dense references (:func:`dense_hessian`, :func:`dense_matrix`) flatten trees, which is
what a reference is allowed to do; assertions (:func:`assert_symmetric`,
:func:`assert_hvp_matches_hessian`) raise ``AssertionError`` with the numbers; and
hypothesis strategies (:func:`pytrees`, :func:`smooth_functions`) generate small random
parameter trees and smooth non-quadratic scalar functions of them. hypothesis is needed
only for the strategies (``pip install hypothesis``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._operator import Layout, Operator
from ._products.api import hvp_fn
from ._types import MatvecFn, Mode, Tree
from .tree import dot, norm, random_like

__all__ = [
    "dense_hessian",
    "dense_matrix",
    "assert_symmetric",
    "assert_hvp_matches_hessian",
    "pytrees",
    "smooth_functions",
]


def dense_hessian(f: Callable[..., Tensor], params: Tree, *args: Any, **kwargs: Any) -> Tensor:
    """The (n, n) Hessian of ``f(params, *args, **kwargs)``, rows and columns in the order
    of the tree's leaves (``torch.utils._pytree``).

    It uses ``torch.autograd.functional.hessian`` (double backward, one row at a time):
    independent of ``torch.func``, whose ``hessian`` (``jacfwd(jacrev(f))``) returns
    wrong numbers through ``batch_norm`` in training mode without running statistics in
    torch 2.13 (errors of order one, no warning).
    """
    layout = Layout(params, name="params")
    flat = layout.flatten(params)
    return torch.autograd.functional.hessian(
        lambda x: f(layout.unflatten(x), *args, **kwargs), flat
    )


def dense_matrix(matvec: MatvecFn, like: Tree, *, chunk_size: Optional[int] = None) -> Tensor:
    """The (n, n) matrix of a tree matvec, by applying it to the identity's rows."""
    op = Operator(matvec, like, name="like")
    eye = torch.eye(op.n, dtype=op.dtype, device=op.device)
    return op.batch(eye, chunk_size=chunk_size).T


def assert_symmetric(
    matvec: MatvecFn,
    like: Tree,
    *,
    num_pairs: int = 3,
    generator: Optional[torch.Generator] = None,
    rtol: float = 1e-5,
    atol: float = 1e-8,
) -> None:
    """Assert ⟨u, Hv⟩ = ⟨Hu, v⟩ for ``num_pairs`` random Gaussian pairs (u, v).

    Passes when |⟨u, Hv⟩ − ⟨Hu, v⟩| ≤ atol + rtol · ‖u‖ ‖v‖ ‖H‖_est, where ‖H‖_est is the
    larger of ‖Hu‖/‖u‖ and ‖Hv‖/‖v‖.

    Raises:
        AssertionError: naming both inner products and the tolerance.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    for i in range(num_pairs):
        u = random_like(like, generator=generator, kind="gaussian")
        v = random_like(like, generator=generator, kind="gaussian")
        hu, hv = matvec(u), matvec(v)
        left, right = float(dot(u, hv)), float(dot(hu, v))
        nu, nv = float(norm(u)), float(norm(v))
        scale = nu * nv * max(float(norm(hu)) / nu, float(norm(hv)) / nv)
        bound = atol + rtol * scale
        if abs(left - right) > bound:
            raise AssertionError(
                f"operator is not symmetric: pair {i}: <u, Hv> = {left!r} but <Hu, v> = "
                f"{right!r}; difference {abs(left - right):.3g} > tolerance {bound:.3g}"
            )


def assert_hvp_matches_hessian(
    f: Callable[..., Tensor],
    params: Tree,
    *args: Any,
    v: Optional[Tree] = None,
    mode: Mode = "auto",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    **kwargs: Any,
) -> None:
    """Assert that ``hvp_fn(f, params, mode=mode)(v)`` equals the dense Hessian times v.

    ``v`` defaults to a Gaussian tree from a generator seeded with 0. Use float64
    params for tight tolerances.

    Raises:
        AssertionError: with the largest absolute difference and where it is.
    """
    if v is None:
        v = random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    layout = Layout(params, name="params")
    expected = dense_hessian(f, params, *args, **kwargs) @ layout.flatten(v)
    got = layout.flatten(hvp_fn(f, params, *args, mode=mode, **kwargs)(v))
    if not torch.allclose(got, expected, rtol=rtol, atol=atol):
        err = (got - expected).abs()
        i = int(err.argmax())
        raise AssertionError(
            f"hvp_fn(mode={mode!r}) differs from the dense Hessian: largest difference "
            f"{float(err[i]):.3g} at flat index {i} (got {float(got[i])!r}, expected "
            f"{float(expected[i])!r}; rtol={rtol}, atol={atol})"
        )


def pytrees(
    *, max_leaves: int = 4, max_dim: int = 3, dtype: torch.dtype = torch.float64
) -> Any:
    """A hypothesis strategy for small pytrees of tensors.

    Trees are dicts whose values are tensors, lists or tuples of tensors (so key paths
    like ``['b'][1]`` occur), with 1 to ``max_leaves`` leaves of 0 to 2 dimensions,
    each dimension 1 to ``max_dim``, entries standard normal from a drawn seed.
    """
    from hypothesis import strategies as st

    shapes = st.lists(st.integers(1, max_dim), min_size=0, max_size=2).map(tuple)

    @st.composite
    def build(draw: Any) -> Tree:
        count = draw(st.integers(1, max_leaves))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        leaves = [torch.randn(draw(shapes), generator=gen, dtype=dtype) for _ in range(count)]
        tree: dict = {}
        i = 0
        while i < len(leaves):
            kind = draw(st.sampled_from(["leaf", "list", "tuple"]))
            key = f"p{len(tree)}"
            if kind == "leaf" or i + 1 == len(leaves):
                tree[key] = leaves[i]
                i += 1
            else:
                group = leaves[i : i + 2]
                tree[key] = list(group) if kind == "list" else tuple(group)
                i += len(group)
        return tree

    return build()


class _Smooth:
    """f(params) = Σ softplus(Wx) + c · Σ sin(Ux) ⊙ tanh(Wx) + 0.01‖x‖⁴, x the flattened
    params: smooth, non-quadratic, coupling every pair of entries, with a Hessian that
    is usually indefinite. W and U are fixed trigonometric patterns of the indices (not
    random draws, which ``vmap`` would refuse inside a transformed function)."""

    def __init__(self, a: float, b: float, coupling: float):
        self.a, self.b, self.coupling = a, b, coupling

    def __call__(self, params: Tree) -> Tensor:
        leaves = torch.utils._pytree.tree_leaves(params)
        x = torch.cat([leaf.reshape(-1) for leaf in leaves])
        n = x.shape[0]
        rows = torch.arange(1, n + 2, dtype=x.dtype, device=x.device)[:, None]
        cols = torch.arange(1, n + 1, dtype=x.dtype, device=x.device)[None, :]
        W = torch.sin(self.a * rows * cols + self.b) * (2.0 / n) ** 0.5
        U = torch.cos(self.b * rows + self.a * cols) * (2.0 / n) ** 0.5
        z = W @ x
        return (
            torch.nn.functional.softplus(z).sum()
            + self.coupling * (torch.sin(U @ x) * torch.tanh(z)).sum()
            + 0.01 * (x * x).sum() ** 2
        )

    def __repr__(self) -> str:
        return f"smooth_function(a={self.a}, b={self.b}, coupling={self.coupling})"


def smooth_functions() -> Any:
    """A hypothesis strategy for smooth non-quadratic scalar functions of any pytree."""
    from hypothesis import strategies as st

    return st.builds(
        _Smooth,
        st.floats(0.1, 3.0, allow_nan=False),
        st.floats(-3.0, 3.0, allow_nan=False),
        st.floats(0.0, 2.0, allow_nan=False),
    )
