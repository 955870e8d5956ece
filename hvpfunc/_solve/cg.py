"""Conjugate gradients for (H + δI) x = b on pytrees, stopping at negative curvature."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._operator import Operator, attainable_tol, norm, rowdot, total
from .._outcome import finish, finish_all, solve_result
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import ChunkSize, MatvecFn, ProgressArg, Tree
from ..results import SolveResult, Status
from .system import (
    LinearSystem,
    check_tol_damping,
    finite_rhs,
    iteration_limit,
    non_finite_message,
    stall_message,
)

# Curvature pᵀAp within this many rounding units of ‖A‖‖p‖² counts as zero.
_CURVATURE_FLOOR = 10.0


@in_plain_autograd
def cg(
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
    """Solve (H + δI) x = b by (preconditioned) conjugate gradients.

    CG minimizes ½xᵀAx − bᵀx over growing Krylov spaces, A = H + δI, and needs A
    symmetric positive definite; the error in the A-norm falls at least as
    2((√κ − 1)/(√κ + 1))ᵏ. It stops when ‖b − Ax‖ ≤ tol·‖b‖ (a relative tolerance), checked
    on the true residual: when the recursive residual meets the tolerance, b − Ax is
    computed (one product); if it misses, CG restarts from it, and if a restart did not
    lower it, rounding sets the floor and CG stops (``"max_iters"``, with a message).
    (Replacing the recursive residual periodically instead, keeping the directions,
    broke float32 CG on κ = 1000: 1e-3 after 1000 iterations instead of 1e-5 after 200.)

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
        tol: relative residual tolerance; below 2 ε of the products'
            dtype (ε its unit roundoff) it is raised to 2 ε, with a warning.
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
    tol = attainable_tol(tol, system.op.layout.product_eps, "cg")
    if system.b_norm == 0.0:
        return system.zero_solution()
    x = None
    if x0 is not None:
        x = system.start(x0)[None]

    def A(rows: Tensor) -> Tensor:
        return system.A(rows[0])[None]

    def M(rows: Tensor) -> Tensor:
        return system.M(rows[0])[None] if preconditioner is not None else rows

    state = _run(system.b[None], x, A, M, tol=tol, limit=system.limit, eps=system.op.layout.product_eps,
                 progress=progress, desc="cg", allsum=system.op.allsum,
                 report=lambda s: s.r_norms[0] / system.b_norm)
    result = system.result(state.X[0], state.status[0], state.messages[0], state.r_norms[0],
                           {"iterations": state.iterations[0]})
    return finish(result, "cg")


def _singular_message(curvature: float, pp: float, norm_estimate: float) -> str:
    return (
        f"found a direction p with pᵀ(H + δI)p = {curvature:.3g}, zero to rounding against "
        f"‖H + δI‖‖p‖² ≈ {norm_estimate * pp:.3g}: H + δI is singular, or numerically singular in "
        "this precision (condition number near 1/ε), and b has a component in its null space, so "
        "(H + δI)x = b has no solution to rounding; x is the last iterate. Add damping (a "
        "regularized solution), use hf.minres (a least-squares solution), or float64."
    )


def _zero_curvature_message(curvature: float, apap: float, pp: float) -> str:
    return (
        f"found a direction p with pᵀ(H + δI)p = {curvature:.3g}, zero to rounding, but "
        f"‖(H + δI)p‖/‖p‖ = {math.sqrt(apap / pp):.3g}: a positive semi-definite operator "
        "maps such a p to zero, so this one is indefinite and CG cannot solve the system. "
        "Use hf.minres, which solves indefinite systems, or add damping larger than the "
        "most negative eigenvalue's magnitude (hf.lanczos(..., which='SA') finds it)."
    )


def _negative_curvature_message(curvature: float) -> str:
    return (
        f"found a direction p with pᵀ(H + δI)p = {curvature:.3g} ≤ 0: the operator is not "
        "positive definite, so CG cannot solve this system. Add damping larger than the "
        "most negative eigenvalue's magnitude (hf.lanczos(..., which='SA') finds it), or "
        "hf.minres, which solves indefinite systems."
    )


@in_plain_autograd
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
    true-residual confirmation and restarts, a stop at negative
    curvature); the products of all unfinished systems in one iteration go through
    one batched call of the matvec (``torch.func.vmap`` in chunks of ``chunk_size``),
    which on a GPU costs far less per vector than K separate solves. A system that
    finishes drops out of the batch.

    Args:
        matvec: ``v -> H v`` on trees shaped like one right-hand side.
        b: the right-hand sides stacked: every leaf has a leading dimension K.
        damping: δ ≥ 0 added to the diagonal.
        tol: relative residual tolerance, per system; below 2 ε of the products'
            dtype (ε its unit roundoff) it is raised to 2 ε, with a warning.
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
    tol = attainable_tol(tol, op.layout.product_eps, "cg_batched")

    def A(rows: Tensor) -> Tensor:
        out = op.batch(rows, chunk_size=chunk_size)
        return out + damping * rows if damping else out

    state = _run(B, None, A, lambda rows: rows, tol=tol, limit=iteration_limit(max_iters, op.n),
                 eps=op.layout.product_eps, progress=progress,
                 desc=f"cg ({B.shape[0]} systems)", report=lambda s: float(len(s.active)), allsum=op.allsum)
    results = [
        solve_result(
            op.layout.unflatten(state.X[i].clone()),
            state.status[i],
            state.messages[i],
            num_matvecs=state.products[i],
            residual_norm=state.r_norms[i],
            stats={"iterations": state.iterations[i]},
        )
        for i in range(B.shape[0])
    ]
    return finish_all(results, "cg_batched")


