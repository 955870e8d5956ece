"""Power iteration for one extreme eigenpair, with spectral shifts for the algebraic ends."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple, get_args

import numpy as np
import torch
from torch import Tensor

from .._krylov import step_rounding
from .._operator import Operator, check_count, check_start, eigen_tol, isfinite, norm
from .._outcome import finish
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import MatvecFn, ProgressArg, Tree, Which
from ..results import EigResult, Status

# Two Ritz values of opposite signs whose magnitudes are at least this close (ratio) are
# reported as the cause of a stalled LM iteration.
_TIE_RATIO = 0.9


class _Run(NamedTuple):
    eigenvalue: float
    vector: Tensor
    residual: float
    status: Status
    reason: str
    norm: float  # the largest ‖(H − shift·I) q‖ seen, a lower bound of that norm
    # (μ_{k−1}, ν_{k−1}, μ_k): the last two Rayleigh quotients and the norm between them
    last_two: Optional[Tuple[float, float, float]] = None

    @property
    def converged(self) -> bool:
        return self.status is Status.CONVERGED


@in_plain_autograd
def power_iteration(
    matvec: MatvecFn,
    v0: Tree,
    *,
    which: Which = "LM",
    tol: float = 1e-6,
    max_iters: Optional[int] = 1000,
    progress: ProgressArg = False,
) -> EigResult:
    """One extreme eigenpair of a symmetric operator by power iteration.

    Power iteration q ← Hq / ‖Hq‖ converges to the eigenvector of the eigenvalue of
    largest **magnitude**, at the rate |λ₂/λ₁| per step, and its Rayleigh quotient
    λ = qᵀHq keeps its sign. On an indefinite Hessian that eigenvalue may be the most
    negative one: a negative answer is then correct, not a bug. The algebraic ends come
    from a shift: with σ = λ_LM, the operator H − σI has all eigenvalues of one sign, and
    its largest-magnitude eigenvalue is the opposite end of H's spectrum (plus σ).

    The iteration stops when both the residual ‖Hq − λq‖ and the change of λ between
    steps are at most ``tol · |λ|``, or the rounding level ``100 ε ‖H‖`` for an
    eigenvalue near zero (the residual bounds the eigenvalue error by ‖r‖²/gap, so the
    eigenvalue is usually far more accurate than ``tol``).

    Two eigenvalues of nearly equal magnitude and opposite signs (±λ) stall ``"LM"``: the
    iterate swings between their eigenvectors, separated only at the rate |λ₂/λ₁| per
    step. A run that ends at ``max_iters`` that way says so in its ``message`` with both
    values, the Ritz values of its last two iterates (a 2 × 2 Rayleigh–Ritz from scalars
    the iteration computed anyway), and points to :func:`~hvpfunc.lanczos`.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``v0``; H must be symmetric.
        v0: start vector, a nonzero finite tree. It must not be orthogonal to the wanted
            eigenvector (a random tree almost surely is not).
        which: ``"LM"`` largest magnitude (with its sign), ``"LA"`` largest algebraic,
            ``"SA"`` smallest algebraic.
        tol: relative tolerance (see above).
        max_iters: most products per run (``None``: the default, 1000); ``"LA"`` and
            ``"SA"`` may need two runs, one for the shift and one shifted, or three
            where the first cannot converge and the norm it estimated, shifted by,
            leaves the far end dominant.
        progress: ``True`` for a tqdm bar (or a text line without tqdm), or a callable
            ``progress(step, eigenvalue, residual)``.

    Returns:
        :class:`~hvpfunc.EigResult` with ``k = 1``; ``status`` is ``"converged"``,
        ``"max_iters"``, or ``"non_finite"`` (a product was nan or inf; the last finite
        estimate is returned), with a :class:`~hvpfunc.ConvergenceWarning` for the last two.

    Raises:
        ValueError: bad ``which``, ``tol`` or ``max_iters``; zero or non-finite ``v0``; a
            matvec whose output does not match ``v0`` (the message names the leaf).

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([-3.0, 1.0, 2.0], dtype=torch.float64))
        >>> v0 = torch.ones(3, dtype=torch.float64)
        >>> hf.power_iteration(lambda v: H @ v, v0, tol=1e-10).eigenvalues     # largest |λ|
        tensor([-3.], dtype=torch.float64)
        >>> hf.power_iteration(lambda v: H @ v, v0, which="LA", tol=1e-10).eigenvalues
        tensor([2.], dtype=torch.float64)

    References:
        Golub & Van Loan, *Matrix Computations*, 4th ed., §7.3 and §8.2.
    """
    if which not in get_args(Which):
        raise ValueError(f"which must be one of {get_args(Which)}, got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    max_iters = 1000 if max_iters is None else check_count(max_iters, "max_iters")
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    op = Operator(matvec, v0, name="v0")
    tol = eigen_tol(tol, op, "power_iteration")
    x0 = op.layout.flatten(v0)
    check_start(x0, name="v0", allsum=op.allsum)
    bar = Progress(progress, total=max_iters, desc=f"power iteration ({which})")
    try:
        run = _power(op, x0, shift=0.0, tol=tol, max_iters=max_iters, bar=bar)
        sign = {"LM": 0.0, "LA": 1.0, "SA": -1.0}[which]
        if sign and run.status is not Status.NON_FINITE and not (run.converged and sign * run.eigenvalue >= 0):
            # Shift so that the wanted end dominates: by the opposite end when it has
            # converged, else by the norm estimate ‖Hq‖ (ties such as ±λ stall plain
            # power iteration, which then never converges).
            shift = run.eigenvalue if run.converged else -sign * run.norm
            run = _power(op, x0, shift=shift, tol=tol, max_iters=max_iters, bar=bar)
            if run.converged and sign * (run.eigenvalue - shift) < 0:
                # ‖Hq‖ is a lower bound of ‖H‖: on H = 5I + O(10⁻⁶), where the first
                # run cannot converge, it fell mid-spectrum and the far end dominated
                # the shifted run, which was returned for the wanted end. That end,
                # converged, is a shift that leaves every λ − σ of the wanted sign.
                shift = run.eigenvalue
                run = _power(op, x0, shift=shift, tol=tol, max_iters=max_iters, bar=bar)
    finally:
        bar.close()
    message = ""
    if not run.converged:
        remedy = run.status.remedy
        stalled = which == "LM" and run.status is Status.MAX_ITERS
        partners = _opposite_partners(run.last_two, torch.finfo(op.dtype).eps) if stalled else None
        if partners is not None:
            remedy = (
                f"H has eigenvalues of nearly equal magnitude and opposite signs, about {partners[0]:.4g} and "
                f"{partners[1]:.4g} (from the last two iterates), which power iteration separates only at the "
                "rate |λ₂/λ₁| per step (never for an exact tie). Use hf.lanczos(matvec, v0, k=2, which='LM') "
                "for both, or which='LA' or 'SA' for one end."
            )
        message = f"stopped after {op.num_matvecs} products: {run.reason}; residual {run.residual:.3g}. {remedy}"
    vector = run.vector / norm(run.vector, op.allsum)
    # |λ − θ| ≤ ‖r‖ for the operator the products apply, which differs from H by their
    # rounding (as lanczos reports it; run.norm is ‖H − σI‖'s estimate, at most 2‖H‖)
    rounding = step_rounding(op) * max(abs(run.eigenvalue), run.norm) if math.isfinite(run.eigenvalue) else 0.0
    result = EigResult(
        eigenvalues=torch.tensor([run.eigenvalue], dtype=op.dtype, device=op.device),
        eigenvectors=op.layout.unflatten(vector[None]),
        converged=torch.tensor([run.converged], device=op.device),
        residuals=torch.tensor([run.residual], dtype=op.dtype, device=op.device),
        errors=torch.tensor([max(run.residual, rounding)], dtype=op.dtype, device=op.device),
        num_matvecs=op.num_matvecs,
        which=which,
        status=run.status,
        message=message,
        basis_size=2,  # the iterate and its product
    )
    return finish(result, f"power_iteration(which={which!r})")


def _power(
    op: Operator, x0: Tensor, *, shift: float, tol: float, max_iters: int, bar: Progress
) -> _Run:
    """Power iteration on H − shift·I; returns the eigenvalue of H (shift added back)."""
    q = x0 / norm(x0, op.allsum)
    best = _Run(math.nan, q, math.inf, Status.MAX_ITERS, f"max_iters={max_iters} reached", 0.0)
    previous = math.nan
    previous_norm = math.nan  # ‖(H − shift·I) q‖ of the previous iterate
    eps = torch.finfo(op.dtype).eps
    norm_estimate = 0.0
    for _ in range(max_iters):
        w = op(q)
        if shift:
            w = w - shift * q
        mu = float(op.total(torch.dot(q, w)))
        residual = float(norm(w - mu * q, op.allsum))
        if not isfinite(mu, residual):
            return best._replace(status=Status.NON_FINITE, reason="a product was not finite (nan or inf)")
        lam = mu + shift
        bar.update(lam, residual)
        norm_estimate = max(norm_estimate, abs(lam), abs(shift))
        scale = max(tol * abs(lam), 100 * eps * norm_estimate)
        size = math.hypot(mu, residual)  # ‖w‖: w − μq is orthogonal to q
        last_two = (previous - shift, previous_norm, mu) if math.isfinite(previous_norm) else None
        best = _Run(lam, q, residual, Status.MAX_ITERS, best.reason, max(best.norm, size), last_two)
        if residual <= scale and abs(lam - previous) <= scale:
            return best._replace(status=Status.CONVERGED, reason="")
        if residual == 0.0:  # q is an exact eigenvector; w may be zero, so stop here
            return best._replace(status=Status.CONVERGED, reason="")
        q = w / norm(w, op.allsum)
        previous, previous_norm = lam, size
    return best


def _opposite_partners(last_two: Optional[Tuple[float, float, float]], eps: float) -> Optional[Tuple[float, float]]:
    """The two Ritz values of span{q_{k−1}, q_k} when they have opposite signs and nearly
    equal magnitudes (the pair that stalls power iteration), else None.

    With q_k = Hq_{k−1}/ν_{k−1} everything is known from scalars: the projected pencil is
    A = [[μ_{k−1}, ν_{k−1}], [ν_{k−1}, μ_k]] with Gram matrix G = [[1, c], [c, 1]],
    c = q_{k−1}ᵀq_k = μ_{k−1}/ν_{k−1}, so no vector is kept for it. Where the iterates
    have stalled between two eigenvectors u₁, u₂, the span is theirs and the Ritz values
    are their eigenvalues. ``eps``: the products' rounding unit, which c carries."""
    if last_two is None:
        return None
    mu0, nu, mu1 = last_two
    if not nu > 0:
        return None
    c = mu0 / nu
    s2 = 1.0 - c * c
    # iterates parallel to within c's rounding (converging) span no second direction
    # that the pencil could resolve
    if not s2 > 1000 * eps:
        return None
    s = math.sqrt(s2)
    # L⁻¹ A L⁻ᵀ with G = LLᵀ, L = [[1, 0], [c, s]]
    L_inv = np.array([[1.0, 0.0], [-c / s, 1.0 / s]])
    values = np.linalg.eigvalsh(L_inv @ np.array([[mu0, nu], [nu, mu1]]) @ L_inv.T)
    low, high = float(values[0]), float(values[1])
    if low < 0 < high and min(-low, high) >= _TIE_RATIO * max(-low, high):
        return (high, low) if high >= -low else (low, high)
    return None
