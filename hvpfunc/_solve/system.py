"""(H + δI) x = b as the iterative solvers see it: checked inputs, the counted operator,
and the products with A = H + δI and with M⁻¹."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._operator import Operator, check_count, norm
from .._outcome import solve_result
from .._types import MatvecFn, Tree
from ..results import SolveResult, Status


def check_tol_damping(tol: float, damping: float) -> None:
    """A positive relative tolerance and a non-negative damping, for the solvers that
    need a positive-definite H + δI."""
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not damping >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")


def stall_message(norm: float, target: float, estimate: str) -> str:
    """Why a solver stopped when a restart from its true residual did not lower it:
    ``estimate`` (its own running residual) met the target, ‖b − (H + δI)x‖ did not."""
    return (
        f"the true residual ‖b − (H + δI)x‖ stalls at {norm:.3g} above the target {target:.3g} while "
        f"{estimate} meets it: rounding in the products sets this floor (about ε·κ‖b‖). Loosen tol, "
        "precondition, or compute in float64."
    )


def finite_rhs(b: Tensor) -> Tensor:
    """The flat right-hand side(s), refused if any entry is nan or inf."""
    if not bool(torch.isfinite(b).all()):
        raise ValueError("b has non-finite entries (nan or inf)")
    return b


def iteration_limit(max_iters: Optional[int], n: int) -> int:
    """``max_iters``, default ``min(10 n, 1000)``; negative is an error."""
    limit = check_count(max_iters, "max_iters") if max_iters is not None else min(10 * n, 1000)
    if limit < 0:
        raise ValueError(f"max_iters must be non-negative, got {max_iters}")
    return limit


def non_finite_message(what: str = "a product") -> str:
    return f"{what} was not finite (nan or inf); the last finite iterate is returned"


class LinearSystem:
    """The counted operator, b flat and checked, the iteration limit, and the products
    with A = H + δI and with M⁻¹."""

    def __init__(
        self,
        matvec: MatvecFn,
        b: Tree,
        *,
        damping: float,
        max_iters: Optional[int] = None,
        preconditioner: Optional[MatvecFn] = None,
    ):
        self.op = Operator(matvec, b, name="b")
        self.b = finite_rhs(self.op.layout.flatten(b))
        self.limit = iteration_limit(max_iters, self.op.n)
        self.b_norm = float(norm(self.b, self.op.allsum))
        self.damping = damping
        self.preconditioner = preconditioner

    def start(self, x0: Tree) -> Tensor:
        """The flat start ``x0`` (a copy, the solver's to update), refused if any entry is
        nan or inf, or if its structure is not b's (naming the leaf)."""
        x = self.op.flatten_input(x0, name="x0")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x0 has non-finite entries (nan or inf)")
        return x

    def dot(self, a: Tensor, b: Tensor) -> float:
        """⟨a, b⟩ over every rank's shards."""
        return float(self.op.total(torch.dot(a, b)))

    def norm(self, a: Tensor) -> float:
        """‖a‖ over every rank's shards."""
        return float(norm(a, self.op.allsum))

    def A(self, v: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """(H + δI) v, written into ``out`` if given (a buffer the solver reuses; one
        pass for the damping, on the product itself)."""
        product = self.op(v, out=out)
        return product.add_(v, alpha=self.damping) if self.damping else product

    def M(self, r: Tensor) -> Tensor:
        """M⁻¹ r (the identity without a preconditioner)."""
        if self.preconditioner is None:
            return r
        return self.op.layout.flatten(self.preconditioner(self.op.layout.unflatten(r)))

    def zero_solution(self) -> SolveResult:
        """The answer for b = 0: x = 0, converged, no products."""
        return self.result(torch.zeros_like(self.b), Status.CONVERGED, "b is zero, so x = 0", 0.0)

    def result(
        self,
        x: Tensor,
        status: Status,
        message: str,
        residual_norm: float,
        stats: Optional[dict] = None,
        *,
        extra_matvecs: int = 0,
    ) -> SolveResult:
        """The solver's :class:`~hvpfunc.SolveResult` for the flat iterate ``x``."""
        return solve_result(
            self.op.layout.unflatten(x),
            status,
            message,
            num_matvecs=self.op.num_matvecs + extra_matvecs,
            residual_norm=residual_norm,
            stats=stats or {},
        )

