"""Truncated Neumann series for H⁻¹b, scaled and guarded, and its stochastic form LiSSA."""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, NamedTuple, Optional, Union

import torch
from torch import Tensor

from .._eigen.power import power_iteration
from .._operator import attainable_tol, check_count
from .._outcome import finish
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import MatvecFn, ProgressArg, Tree
from ..results import SolveResult, Status
from .system import LinearSystem, check_tol_damping, non_finite_message, stall_message

# A symmetric contraction can only shrink the terms; growth beyond rounding proves the
# spectral radius is at least one. LiSSA's products are sampled, so its terms may
# fluctuate upward while the series still converges on average: it tolerates more.
_NEUMANN_GROWTH = 1.01
_LISSA_GROWTH = 10.0


@in_plain_autograd
def neumann(
    matvec: MatvecFn,
    b: Tree,
    *,
    alpha: Optional[float] = None,
    num_terms: int = 100,
    tol: float = 1e-6,
    damping: float = 0.0,
    progress: ProgressArg = False,
) -> SolveResult:
    """Approximate (H + δI)⁻¹ b by the scaled, truncated Neumann series.

    .. math:: x_J = \\alpha \\sum_{j=0}^{J-1} (I - \\alpha A)^j\\, b, \\qquad A = H + \\delta I

    The series converges if and only if the spectral radius of I − αA is below one,
    that is 0 < α(λ + δ) < 2 for every eigenvalue λ of H. With α ≈ 1/λ_max it needs
    about κ·ln(1/tol) terms (CG needs about √κ·ln(2/tol): prefer :func:`hvpfunc.cg`).
    Any eigenvalue with λ + δ ≤ 0 (a non-convex loss) makes it diverge for every α > 0.

    The residual of the partial sum is the next term, b − A x_J = (I − αA)^J b, so it
    is known without extra products: the series stops when it is ≤ tol·‖b‖ and the true
    residual b − A x_J confirms it (one product: in floating point the two drift apart;
    if the true one misses the tolerance the series goes on from it). For symmetric
    A with spectral radius below one the terms' norms can only decrease, so when a term
    grows (by more than 1% over the smallest so far) the series is diverging: it stops
    at once with ``status="diverged"`` and returns the partial sum with the smallest
    residual, the last one before the growth, never the exploding numbers.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``b``; H symmetric.
        b: right-hand side, a finite tree.
        alpha: the step α > 0. ``None`` (default) estimates ‖H‖ by power iteration
            started from b (tolerance 1e-3, at most 100 products) and takes
            α = 1/(‖H‖ + δ), which converges whenever H + δI is positive definite. If
            the estimate finds a negative eigenvalue with λ + δ ≤ 0, nothing more is
            computed: ``status="indefinite"``.
        num_terms: most terms J (one product each). The default 100 is a budget, not a
            promise: ``converged`` says whether it sufficed.
        tol: relative residual tolerance; below 2 ε of the products'
            dtype (ε its unit roundoff) it is raised to 2 ε, with a warning.
        damping: δ ≥ 0 added to the diagonal.
        progress: ``True`` for a progress bar, or a callable ``progress(step, rel_residual)``.

    Returns:
        :class:`~hvpfunc.SolveResult` with ``status`` ``"converged"``, ``"max_iters"``
        (terms exhausted), ``"diverged"``, ``"indefinite"`` or ``"non_finite"`` (a
        product was nan or inf; the last finite partial sum is returned); ``message`` says why and
        what to do; ``stats`` holds ``alpha``, ``terms`` and, when α was estimated,
        ``alpha_num_matvecs`` and ``norm_estimate``. A
        :class:`~hvpfunc.ConvergenceWarning` accompanies every status but ``"converged"``.

    Raises:
        ValueError: non-positive ``alpha``, ``num_terms`` or ``tol``, negative
            ``damping``, non-finite ``b``, structure mismatches (naming the leaf).

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> b = torch.ones(3, dtype=torch.float64)
        >>> hf.neumann(lambda v: H @ v, b, alpha=1.0).status      # α·3 > 2: diverges
        <Status.DIVERGED: 'diverged'>
        >>> hf.neumann(lambda v: H @ v, b, tol=1e-6).x            # α = 1/‖H‖ chosen
        tensor([1.0000, 0.5000, 0.3333], dtype=torch.float64)

    References:
        Lorraine, Vicol & Duvenaud, "Optimizing millions of hyperparameters by implicit
        differentiation", AISTATS (2020); Liao et al., "Reviving and improving recurrent
        back-propagation", ICML (2018).
    """
    _check_options(num_terms, tol, damping)
    if alpha is not None and not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    system = LinearSystem(matvec, b, damping=damping)
    tol = attainable_tol(tol, system.op.layout.product_eps, "neumann")
    zero = torch.zeros_like(system.b)
    stats: dict = {}
    if alpha is None and bool(system.b.any()):
        with warnings.catch_warnings():
            # its outcome is read below; its own tolerance (raised with half-precision
            # products) is not the user's
            warnings.simplefilter("ignore")
            est = power_iteration(matvec, b, which="LM", tol=1e-3, max_iters=100)
        lam, res = float(est.eigenvalues[0]), float(est.residuals[0])
        norm_estimate = math.sqrt(lam * lam + res * res)  # ‖Hq‖ for the unit vector q
        stats.update(alpha_num_matvecs=est.num_matvecs, norm_estimate=norm_estimate)
        if est.status is Status.NON_FINITE:
            return finish(system.result(zero, Status.NON_FINITE, non_finite_message(
                "a product estimating alpha"), system.b_norm, stats, extra_matvecs=est.num_matvecs), "neumann")
        if bool(est.converged[0]) and lam + damping <= 0:
            message = (
                f"H has an eigenvalue λ ≈ {lam:.4g} with λ + damping ≤ 0: the Neumann series "
                "diverges for every alpha > 0. Add damping above "
                f"{-lam:.4g}, or use hf.cg (which reports the negative curvature it meets)."
            )
            return finish(system.result(zero, Status.INDEFINITE, message, system.b_norm, stats,
                                        extra_matvecs=est.num_matvecs), "neumann")
        alpha = 1.0 / (norm_estimate + damping)
    stats["alpha"] = alpha
    run = _series(system, lambda step: matvec, alpha=alpha, num_terms=num_terms, tol=tol,
                  growth=_NEUMANN_GROWTH, name="neumann", progress=progress, confirm=True)
    result = system.result(run.x, run.status, run.message, run.residual_norm, {**stats, "terms": run.terms},
                           extra_matvecs=stats.get("alpha_num_matvecs", 0))
    return finish(result, "neumann")