@dataclass
class _State:
    """K conjugate-gradient recurrences on the rows of ``(K, n)`` tensors, between steps.

    ``active`` lists the systems still iterating; a system leaves it with its status.
    """

    B: Tensor
    X: Tensor
    R: Tensor
    P: Tensor
    rz: Tensor  # ⟨r, M⁻¹ r⟩ per row
    targets: List[float]
    r_norms: List[float]
    iterations: List[int]
    products: List[int]
    status: List[Status]
    messages: List[str]
    active: List[int]
    norm_estimates: List[float] = field(default_factory=list)  # the largest pᵀAp/‖p‖² seen, ≤ ‖A‖
    confirmed: List[float] = field(default_factory=list)  # the true residual at the last confirmation
    kept: dict = field(default_factory=dict)  # system -> its iterate at that confirmation
    floor: float = 0.0  # curvature below floor·‖A‖‖p‖² is zero to the products' rounding
    allsum: Optional[Callable[[Tensor], Tensor]] = None  # completes sums over sharded vectors

    def total(self, t: Tensor) -> Tensor:
        """Sums over the vector dimension, completed over the ranks for sharded vectors."""
        return total(t, self.allsum)


def _run(
    B: Tensor,
    X0: Optional[Tensor],
    A: Callable[[Tensor], Tensor],
    M: Callable[[Tensor], Tensor],
    *,
    tol: float,
    limit: int,
    eps: float,
    progress: ProgressArg,
    desc: str,
    report: Callable[[_State], float],
    allsum: Optional[Callable[[Tensor], Tensor]] = None,
) -> _State:
    """CG on every row of B until each converges, fails or reaches ``limit`` iterations.

    ``A`` and ``M`` map rows to rows: (H + δI) and M⁻¹, one batched call per step.
    """
    state = _start(B, X0, A, M, tol, limit, allsum)
    state.floor = _CURVATURE_FLOOR * eps
    bar = Progress(progress, total=limit, desc=desc)
    try:
        while state.active:
            _confirm(state, A, M)
            state.active = [i for i in state.active if state.iterations[i] < limit]
            if not state.active:
                break
            _step(state, A, M)
            bar.update(report(state))
    finally:
        bar.close()
    return state


def _start(B: Tensor, X0: Optional[Tensor], A, M, tol: float, limit: int,
           allsum: Optional[Callable[[Tensor], Tensor]]) -> _State:
    K = B.shape[0]
    b_norms = norm(B, allsum, dim=1).tolist()
    products = [0] * K
    if X0 is None:
        X, R = torch.zeros_like(B), B.clone()
    else:
        X, R = X0.clone(), B - A(X0)
        products = [1] * K
    Z = M(R)
    status = [Status.MAX_ITERS] * K
    messages = [f"max_iters={limit} iterations reached. {Status.MAX_ITERS.remedy}"] * K
    active = []
    for i, b_norm in enumerate(b_norms):
        if b_norm == 0.0:
            X[i] = 0.0
            status[i], messages[i] = Status.CONVERGED, "b is zero, so x = 0"
        else:
            active.append(i)
    rz = rowdot(R, Z)
    return _State(
        B=B, X=X, R=R, P=Z.clone(), rz=total(rz, allsum),
        targets=[tol * b for b in b_norms],
        r_norms=norm(R, allsum, dim=1).tolist(),
        iterations=[0] * K, products=products, status=status, messages=messages, active=active,
        norm_estimates=[0.0] * K, confirmed=[math.inf] * K, allsum=allsum,
    )


def _rows(indices: List[int], K: int):
    """An index for the rows ``indices``: a slice when they are all rows in order, so that
    a single system (``cg``) updates its vectors in place instead of gathering copies."""
    if len(indices) == K and indices == list(range(K)):
        return slice(None)
    return torch.tensor(indices, dtype=torch.long)


def _take(tensor: Tensor, rows) -> Tensor:
    """``tensor[rows]``; the tensor itself for all rows (a view would cost a dispatch)."""
    return tensor if isinstance(rows, slice) else tensor[rows]


