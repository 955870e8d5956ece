"""Conjugate gradients for (H + δI) x = b on pytrees, stopping at negative curvature."""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._operator import Operator, isfinite
from .._outcome import finish, finish_all, solve_result
from .._progress import Progress
from .._types import ChunkSize, MatvecFn, ProgressArg, Tree
from ..results import SolveResult, Status
from .system import LinearSystem, check_tol_damping, finite_rhs, iteration_limit, non_finite_message

# Recompute the true residual b − Ax this often: the recursive residual drifts from it
# in floating point, and convergence must be judged on the real one.
_RESIDUAL_REFRESH = 50


def cg(
    matvec: MatvecFn,
    b: Tree,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    x0: Optional[Tree] = None,
    preconditioner: Optional[Callable[[Tree], Tree]] = None,
    progress: ProgressArg = False,
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
        >>> import torch, hvpfunc as hf
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> hf.cg(lambda v: A @ v, torch.tensor([1.0, 2.0]), tol=1e-6).x
        tensor([0.0909, 0.6364])

    References:
        Hestenes & Stiefel, J. Res. NBS 49 (1952); Steihaug, SIAM J. Numer. Anal. 20
        (1983); Saad, *Iterative Methods for Sparse Linear Systems*, 2nd ed., §6.7.
    """
    check_tol_damping(tol, damping)
    system = LinearSystem(matvec, b, damping=damping, max_iters=max_iters, preconditioner=preconditioner)
    op, bf, b_norm, limit, A, M = system.op, system.b, system.b_norm, system.limit, system.A, system.M
    if b_norm == 0.0:
        return system.zero_solution()

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
    status, message = Status.MAX_ITERS, f"max_iters={limit} iterations reached. {Status.MAX_ITERS.remedy}"
    bar = Progress(progress, total=limit, desc="cg")
    try:
        it = 0
        while True:
            if r_norm <= target:
                true_r = bf - A(x)  # confirm on the true residual before declaring success
                r_norm = float(torch.linalg.vector_norm(true_r))
                if r_norm <= target:
                    status, message = Status.CONVERGED, ""
                    break
                r, z = true_r, M(true_r)
                p, rz = z.clone(), float(torch.dot(true_r, z))
            if it >= limit:
                break
            Ap = A(p)
            curvature = float(torch.dot(p, Ap))
            if not isfinite(curvature):
                status, message = Status.NON_FINITE, non_finite_message()
                break
            if curvature <= 0:
                status, message = Status.NEGATIVE_CURVATURE, _negative_curvature_message(curvature)
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
    return finish(system.result(x, status, message, r_norm, {"iterations": it}), "cg")


def _negative_curvature_message(curvature: float) -> str:
    return (
        f"found a direction p with pᵀ(H + δI)p = {curvature:.3g} ≤ 0: the operator is not "
        "positive definite, so CG cannot solve this system. Add damping larger than the "
        "most negative eigenvalue's magnitude (hf.lanczos(..., which='SA') finds it), or "
        "hf.minres, which solves indefinite systems."
    )


def cg_batched(
    matvec: MatvecFn,
    b: Tree,
    *,
    damping: float = 0.0,
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> List[SolveResult]:
    """Solve (H + δI) xₖ = bₖ for K right-hand sides at once by conjugate gradients.

    Each system runs its own CG recurrence, exactly as :func:`cg` (relative tolerance,
    true-residual confirmation and refresh every 50 iterations, a stop at negative
    curvature); the products of all unfinished systems in one iteration go through
    one batched call of the matvec (``torch.func.vmap`` in chunks of ``chunk_size``),
    which on a GPU costs far less per vector than K separate solves. A system that
    finishes drops out of the batch.

    Args:
        matvec: ``v -> H v`` on trees shaped like one right-hand side.
        b: the right-hand sides stacked: every leaf has a leading dimension K.
        damping: δ ≥ 0 added to the diagonal.
        tol: relative residual tolerance, per system.
        max_iters: most iterations per system; default ``min(10 n, 1000)``.
        chunk_size: rows per ``vmap`` call: ``"auto"`` (16 on a GPU; on a CPU a loop,
            or chunks of 16 where they proved faster, as in :func:`hvpfunc.trace`), an
            integer, or ``None`` for all at once.
        progress: ``True`` for a progress bar, or a callable
            ``progress(step, unfinished_systems)``.

    Returns:
        A list of K :class:`~hvpfunc.SolveResult`, one per right-hand side, each with
        its own ``x`` (a tree without the leading dimension), status and product count.
        One :class:`~hvpfunc.ConvergenceWarning` lists the systems that did not converge.

    Raises:
        ValueError: leaves of ``b`` with different leading dimensions, non-finite ``b``,
            bad ``tol``/``damping``/``max_iters``.

    Example:
        >>> import torch, hvpfunc as hf
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> B = torch.tensor([[1.0, 2.0], [0.0, 1.0]])          # two right-hand sides
        >>> [r.x for r in hf.cg_batched(lambda v: A @ v, B, tol=1e-6)]
        [tensor([0.0909, 0.6364]), tensor([-0.0909,  0.3636])]
    """
    check_tol_damping(tol, damping)
    leaves = pytree.tree_leaves(b)
    if not leaves or any(leaf.dim() == 0 for leaf in leaves):
        raise ValueError("b must be a tree whose leaves all have a leading dimension K")
    sizes = {int(leaf.shape[0]) for leaf in leaves}
    if len(sizes) != 1:
        raise ValueError(f"the leaves of b have different leading dimensions {sorted(sizes)}")
    like = pytree.tree_map(lambda leaf: leaf[0], b)
    op = Operator(matvec, like, name="b[0]")
    B = finite_rhs(op.layout.flatten(b, batch_dims=1))
    K = B.shape[0]
    limit = iteration_limit(max_iters, op.n)

    def A(rows: Tensor) -> Tensor:
        out = op.batch(rows, chunk_size=chunk_size)
        return out + damping * rows if damping else out

    b_norms = torch.linalg.vector_norm(B, dim=1)
    targets = tol * b_norms
    X = torch.zeros_like(B)
    R = B.clone()
    P = R.clone()
    rr = (R * R).sum(dim=1)
    status = [Status.MAX_ITERS] * K
    messages = [f"max_iters={limit} iterations reached. {Status.MAX_ITERS.remedy}"] * K
    products = [0] * K
    iterations = [0] * K
    residuals = b_norms.tolist()
    active = [i for i in range(K) if b_norms[i] > 0]
    for i in range(K):
        if b_norms[i] == 0:
            status[i], messages[i], residuals[i] = Status.CONVERGED, "b is zero, so x = 0", 0.0
    bar = Progress(progress, total=limit, desc=f"cg ({K} systems)")
    try:
        while active:
            idx = torch.tensor(active, device=B.device)
            r_norms = torch.sqrt(rr[idx]).tolist()
            done = [i for i, r in zip(active, r_norms) if r <= float(targets[i])]
            if done:  # confirm on the true residual, as cg does
                d = torch.tensor(done, device=B.device)
                true = B[d] - A(X[d])
                for i in done:
                    products[i] += 1
                true_norms = torch.linalg.vector_norm(true, dim=1).tolist()
                for row, (i, t) in enumerate(zip(done, true_norms)):
                    residuals[i] = t
                    if t <= float(targets[i]):
                        status[i], messages[i] = Status.CONVERGED, ""
                        active.remove(i)
                    else:  # restart this system from its true residual
                        R[i], P[i], rr[i] = true[row], true[row], (true[row] * true[row]).sum()
            active = [i for i in active if iterations[i] < limit]
            if not active:
                break
            idx = torch.tensor(active, device=B.device)
            AP = A(P[idx])
            curvature = (P[idx] * AP).sum(dim=1)
            keep = []
            for row, i in enumerate(active):
                products[i] += 1
                c = float(curvature[row])
                if not math.isfinite(c):
                    status[i], messages[i] = Status.NON_FINITE, non_finite_message()
                elif c <= 0:
                    status[i], messages[i] = Status.NEGATIVE_CURVATURE, _negative_curvature_message(c)
                else:
                    keep.append(row)
            if not keep:
                active = []
                break
            rows = torch.tensor(keep, device=B.device)
            kept = idx[rows]
            step = rr[kept] / curvature[rows]
            X[kept] += step[:, None] * P[kept]
            R[kept] -= step[:, None] * AP[rows]
            active = [active[row] for row in keep]
            for i in active:
                iterations[i] += 1
            refresh = [i for i in active if iterations[i] % _RESIDUAL_REFRESH == 0]
            if refresh:
                f = torch.tensor(refresh, device=B.device)
                R[f] = B[f] - A(X[f])
                for i in refresh:
                    products[i] += 1
            rr_new = (R[kept] * R[kept]).sum(dim=1)
            P[kept] = R[kept] + (rr_new / rr[kept])[:, None] * P[kept]
            rr[kept] = rr_new
            for i in active:
                residuals[i] = float(torch.sqrt(rr[i]))
            bar.update(float(len(active)))
    finally:
        bar.close()
    results = [
        solve_result(
            op.layout.unflatten(X[i].clone()),
            status[i],
            messages[i],
            num_matvecs=products[i],
            residual_norm=residuals[i],
            stats={"iterations": iterations[i]},
        )
        for i in range(K)
    ]
    return finish_all(results, "cg_batched")