@in_plain_autograd
def lissa(
    matvecs: Union[MatvecFn, Iterable[MatvecFn]],
    b: Tree,
    *,
    scale: float,
    damping: float = 0.0,
    num_terms: int = 1000,
    tol: float = 1e-6,
    progress: ProgressArg = False,
) -> SolveResult:
    """LiSSA: the Neumann series with a fresh (e.g. mini-batch) Hessian at every step.

    The recursion of Agarwal et al. as used for influence functions (Koh & Liang),

    .. math:: h_{j+1} = b + (1 - d)\\, h_j - H_j h_j / s, \\qquad x = h / s,

    has the fixed point x = (H + s·d·I)⁻¹ b: the **effective damping is scale × damping**,
    and the step is α = 1/scale, so it is :func:`neumann` with ``alpha=1/scale``,
    ``damping=scale*damping`` and a sampled H_j per term. It converges in expectation
    when 0 < (λ + s·d)/s < 2 for the eigenvalues λ of E[H]: ``scale`` must exceed half of
    λ_max. Divergence is detected as in :func:`neumann`, with a looser threshold
    (a term 10× the smallest) since sampled terms fluctuate.

    Args:
        matvecs: one matvec, or an iterable giving one matvec per step (e.g. a generator
            of ``model_hvp_fn(model, loss, batch)[0]`` over a data loader); the series
            stops when it runs out.
        b: right-hand side.
        scale: s > 0.
        damping: d ≥ 0.
        num_terms: most terms.
        tol: stops when a term's norm is ≤ tol·‖b‖ (with sampled products, a term's norm
            estimates the residual, not exactly).
        progress: ``True`` for a progress bar, or a callable ``progress(step, rel_term)``.

    Returns:
        :class:`~hvpfunc.SolveResult` as for :func:`neumann`; ``residual_norm`` is the
        last term's norm.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> res = hf.lissa(lambda v: H @ v, torch.ones(3, dtype=torch.float64), scale=4.0, tol=1e-8)
        >>> res.x, res.stats["effective_damping"]
        (tensor([1.0000, 0.5000, 0.3333], dtype=torch.float64), 0.0)

    References:
        Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine
        learning in linear time", JMLR 18 (2017); Koh & Liang, "Understanding black-box
        predictions via influence functions", ICML (2017).
    """
    _check_options(num_terms, tol, damping)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if callable(matvecs):
        first, source = matvecs, None
    else:
        source = iter(matvecs)
        first = next(source, None)
        if first is None:
            raise ValueError("matvecs is empty: lissa needs at least one matvec")
    system = LinearSystem(first, b, damping=scale * damping)
    tol = attainable_tol(tol, system.op.layout.product_eps, "lissa")

    def matvec_at(step: int) -> Optional[MatvecFn]:
        if source is None or step == 0:
            return first
        return next(source, None)

    run = _series(system, matvec_at, alpha=1.0 / scale, num_terms=num_terms, tol=tol,
                  growth=_LISSA_GROWTH, name="lissa", progress=progress, confirm=False)
    stats = {"alpha": 1.0 / scale, "effective_damping": scale * damping, "terms": run.terms}
    return finish(system.result(run.x, run.status, run.message, run.residual_norm, stats), "lissa")