def _confirm(state: _State, A, M) -> None:
    """Rows whose recursive residual meets the target: converged if the true residual
    b − Ax does too, else restarted from it (the recursive residual drifts from it)."""
    done = [i for i in state.active if state.r_norms[i] <= state.targets[i]]
    if not done:
        return
    rows = _rows(done, state.B.shape[0])
    true = state.B[rows] - A(state.X[rows])
    for i in done:
        state.products[i] += 1
    restart = []
    for row, (i, true_norm) in enumerate(zip(done, norm(true, state.allsum, dim=1).tolist())):
        state.r_norms[i] = true_norm
        if true_norm <= state.targets[i]:
            state.status[i], state.messages[i] = Status.CONVERGED, ""
            state.active.remove(i)
        elif true_norm >= state.confirmed[i]:
            # the recursion met the tolerance twice, the true residual did not move: rounding.
            # The iterate of the earlier confirmation is the better one.
            state.X[i], state.r_norms[i] = state.kept.pop(i), state.confirmed[i]
            message = stall_message(state.confirmed[i], state.targets[i], "CG's recursive residual")
            state.status[i], state.messages[i] = Status.MAX_ITERS, message
            state.active.remove(i)
        else:
            state.confirmed[i] = true_norm
            state.kept[i] = state.X[i].clone()
            restart.append(row)
    if restart:
        picked = torch.tensor(restart, dtype=torch.long)
        index = torch.tensor([done[r] for r in restart], dtype=torch.long)
        R = true[picked]
        Z = M(R)
        state.R[index], state.P[index] = R, Z
        state.rz[index] = state.total(rowdot(R, Z))


def _step(state: _State, A, M) -> None:
    """One CG iteration of every active system, with one batched product; a system whose
    curvature pᵀAp is not finite or not positive stops there with that status."""
    K = state.B.shape[0]
    idx = _rows(state.active, K)
    P = _take(state.P, idx)
    AP = A(P)
    both = state.total(torch.stack([rowdot(P, AP), rowdot(P, P)]))  # one collective
    curvature = both[0]
    keep = []
    host = both.tolist()  # one transfer
    for row, (i, c, pp) in enumerate(zip(state.active, *host)):
        state.products[i] += 1
        if not math.isfinite(c):
            state.status[i], state.messages[i] = Status.NON_FINITE, non_finite_message()
            continue
        before = state.norm_estimates[i]  # ‖A‖ as the earlier directions showed it
        state.norm_estimates[i] = max(before, abs(c) / pp)
        zero = state.floor * state.norm_estimates[i] * pp
        if c < -zero:
            state.status[i], state.messages[i] = Status.NEGATIVE_CURVATURE, _negative_curvature_message(c)
        elif c <= zero:
            # pᵀAp ≈ 0 with Ap ≠ 0: a positive semi-definite A has ‖Ap‖² ≤ ‖A‖ pᵀAp, at
            # rounding level here, so A is indefinite (b = e₆ of scipy's 11 × 11
            # saddle-point system "sym-nonpd", consistent, was called inconsistent). The
            # bar lies midway, in orders of magnitude, between that level and ‖A‖²‖p‖²,
            # ‖A‖ estimated from the earlier directions; at the first, where none was,
            # any Ap ≠ 0. ‖Ap‖² only here (every rank takes this branch alike).
            apap = float(state.total(rowdot(AP[row : row + 1], AP[row : row + 1]))[0])
            if apap > math.sqrt(state.floor) * before**2 * pp:
                state.status[i], state.messages[i] = Status.NEGATIVE_CURVATURE, _zero_curvature_message(c, apap, pp)
            else:
                # and Ap ≈ 0: p lies in the null space of a positive semi-definite A,
                # which CG only reaches when b has a component there. The step would be 1/ε.
                state.status[i], state.messages[i] = (Status.INCONSISTENT,
                                                      _singular_message(c, pp, state.norm_estimates[i]))
        else:
            keep.append(row)
    state.active = [state.active[row] for row in keep]
    if not keep:
        return
    if len(keep) < curvature.shape[0]:
        picked = torch.tensor(keep, dtype=torch.long)
        AP, curvature = AP[picked], curvature[picked]
    kept = _rows(state.active, K)
    # With every system active, kept is a slice and these are views: updated in place.
    X, R, P, rz = (_take(t, kept) for t in (state.X, state.R, state.P, state.rz))
    step = rz.div(curvature).unsqueeze_(1)
    X.addcmul_(step, P)
    R.addcmul_(step, AP, value=-1.0)
    for i in state.active:
        state.iterations[i] += 1
    Z = M(R)
    rz_new = state.total(rowdot(R, Z))
    torch.addcmul(Z, P, rz_new.div(rz).unsqueeze_(1), out=P)  # p = z + βp in one pass
    rz.copy_(rz_new)
    if not isinstance(kept, slice):  # gathered copies: scatter them back
        state.X[kept], state.R[kept], state.P[kept], state.rz[kept] = X, R, P, rz
    # without a preconditioner ⟨r, M⁻¹r⟩ is ‖r‖²: no pass over R for its norm
    r_norms = rz_new.clamp(min=0).sqrt() if Z is R else norm(R, state.allsum, dim=1)
    for i, r_norm in zip(state.active, r_norms.tolist()):
        state.r_norms[i] = r_norm
