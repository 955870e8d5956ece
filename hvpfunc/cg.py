"""Conjugate gradients for (H + δI) x = b on pytrees, stopping at negative curvature."""

from __future__ import annotations

import warnings
from types import MappingProxyType
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._operator import _isfinite, _Operator
from ._progress import _Progress
from .results import ConvergenceWarning, SolveResult

__all__ = ["cg"]

Tree = Any

# Recompute the true residual b − Ax this often: the recursive residual drifts from it
# in floating point, and convergence must be judged on the real one.
_RESIDUAL_REFRESH = 50


def cg(
    matvec: Callable[[Tree], Tree],
    b: Tree,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    x0: Optional[Tree] = None,
    preconditioner: Optional[Callable[[Tree], Tree]] = None,
    progress: Any = False,
) -> SolveResult:
    """Solve (H + δI) x = b by (preconditioned) conjugate gradients.

    CG minimizes ½xᵀAx − bᵀx over growing Krylov spaces, A = H + δI, and needs A
    symmetric positive definite; the error in the A-norm falls at least as
    2((√κ − 1)/(√κ + 1))ᵏ. It stops when ‖b − Ax‖ ≤ tol·‖b‖ (a relative tolerance), checked
    on the true residual: the recursive residual is replaced by b − Ax every 50
    iterations and when it first meets the tolerance.

    On an indefinite A (a non-convex loss) a direction with pᵀAp ≤ 0 appears; CG then
    stops (the truncated-CG convention of Steihaug and PETSc) with
    ``status="negative_curvature"``, ``converged=False`` and the current finite iterate,
    rather than a silently wrong answer. Damping δ > |λ_min| makes A positive definite;
    :func:`hvpfunc.minres` solves the indefinite system as it is.
    CG never falls back to the normal equations (that squares the condition number).

    Args:
        matvec: ``v -> H v`` on trees shaped like ``b``; H symmetric.
        b: right-hand side, a finite tree.
        damping: δ ≥ 0 added to the diagonal.
        tol: relative residual tolerance.
        max_iters: most iterations (one product each); default ``min(10 n, 1000)`` for
            dimension n.
        x0: start (default zeros; one more product to form its residual).
        preconditioner: ``r -> M⁻¹ r`` on trees, M symmetric positive definite
            (e.g. a diagonal estimate from :func:`hvpfunc.diagonal` plus damping).
        progress: ``True`` for a progress bar, or a callable ``progress(step, rel_residual)``.

    Returns:
        :class:`~hvpfunc.SolveResult`; ``status`` is ``"converged"``, ``"max_iters"``,
        ``"negative_curvature"`` or ``"non_finite"`` (a product was nan/inf; the last
        finite iterate is returned). A :class:`~hvpfunc.ConvergenceWarning` accompanies
        every status but ``"converged"``.

    Raises:
        ValueError: ``b`` or ``x0`` not finite, bad ``tol``/``damping``/``max_iters``, or
            a structure mismatch between ``b``, ``x0`` and the matvec's output (the message
            names the leaf).

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> cg(lambda v: A @ v, torch.tensor([1.0, 2.0]), tol=1e-8).x
        tensor([0.0909, 0.6364])

    References:
        Hestenes & Stiefel, J. Res. NBS 49 (1952); Steihaug, SIAM J. Numer. Anal. 20
        (1983); Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., §6.7.
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not damping >= 0:
        raise ValueError(f"damping must be non-negative, got {damping}")
    op = _Operator(matvec, b, name="b")
    bf = op.layout.flatten(b)
    if not bool(torch.isfinite(bf).all()):
        raise ValueError("b has non-finite entries (nan or inf)")
    limit = max_iters if max_iters is not None else min(10 * op.n, 1000)
    if limit < 0:
        raise ValueError(f"max_iters must be non-negative, got {max_iters}")
    b_norm = float(torch.linalg.vector_norm(bf))
    if b_norm == 0.0:
        return SolveResult(op.layout.unflatten(torch.zeros_like(bf)), True, "converged", 0, 0.0,
                           "b is zero, so x = 0")

    def A(v: Tensor) -> Tensor:
        return op(v) + damping * v if damping else op(v)

    def M(r: Tensor) -> Tensor:
        if preconditioner is None:
            return r
        return op.layout.flatten(preconditioner(op.layout.unflatten(r)))

    if x0 is None:
        x = torch.zeros_like(bf)
        r = bf.clone()
    else:
        x = op.flatten_input(x0, name="x0")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x0 has non-finite entries (nan or inf)")
        r = bf - A(x)
    target = tol * b_norm
    z = M(r)
    p = z.clone()
    rz = float(torch.dot(r, z))
    r_norm = float(torch.linalg.vector_norm(r))
    status, message = "max_iters", f"max_iters={limit} iterations reached"
    bar = _Progress(progress, total=limit, desc="cg")
    try:
        it = 0
        while True:
            if r_norm <= target:
                true_r = bf - A(x)  # confirm on the true residual before declaring success
                r_norm = float(torch.linalg.vector_norm(true_r))
                if r_norm <= target:
                    status, message = "converged", ""
                    break
                r, z = true_r, M(true_r)
                p, rz = z.clone(), float(torch.dot(true_r, z))
            if it >= limit:
                break
            Ap = A(p)
            curvature = float(torch.dot(p, Ap))
            if not _isfinite(curvature):
                status, message = "non_finite", "a product was not finite (nan or inf)"
                break
            if curvature <= 0:
                status = "negative_curvature"
                message = (
                    f"found a direction p with pᵀ(H + δI)p = {curvature:.3g} ≤ 0: the operator "
                    "is not positive definite, so CG cannot solve this system. Add damping "
                    "larger than the most negative eigenvalue's magnitude (hf.lanczos(..., "
                    "which='SA') finds it), or hf.minres, which solves indefinite systems."
                )
                break
            step = rz / curvature
            x = x + step * p
            it += 1
            if it % _RESIDUAL_REFRESH == 0:
                r = bf - A(x)
            else:
                r = r - step * Ap
            z = M(r)
            rz_new = float(torch.dot(r, z))
            p = z + (rz_new / rz) * p
            rz = rz_new
            r_norm = float(torch.linalg.vector_norm(r))
            bar.update(r_norm / b_norm)
    finally:
        bar.close()
    converged = status == "converged"
    if not converged:
        warnings.warn(f"cg: {status}: {message}", ConvergenceWarning, stacklevel=2)
    return SolveResult(
        x=op.layout.unflatten(x),
        converged=converged,
        status=status,
        num_matvecs=op.num_matvecs,
        residual_norm=r_norm,
        message=message,
        stats=MappingProxyType({"iterations": it}),
    )