class _Run(NamedTuple):
    x: Tensor
    status: Status
    message: str
    residual_norm: float
    terms: int


def _check_options(num_terms: int, tol: float, damping: float) -> None:
    if check_count(num_terms, "num_terms") < 1:
        raise ValueError(f"num_terms must be at least 1, got {num_terms}")
    check_tol_damping(tol, damping)


def _series(
    system: LinearSystem,
    matvec_at: Callable[[int], Optional[MatvecFn]],
    *,
    alpha: float,
    num_terms: int,
    tol: float,
    growth: float,
    name: str,
    progress: ProgressArg,
    confirm: bool,
) -> _Run:
    """x = α Σ_j p_j with p_0 = b, p_{j+1} = p_j − α(H_j + δ)p_j; residual of x_J is p_J.

    In floating point p_J drifts from the true residual b − A x_J (x sums rounded terms),
    so with ``confirm`` convergence is decided on the true residual (one product); if it
    misses the tolerance, the series goes on from it (iterative refinement)."""
    bf, b_norm, damping = system.b, system.b_norm, system.damping
    target = tol * b_norm
    floor = 1e3 * torch.finfo(system.op.dtype).eps * b_norm  # below it, growth is rounding noise
    x = torch.zeros_like(bf)
    p, p_norm = bf.clone(), b_norm
    best_x, best_norm = x, p_norm
    last_true, kept = math.inf, x  # the true residual at the last confirmation that missed, and its x
    terms = 0
    bar = Progress(progress, total=num_terms, desc=name)
    try:
        while True:
            if p_norm <= target:
                if not confirm or terms == 0:  # with no terms, x = 0 and the residual is b itself
                    break
                r = bf - system.A(x)
                r_norm = system.norm(r)
                if r_norm <= target:
                    p_norm = r_norm
                    break
                if r_norm >= last_true:
                    # the earlier confirmation's x is the better one
                    return _Run(kept, Status.MAX_ITERS, stall_message(last_true, target, "the series' own residual"),
                                last_true, terms)
                last_true, kept = r_norm, x
                p, p_norm, best_x, best_norm = r, r_norm, x, r_norm
            if terms >= num_terms:
                return _Run(x, Status.MAX_ITERS, (
                    f"{num_terms} terms did not reach the tolerance: the residual is "
                    f"{p_norm / b_norm:.3g}·‖b‖. The series needs about κ·ln(1/tol) terms; "
                    "use more terms, or hf.cg, which needs about √κ·ln(2/tol)."), p_norm, terms)
            mv = matvec_at(terms)
            if mv is None:
                return _Run(x, Status.MAX_ITERS, f"matvecs ran out after {terms} terms", p_norm, terms)
            system.op.matvec = mv
            # fresh tensors for x and p (best_x and kept may hold the old ones), each in one pass
            x_next = torch.add(x, p, alpha=alpha)
            Ap = system.A(p)
            p_next = torch.add(p, Ap, alpha=-alpha, out=Ap)
            p_norm_next = system.norm(p_next)
            terms += 1
            if not math.isfinite(p_norm_next):
                # Growth is caught while the terms are still finite (at the first term
                # that grows), so a non-finite term comes from the product itself.
                return _Run(x, Status.NON_FINITE, non_finite_message(), p_norm, terms)
            x, p, p_norm = x_next, p_next, p_norm_next
            bar.update(p_norm / b_norm)
            if p_norm > growth * best_norm and p_norm > floor:
                grew = f"grew from {best_norm:.3g} to {p_norm:.3g}"
                return _Run(best_x, Status.DIVERGED, (
                    f"the series diverged after {terms} term{'s' if terms != 1 else ''}: "
                    f"its terms' norm {grew}, so the "
                    "spectral radius of I − α(H + δI) is at least 1 (some eigenvalue λ of H has "
                    f"α(λ + δ) ≥ 2 or λ + δ ≤ 0; here α = {alpha:.4g}, δ = {damping:.4g}). "
                    "Returned the partial sum with the smallest residual. Use a smaller alpha "
                    "(alpha=None picks 1/‖H‖), damping above the magnitude of the most negative "
                    "eigenvalue, or hf.cg."), best_norm, terms)
            if p_norm < best_norm:
                best_x, best_norm = x, p_norm
    finally:
        bar.close()
    return _Run(x, Status.CONVERGED, "", p_norm, terms)
