"""MINRES for symmetric, possibly indefinite, (H + δI) x = b on pytrees."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .._operator import attainable_tol
from .._outcome import finish
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import MatvecFn, ProgressArg, Tree
from ..results import SolveResult, Status
from .system import LinearSystem, non_finite_message, stall_message

# The share of the true residual that must remain, at the least-squares test's second
# pass, for a system to be called inconsistent (see minres).
_STALLED = 0.9
# ... asked again after this many iterations more (not in proportion to those done: in
# finite precision the test passes only for a while, then the lost orthogonality makes x
# drift; on a softmax Hessian it passed from iteration 61 to 83, again from 136)
_RECHECK = 10
_INCONSISTENT = (
    "b is not in the range of H + δI to the tolerance (a singular or numerically singular, "
    "inconsistent system): x is the least-squares iterate reached, and the residual left "
    "lies (to tol) in the null space. Add damping for a regularized solution."
)


@in_plain_autograd
def minres(
    matvec: MatvecFn,
    b: Tree,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    x0: Optional[Tree] = None,
    preconditioner: Optional[MatvecFn] = None,
    progress: ProgressArg = False,
) -> SolveResult:
    """Solve (H + δI) x = b by MINRES, for symmetric H of any inertia.

    MINRES minimizes the residual ‖b − Ax‖ over the Krylov spaces of A = H + δI with a
    three-term Lanczos recurrence and Givens rotations (Paige & Saunders 1975). Unlike
    CG it needs only symmetry: it is the solver for the indefinite Hessians of
    non-convex losses, where CG stops at negative curvature and the Neumann series
    diverges. On a singular but consistent system it converges to a solution; on an
    inconsistent one (b not in the range of A) it stops at a least-squares iterate,
    ‖Ar‖ ≤ tol·‖A‖‖r‖ (Paige & Saunders' second test), once the residual has stalled
    for ten iterations with that test passing: a consistent system whose condition
    number exceeds 1/tol passes the test too, while its residual still falls.

    The residual norm is known from the recurrence at every step; when it meets
    ``tol · ‖b‖`` the true residual b − Ax is computed (one product) and convergence is
    declared only if it meets the tolerance too.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``b``; H symmetric.
        b: right-hand side, a finite tree.
        damping: δ (any sign) added to the diagonal.
        tol: relative residual tolerance; below 2 ε of the products'
            dtype (ε its unit roundoff) it is raised to 2 ε, with a warning.
        max_iters: most iterations (one product each); default ``min(10 n, 1000)``.
        x0: start (default zeros; one more product to form its residual).
        preconditioner: ``r -> M⁻¹ r`` on trees with M symmetric positive definite
            (MINRES needs a definite preconditioner even for an indefinite H).
        progress: ``True`` for a progress bar, or a callable
            ``progress(step, estimated_rel_residual)``.

    Returns:
        :class:`~hvpfunc.SolveResult`; ``status`` is ``"converged"``, ``"max_iters"``,
        ``"inconsistent"`` (the Krylov space became invariant above the tolerance: b is
        not in the range of a singular H + δI) or ``"non_finite"``, with a
        :class:`~hvpfunc.ConvergenceWarning` for all but the first.

    Raises:
        ValueError: non-finite ``b`` or ``x0``, bad ``tol`` or ``max_iters``, structure
            mismatches (naming the leaf).

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([-2.0, 1.0, 3.0]))   # indefinite: CG would stop
        >>> hf.minres(lambda v: H @ v, torch.ones(3), tol=1e-6).x
        tensor([-0.5000,  1.0000,  0.3333])

    References:
        Paige & Saunders, "Solution of sparse indefinite systems of linear equations",
        SIAM J. Numer. Anal. 12 (1975); Choi, Paige & Saunders, "MINRES-QLP", SIAM J.
        Sci. Comput. 33 (2011).
    """
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not math.isfinite(damping):
        raise ValueError(f"damping must be finite, got {damping}")
    system = LinearSystem(matvec, b, damping=damping, max_iters=max_iters, preconditioner=preconditioner)
    tol = attainable_tol(tol, system.op.layout.product_eps, "minres")
    op, bf, b_norm, limit, A, M = system.op, system.b, system.b_norm, system.limit, system.A, system.M
    if b_norm == 0.0:
        return system.zero_solution()

    eps = torch.finfo(op.dtype).eps
    goal = target = tol * b_norm  # the true residual must meet goal; target is the estimate's
    # where the least-squares test last passed with the goal missed: the true residual,
    # the iterate, and the iteration from which the test is asked again
    lsq_residual: Optional[float] = None
    lsq_x: Optional[Tensor] = None
    recheck = 0
    confirmed = math.inf  # the true residual at the last confirmation that missed the goal
    kept = None  # the iterate there
    # The vectors are updated in place, the product written into a spare buffer: a
    # fresh tensor per operation (about 15 an iteration) cost 11.6 ms outside the 14
    # products of a solve on a 400k-parameter MLP (7.2 ms in place).
    if x0 is None:
        x, r1, start_norm = torch.zeros_like(bf), bf.clone(), b_norm
    else:
        x = system.start(x0)
        r1 = bf - A(x)
        start_norm = system.norm(r1)
        if start_norm <= goal:
            return finish(system.result(x, Status.CONVERGED, "", start_norm, {"iterations": 0}), "minres")
    y = M(r1)
    beta1 = math.sqrt(max(system.dot(r1, y), 0.0))
    if preconditioner is not None and not beta1 > 0:
        raise ValueError("the preconditioner is not positive definite: bᵀM⁻¹b ≤ 0")
    oldb, beta, dbar, epsln, phibar, tnorm2, gmax = 0.0, beta1, 0.0, 0.0, beta1, 0.0, 0.0
    cs, sn = -1.0, 0.0
    v = torch.empty_like(bf)
    w = torch.zeros_like(bf)
    w2 = torch.zeros_like(bf)
    spare = torch.empty_like(bf)  # where the next product goes
    r2 = r1
    # phibar estimates the M⁻¹-norm of the residual; scale it to compare with ‖b‖.
    estimate_scale = start_norm / beta1
    status, message = Status.MAX_ITERS, f"max_iters={limit} iterations reached. {Status.MAX_ITERS.remedy}"
    residual_norm = start_norm
    it = 0
    bar = Progress(progress, total=limit, desc="minres")
    try:
        while it < limit:
            it += 1
            torch.div(y, beta, out=v)
            y = A(v, out=spare)
            if it >= 2:
                y.sub_(r1, alpha=beta / oldb)
            alfa = system.dot(v, y)
            y.sub_(r2, alpha=alfa / beta)
            # r1's buffer is free now, unless it is r2's too (the first iteration)
            spare = r1 if r1 is not r2 else torch.empty_like(bf)
            r1, r2 = r2, y
            y = M(r2)
            oldb = beta
            beta = math.sqrt(max(system.dot(r2, y), 0.0))
            if not (math.isfinite(alfa) and math.isfinite(beta)):
                status, message = Status.NON_FINITE, non_finite_message()
                break
            tnorm2 += alfa * alfa + oldb * oldb + beta * beta
            oldeps = epsln
            delta = cs * dbar + sn * alfa
            gbar = sn * dbar - cs * alfa
            epsln = sn * beta
            dbar = -cs * beta
            gamma = math.hypot(gbar, beta)
            # ‖A r‖ / (‖A‖ ‖r‖) for the current x (Paige & Saunders' test2): at most tol,
            # r is orthogonal to the range of A to that tolerance, so x is a least-squares
            # solution (or the system is consistent and ill-conditioned: see below). A
            # gamma at rounding level relative to the largest one (a condition estimate
            # of 1/ε) would divide by ~0 in the update below (plain MINRES then returns
            # entries of order 1/ε): stop before the update, at the iterate reached.
            degenerate = gamma <= 10 * eps * max(gmax, gamma)
            least_squares = math.hypot(gbar, dbar) <= tol * math.sqrt(tnorm2)
            if degenerate or (least_squares and it >= recheck):
                residual_norm = system.norm(bf - A(x))
                if residual_norm <= goal:
                    status, message = Status.CONVERGED, ""
                    break
                # A consistent system passes the least-squares test too where κ(A) > 1/tol
                # (‖Ar‖ ≥ ‖r‖/‖A⁻¹‖): at tol 1e-2 in float32 every system of scipy's
                # MINRES tests (Poisson, κ = 660) was called inconsistent after two
                # products. Inconsistent it is only if the residual then stalls: the test
                # is asked again some iterations later, and the better iterate kept.
                if degenerate or (lsq_residual is not None and residual_norm >= _STALLED * lsq_residual):
                    if lsq_residual is not None and lsq_residual < residual_norm:
                        x, residual_norm = lsq_x, lsq_residual
                    status, message = Status.INCONSISTENT, _INCONSISTENT
                    break
                lsq_residual, lsq_x, recheck = residual_norm, x.clone(), it + _RECHECK
            gmax = max(gmax, gamma)
            cs, sn = gbar / gamma, beta / gamma
            phi = cs * phibar
            phibar = sn * phibar
            # w = (v − ε w₁ − δ w₂)/γ with w₁, w₂ the two previous w: into w₁'s buffer
            w1, w2 = w2, w
            w = torch.add(v, w1, alpha=-oldeps, out=w1).add_(w2, alpha=-delta).div_(gamma)
            x.add_(w, alpha=phi)
            estimate = phibar * estimate_scale
            bar.update(estimate / b_norm)
            if estimate <= target or beta <= eps * abs(alfa):
                # the recurrence says done (or the Krylov space became invariant):
                # confirm on the true residual
                residual_norm = system.norm(bf - A(x))
                if residual_norm <= goal:
                    status, message = Status.CONVERGED, ""
                    break
                if beta <= eps * abs(alfa):
                    status, message = Status.INCONSISTENT, _INCONSISTENT
                    break
                if residual_norm >= confirmed:
                    x, residual_norm = kept, confirmed  # the earlier confirmation's iterate is better
                    status, message = Status.MAX_ITERS, stall_message(confirmed, goal, "MINRES's estimate")
                    break
                confirmed, kept = residual_norm, x.clone()
                target /= 2  # rounding left the true residual behind the estimate
        else:
            residual_norm = system.norm(bf - A(x))
    finally:
        bar.close()
    return finish(system.result(x, status, message, residual_norm, {"iterations": it}), "minres")
