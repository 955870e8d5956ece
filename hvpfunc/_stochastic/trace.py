"""Stochastic estimates of tr(H) (Hutchinson, Hutch++) and diag(H)."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple, get_args

import torch
from torch import Tensor

from .._krylov import step_rounding
from .._operator import Operator, check_count, finite_rows, rowdot
from .._outcome import finish, probes_outcome
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import ChunkSize, DiagonalMethod, MatvecFn, ProgressArg, TraceMethod, Tree
from ..results import DiagonalResult, Status, TraceResult

_METHODS = get_args(TraceMethod)


@in_plain_autograd
def trace(
    matvec: MatvecFn,
    like: Tree,
    *,
    num_probes: int = 100,
    method: TraceMethod = "auto",
    generator: Optional[torch.Generator] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
    tol: Optional[float] = None,
) -> TraceResult:
    """Estimate tr(H) from ``num_probes`` products with random vectors.

    Hutchinson: for Rademacher z (entries ±1), E[zᵀHz] = tr(H), so the mean of
    ``num_probes`` samples estimates the trace with variance 2‖H‖_F² − 2Σᵢ Hᵢᵢ² per
    sample: O(1/ε²) products for relative error ε.

    Hutch++: spend a third of the products on a sketch S, take Q = orth(HS), and add the
    exact trace of the projected part, tr(QᵀHQ), to Hutchinson's estimate of the trace of
    the deflated remainder (I − QQᵀ)H(I − QQᵀ). On matrices with decaying spectra (most
    network Hessians) the remainder is small and O(1/ε) products suffice. On an
    indefinite operator with a flat spectrum it can lose to plain Hutchinson at equal
    budget, hence both methods, and the standard error always reported.

    Auto (default): Hutch++'s sketch first. From the sketch alone, before paying for
    HQ, it estimates Hutchinson's variance (2(‖H‖_F² − Σ Hᵢᵢ²)) and the remainder's (from
    the sketch's leave-one-out residuals) and, when deflation would not pay (diagonally
    dominant or flat spectra, as many network Hessians), spends the rest on plain
    Hutchinson probes, the sketch's probes counting as Hutchinson samples; otherwise
    it finishes Hutch++. Measured (``python -m benchmarks --only estimators``, 100
    seeds): mean error within 1.05× of the better of Hutchinson and Hutch++ on a flat
    bulk with outliers, a geometrically decaying spectrum and a tanh MLP's Hessian at
    20, 60 and 100 products, where Hutch++ alone lost up to 1.7× and Hutchinson up to
    11×. Its remainder estimate is one-sided (‖(I − QQᵀ)H‖_F², 1.1–3.6× the two-sided
    ‖(I − QQᵀ)H(I − QQᵀ)‖_F² that Hutch++'s variance follows, less the remainder's
    diagonal mass), so on slowly decaying spectra it can keep Hutchinson where Hutch++
    would be better: 1.19× on eigenvalues i^−0.6 at 60 products, 1.08× at 100. (An
    earlier ``auto`` combined both estimates with weights from the remainder's sample
    variances; with a few samples the weights were noise and cost up to 9% against
    Hutch++ alone.)

    XTrace: s = ``num_probes // 2`` probes W, Q = orth(HW), and for each probe i the
    Hutch++ estimate whose sketch is the other s − 1 probes and whose remainder probe is
    wᵢ; the estimate is their mean, so every product serves both the sketch and the
    remainder. At equal products it was the most accurate of the three on synthetic
    flat-bulk, outlier-dominated and polynomially decaying spectra (1–2.6× better than
    Hutch++), at most 1.5× worse than Hutchinson on a slowly decaying one, and on a small
    tanh MLP's Hessian as good as Hutch++ — both then up to 1.6× worse than Hutchinson
    below 100 products (``python -m benchmarks --only estimators``). Its standard error is
    the delete-one jackknife's, computed from the same products: honest but
    conservative (1.2–3.7× the actual error in our measurements; the spread of the s
    correlated estimates over √s, Epperly's own estimate, covered the trace only 77% of
    the time on a decaying spectrum).

    Probes go through ``torch.func.vmap`` over the matvec, ``chunk_size`` at a time.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``like``.
        like: a tree giving the vectors' structure, shapes, dtypes, device (the params).
        num_probes: total products to spend (Hutchinson ≥ 2, Hutch++ and XTrace ≥ 4;
            XTrace uses an even number, one less when it is odd).
        method: ``"auto"`` (default), ``"hutch++"``, ``"hutchinson"`` or ``"xtrace"``.
        generator: draws the probes; the same generator state gives the same estimate.
            ``None`` uses PyTorch's global generator.
        chunk_size: probes per ``vmap`` call (memory grows with it, about one
            gradient's worth per probe); ``1`` calls the matvec one probe at a time
            without ``vmap``; ``None`` all at once; ``"auto"`` (default) 16 on a GPU; on a
            CPU, where ``vmap`` pays for small models only (README: benchmarks), a loop
            unless a looped product takes under 5 ms and a ``vmap`` of 16 proved faster
            on the first probes (for a matvec of mode ``"auto"`` the trial's outcome is
            kept per f and input signature, :attr:`Matvec.chunk_trials`, and later calls
            skip it; under ``torch.use_deterministic_algorithms`` no trial: a loop). The
            chunking never changes the numbers drawn, only rounding.
        progress: ``True`` for a progress bar, or a callable ``progress(products_done)``
            called after every chunk.
        tol: ``None`` (default): spend ``num_probes`` products. A number: stop as soon
            as the standard error is at most ``tol·|estimate|``, spending at most
            ``num_probes``: rounds of 24, 48, 96, ... products with fresh probes,
            combined by inverse-variance weights (every product counts), ending with
            ``status="max_iters"`` if the budget runs out first.

    Returns:
        :class:`~hvpfunc.TraceResult`: ``estimate``, ``stderr`` (the standard deviation
        of the estimate, from the probes' sample variance, widened by Student's t so
        that a ±1.96·stderr band holds the trace 95% of the time however few the
        probes; see XTrace above; never below the products' rounding, so never exactly
        0 for a nonzero H: :class:`~hvpfunc.TraceResult`), ``num_matvecs``, and
        ``status``: ``"converged"``, ``"max_iters"`` (``tol`` not met within the
        budget), or ``"non_finite"`` when a product was nan or inf (no more probes are
        drawn; the estimate uses the probes before it, nan if none, and a
        :class:`~hvpfunc.ConvergenceWarning` is issued).

    Raises:
        ValueError: unknown ``method``, too few probes, or a ``tol`` that is not positive.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.arange(1.0, 11.0))
        >>> g = torch.Generator().manual_seed(0)
        >>> hf.trace(lambda v: H @ v, torch.zeros(10), num_probes=30, generator=g).estimate
        tensor(55.0000)

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 19 (1990); Meyer, Musco, Musco &
        Woodruff, "Hutch++: Optimal stochastic trace estimation", SOSA (2021); Epperly,
        Tropp & Webber, "XTrace: making the most of every sample in stochastic trace
        estimation", SIAM J. Matrix Anal. Appl. 45 (2024).
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    minimum = _MINIMUM[method]
    if check_count(num_probes, "num_probes") < minimum:
        raise ValueError(
            f"method={method!r} needs num_probes >= {minimum} to report a standard error, "
            f"got {num_probes}"
        )
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive (or None), got {tol}")
    op = Operator(matvec, like, name="like")
    bar = Progress(progress, total=num_probes, desc=f"trace ({method})")
    try:
        if tol is None:
            op.expect(num_probes)
            estimate, stderr, done, finite = _round(op, method, num_probes, generator, chunk_size, bar)
            status, message = probes_outcome(finite, done, num_probes)
        else:
            estimate, stderr, status, message = _adaptive(op, method, num_probes, tol, generator, chunk_size, bar)
    finally:
        bar.close()
    return finish(TraceResult(estimate, stderr, op.num_matvecs, status, message), f"trace(method={method!r})")


# The first round of an adaptive estimate, in products; each next round doubles it.
_FIRST_ROUND = 24


def _adaptive(
    op: Operator, method: str, budget: int, tol: float, generator: Optional[torch.Generator],
    chunk_size: ChunkSize, bar: Progress,
) -> Tuple[Tensor, Tensor, Status, str]:
    """Rounds of ``method`` with fresh probes, 24, 48, 96, ... products (within the
    budget), combined by inverse-variance weights (independent unbiased estimates), until
    the combined standard error is at most ``tol·|estimate|``."""
    estimates, variances, spent, size = [], [], 0, _FIRST_ROUND
    minimum = _MINIMUM[method]
    while True:
        size = min(size, budget - spent)
        estimate, stderr, done, finite = _round(op, method, size, generator, chunk_size, bar)
        spent += size
        if not finite:
            status, message = probes_outcome(False, done, size)
            return estimate, stderr, status, message
        estimates.append(estimate)
        variances.append(stderr**2)
        combined, combined_stderr = _combined(torch.stack(estimates), torch.stack(variances))
        if bool(combined_stderr <= tol * combined.abs()):
            return combined, combined_stderr, Status.CONVERGED, ""
        if budget - spent < minimum:
            return combined, combined_stderr, Status.MAX_ITERS, (
                f"the standard error {float(combined_stderr):.3g} is above tol·|estimate| = "
                f"{tol * float(combined.abs()):.3g} after the budget of num_probes={budget} products; "
                "raise num_probes or loosen tol"
            )
        size *= 2


_MINIMUM = {"hutchinson": 2, "hutch++": 4, "xtrace": 4, "auto": 4}


def _combined(estimates: Tensor, variances: Tensor) -> Tuple[Tensor, Tensor]:
    """Independent unbiased estimates combined by inverse-variance weights, and the
    combination's standard error. The weights are taken relative to the smallest
    variance, so that none overflows: a round whose probes all agree (a diagonal H gives
    every Rademacher probe zᵀHz = tr H) has only the rounding floor's variance
    (:func:`_floored`), and with weights 1/max(v, tiny) such a round once weighed
    4.5e307 and the estimate came back inf, marked converged. Rounds with zero variance
    (H = 0, whose products are exactly 0) are exact, and only they are averaged."""
    if not bool(torch.isfinite(variances).all()):  # a round too small for a standard error
        return estimates.mean(), torch.tensor(math.nan, dtype=estimates.dtype, device=estimates.device)
    smallest = variances.min()
    if not bool(smallest > 0):
        exact = estimates[variances == 0]
        spread = exact.max() - exact.min()
        return exact.mean(), spread / 2
    weights = smallest / variances
    return (weights * estimates).sum() / weights.sum(), (smallest / weights.sum()).sqrt()


def _round(
    op: Operator, method: str, count: int, generator: Optional[torch.Generator], chunk_size: ChunkSize,
    bar: Progress,
) -> Tuple[Tensor, Tensor, int, bool]:
    """One estimate of ``method`` from ``count`` products: (estimate, stderr, samples
    used, whether every product was finite)."""
    nan = torch.tensor(math.nan, dtype=op.dtype, device=op.device)
    if method == "hutchinson":
        samples, scales, finite = _quadratic_forms(op, count, generator, chunk_size, bar)
        return _mean(samples), _floored(_stderr(samples), op, _mean(scales)), samples.shape[0], finite
    if method == "xtrace":
        samples, stderr, finite = _xtrace(op, count // 2, generator, chunk_size, bar)
        return _mean(samples), stderr, samples.shape[0], finite
    sketch = count // 3
    S = op.probes(sketch, generator)
    HS = op.batch(S, chunk_size=chunk_size, bar=bar)
    if not bool(torch.isfinite(HS).all()):  # the sketch's products were not finite: nothing to build on
        return nan, nan, 0, False
    if method == "auto":
        if not _deflation_pays(op, S, HS, count):
            forms = op.total(rowdot(S, HS))  # the sketch's probes are Hutchinson samples too
            rest, scales, finite = _quadratic_forms(op, count - sketch, generator, chunk_size, bar)
            samples = torch.cat([forms, rest])
            scale = _mean(torch.cat([_norms(op, S) * _norms(op, HS), scales]))
            return _mean(samples), _floored(_stderr(samples), op, scale), samples.shape[0], finite
    Q = _orthonormal_rows(HS, op.allsum)  # a basis of range(HS)
    HQ = op.batch(Q, chunk_size=chunk_size, bar=bar)
    exact = op.total((Q * HQ).sum())
    if not bool(torch.isfinite(exact)):
        return nan, nan, 0, False
    samples, scales, finite = _quadratic_forms(op, count - 2 * sketch, generator, chunk_size, bar, deflate=Q)
    scale = _norms(op, HQ).sum() + _mean(scales)  # the exact part's s forms, then the remainder's
    return exact + _mean(samples), _floored(_stderr(samples), op, scale), samples.shape[0], finite


def _deflation_pays(op: Operator, S: Tensor, HS: Tensor, count: int) -> bool:
    """Whether Hutch++'s deflation by the sketch S is expected to beat spending its
    products on more Hutchinson probes (:func:`_predicted_variances`)."""
    predicted = _predicted_variances(op, S, HS, count)
    return predicted is None or predicted[0] < predicted[1]


def _predicted_variances(op: Operator, S: Tensor, HS: Tensor, count: int) -> Optional[Tuple[float, float]]:
    """The variances of Hutch++'s estimate and of Hutchinson's from ``count`` products,
    predicted from the sketch's own products before paying for HQ, with O(s²n) work;
    None where deflation certainly pays.

    Hutchinson's variance per Rademacher probe is 2(‖H‖_F² − Σᵢ Hᵢᵢ²): small where the
    diagonal carries the Frobenius mass, as in many network Hessians. Both terms come
    from the sketch: E‖Hs‖² = ‖H‖_F², and for two independent probes
    E⟨s_a ⊙ Hs_a, s_b ⊙ Hs_b⟩ = Σᵢ Hᵢᵢ² (sums over n entries, far steadier than the
    sample variance of a few sᵀHs; consecutive pairs, cyclically). The remainder's
    variance, about 2‖(I − QQᵀ)H(I − QQᵀ)‖_F², is estimated by the sketch's leave-one-out
    residuals: the distance of Hsᵢ from the span of the other Hsⱼ, whose square has mean
    ‖(I − Q₋ᵢQ₋ᵢᵀ)H‖_F², is 1/‖column i of L⁻¹‖ for the Gram matrix (HS)(HS)ᵀ = LLᵀ.
    That norm is one-sided, 1.1–3.6× the two-sided one on the spectra measured, which
    favours Hutchinson on slowly decaying spectra; the two-sided norm needs H times
    projected vectors, the HQ products this decision is made to avoid. The remainder's
    Rademacher variance also loses its diagonal mass, Σᵢ (PHP)ᵢᵢ² ≥ tr(PHP)²/n
    (Cauchy–Schwarz), and tr(PHP) = tr(PH) is the mean of the leave-one-out forms
    sᵢᵀ(I − Q₋ᵢQ₋ᵢᵀ)Hsᵢ, squared without bias as a mean over pairs i ≠ j: on a spectrum
    i^−0.6 that term is half of the one-sided norm (without it auto kept Hutchinson at
    100 products, 1.4× Hutch++'s error).
    The two: 2·(mean(dist²) − tr(PHP)²/n)/(m − 2s) and 2(‖H‖_F² − Σ Hᵢᵢ²)/m. A
    rank-deficient sketch (range(H) captured) or one as large as the dimension always
    pays (None).
    """
    sketch = S.shape[0]
    if sketch < 2 or sketch >= op.n:  # a sketch spanning the space makes the trace exact
        return None
    gram = op.total(HS @ HS.T).to(torch.float64)
    L, info = torch.linalg.cholesky_ex(gram)
    diagonal = torch.diagonal(L)
    if int(info) or bool(diagonal.min() <= math.sqrt(torch.finfo(HS.dtype).eps) * diagonal.max()):
        return None
    L_inverse = torch.linalg.solve_triangular(L, torch.eye(sketch, dtype=L.dtype, device=L.device), upper=False)
    distances = 1 / L_inverse.square().sum(dim=0)  # squared leave-one-out residuals
    # the leave-one-out residual of Hsᵢ is row i of G⁻¹·HS over (G⁻¹)ᵢᵢ, so its form with
    # sᵢ comes from the sketch's forms sᵢᵀHsⱼ without an n-sized temporary
    G_inverse = L_inverse.T @ L_inverse
    forms = (G_inverse * op.total(S @ HS.T).to(torch.float64)).sum(dim=1) / torch.diagonal(G_inverse)
    total_forms = forms.sum()
    trace_squared = (total_forms**2 - forms.square().sum()) / (sketch * (sketch - 1))
    remainder = 2 * (distances.mean() - trace_squared.clamp(min=0) / op.n).clamp(min=0) / max(count - 2 * sketch, 1)
    # consecutive rows of S ⊙ HS, cyclically, one row at a time: the whole S ⊙ HS (53 MB
    # for the 33-probe sketch of a 400k-parameter model) was memory the allocator mapped afresh
    first = previous = S[0] * HS[0]
    consecutive = torch.zeros((), dtype=HS.dtype, device=HS.device)
    for a in range(1, sketch):
        current = S[a] * HS[a]
        consecutive += torch.dot(current, previous)
        previous = current
    consecutive += torch.dot(first, previous)
    diagonal_mass = op.total(consecutive) / sketch  # Σ Hᵢᵢ²
    frobenius = torch.trace(gram) / sketch  # ‖H‖_F²
    return float(remainder), float(2 * (frobenius - diagonal_mass).clamp(min=0) / count)


@in_plain_autograd
def squared_frobenius_norm(
    matvec: MatvecFn,
    like: Tree,
    *,
    num_probes: int = 100,
    generator: Optional[torch.Generator] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> TraceResult:
    """Estimate ‖H‖_F² = tr(H²) = Σᵢⱼ Hᵢⱼ² from ``num_probes`` products.

    For Rademacher z, E‖Hz‖² = tr(HᵀH) = ‖H‖_F², so the mean of ‖Hzᵢ‖² estimates it, with
    variance 2(‖H²‖_F² − Σᵢ (H²)ᵢᵢ²) per sample (Hutchinson's estimator for H²; each
    sample costs one product, not two). ‖H‖_F² / tr(H)² measures how spread the spectrum
    is, and ‖H‖_F² is the per-sample variance scale of Hutchinson's trace estimate.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``like``.
        like: a tree giving the vectors' structure (the params).
        num_probes: products to spend, at least 2.
        generator: draws the probes; ``None`` uses PyTorch's global generator.
        chunk_size: probes per ``vmap`` call, as in :func:`trace`.
        progress: ``True`` for a progress bar, or a callable ``progress(products_done)``.

    Returns:
        :class:`~hvpfunc.TraceResult` whose ``estimate`` is ‖H‖_F² (squared) and
        ``stderr`` its standard error, as in :func:`trace`.

    Raises:
        ValueError: fewer than 2 probes.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([3.0, -4.0]))
        >>> hf.squared_frobenius_norm(lambda v: H @ v, torch.zeros(2), num_probes=4).estimate
        tensor(25.)

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 19 (1990); Meyer, Musco, Musco &
        Woodruff (2021), §1, on estimating tr(AᵀA) from ‖Az‖².
    """
    if check_count(num_probes, "num_probes") < 2:
        raise ValueError(f"squared_frobenius_norm needs num_probes >= 2 to report a standard error, got {num_probes}")
    op = Operator(matvec, like, name="like")
    op.expect(num_probes)
    samples = []
    finite = True
    bar = Progress(progress, total=num_probes, desc="squared Frobenius norm")
    try:
        for Z, HZ in op.probe_blocks(num_probes, generator, chunk_size):
            products = op.batch(Z, chunk_size=chunk_size, bar=bar, out=HZ)
            norms, finite = finite_rows(op.total(products.square().sum(dim=1)))
            samples.append(norms)
            if not finite:
                break
    finally:
        bar.close()
    values = torch.cat(samples)
    status, message = probes_outcome(finite, values.shape[0], num_probes)
    estimate = _mean(values)  # each sample ‖Hz‖² is a form of H², its own rounding scale
    result = TraceResult(estimate, _floored(_stderr(values), op, estimate), op.num_matvecs, status, message)
    return finish(result, "squared_frobenius_norm")


class _Sketch(NamedTuple):
    """Probes W (rows), HW, an orthonormal basis Q of range(HW) (rows), HQ, and S, whose
    column i, sᵢ, gives the basis without probe i: Q₋ᵢQ₋ᵢᵀ = Q(I − sᵢsᵢᵀ)Qᵀ. S is None
    when HW has rank below s (or s covers the dimension): then range(H) lies in span(Q)
    and the projected parts are exact."""

    W: Tensor
    HW: Tensor
    Q: Tensor
    HQ: Tensor
    S: Optional[Tensor]


def _exchangeable_sketch(
    op: Operator, s: int, generator: Optional[torch.Generator], chunk_size: ChunkSize, bar: Optional[Progress]
) -> Optional[_Sketch]:
    """The shared part of XTrace and XDiag, 2s products: every leave-one-out basis from one
    QR, HW = QR, with sᵢ the i-th column of R⁻ᵀ normalized (Epperly, Tropp & Webber 2024,
    §2). None when a product was not finite."""
    W = op.probes(s, generator)
    HW = op.batch(W, chunk_size=chunk_size, bar=bar)
    if not bool(torch.isfinite(HW).all()):
        return None
    Q, R = _qr_rows(HW, op.allsum)  # rows of Q: an orthonormal basis of range(HW); HW = RᵀQ
    HQ = op.batch(Q, chunk_size=chunk_size, bar=bar)
    if not bool(torch.isfinite(HQ).all()):
        return None
    if R is None:  # HW is rank deficient: its range is H's, the remainder vanishes
        return _Sketch(W, HW, Q, HQ, None)
    diagonal_R = torch.diagonal(R).abs()
    if s >= op.n or bool(diagonal_R.min() <= math.sqrt(torch.finfo(R.dtype).eps) * diagonal_R.max()):
        return _Sketch(W, HW, Q, HQ, None)
    S = torch.linalg.inv(R.T)
    return _Sketch(W, HW, Q, HQ, S / torch.linalg.vector_norm(S, dim=0, keepdim=True))


def _xtrace(
    op: Operator, s: int, generator: Optional[torch.Generator], chunk_size: ChunkSize, bar: Progress
) -> Tuple[Tensor, Tensor, bool]:
    """The s exchangeable XTrace estimates (2s products), their mean's standard error
    (:func:`_jackknife_stderr`), and whether every product was finite. Estimate i is
    Hutch++ with the sketch of the other s − 1 probes and probe i for the remainder:
    tr(Q₋ᵢᵀHQ₋ᵢ) + wᵢᵀ(I − Q₋ᵢQ₋ᵢᵀ)H(I − Q₋ᵢQ₋ᵢᵀ)wᵢ, where Q₋ᵢ spans H W without column i."""
    sketch = _exchangeable_sketch(op, s, generator, chunk_size, bar)
    if sketch is None:
        empty = torch.zeros(0, dtype=op.dtype, device=op.device)
        return empty, torch.tensor(math.nan, dtype=op.dtype, device=op.device), False
    W, HW, Q, HQ, S = sketch
    M = op.total(Q @ HQ.T)  # QᵀHQ
    projected_scale = _norms(op, HQ).sum()  # tr(QᵀHQ): a form per row of Q
    if S is None:  # the remainder (I − QQᵀ)H(I − QQᵀ) vanishes: tr(QᵀHQ) is the trace
        zero = torch.zeros((), dtype=op.dtype, device=op.device)
        return torch.trace(M).expand(s), _floored(zero, op, projected_scale), True
    projected = torch.trace(M) - torch.einsum("ai,ab,bi->i", S, M, S)  # tr(Q₋ᵢᵀHQ₋ᵢ)

    def deflated(C: Tensor) -> Tensor:  # row i of C times (I − sᵢsᵢᵀ)
        return C - (C * S.T).sum(dim=1, keepdim=True) * S.T

    HPW = HW - deflated(op.total(W @ Q.T)) @ HQ  # row i: H(I − Q₋ᵢQ₋ᵢᵀ)wᵢ
    PHPW = HPW - deflated(op.total(HPW @ Q.T)) @ Q  # row i: (I − Q₋ᵢQ₋ᵢᵀ)H(I − Q₋ᵢQ₋ᵢᵀ)wᵢ
    samples = projected + op.total((W * PHPW).sum(dim=1))
    scale = projected_scale + _mean(_norms(op, W) * _norms(op, HW))
    return samples, _floored(_jackknife_stderr(op, W, HW, Q, HQ, M, S), op, scale), True


def _jackknife_stderr(op: Operator, W: Tensor, HW: Tensor, Q: Tensor, HQ: Tensor, M: Tensor, S: Tensor) -> Tensor:
    """The delete-one jackknife standard error of XTrace's estimate, from the products it
    already has.

    The s estimates are not independent (each uses every probe), so their spread over
    √s understates the error (measured: the nominal 95% interval held the trace 77–90% of
    the time on decaying spectra). The jackknife recomputes XTrace without probe i, for
    each i: its estimate j ≠ i uses the sketch of the probes other than i and j, whose
    basis lies in span(Q), so every quantity reduces to s × s matrices in Q's
    coordinates: c_j = Qw_j, t_j = QHw_j, M = QᵀHQ and the two columns a_i, a_j of R⁻ᵀ
    that span what leaving out i and j removes (Π = I − A(AᵀA)⁻¹Aᵀ):

        t_ij = tr(ΠM) + w_jᵀHw_j − 2 c_jᵀΠt_j + c_jᵀΠMΠc_j,    θ₋ᵢ = mean_{j≠i} t_ij,

    and var = (s − 1)/s Σᵢ (θ₋ᵢ − θ̄)² (Efron–Stein: it does not understate the variance
    of a symmetric statistic), O(s³) work. The result is widened by Student's t with
    s − 1 degrees of freedom, as the other estimators' are.
    """
    s = W.shape[0]
    A = S  # normalized columns of R⁻ᵀ: the same span pairwise, which is all Π needs
    C = op.total(Q @ W.T)  # column j: c_j
    T = op.total(HQ @ W.T)  # column j: t_j
    d = op.total((W * HW).sum(dim=1))  # w_jᵀHw_j
    AA, AMA = A.T @ A, A.T @ M @ A
    AC, AT, AMC = A.T @ C, A.T @ T, A.T @ M @ C
    cMc, ct = (C * (M @ C)).sum(dim=0), (C * T).sum(dim=0)
    i = torch.arange(s, device=A.device).repeat_interleave(s)
    j = torch.arange(s, device=A.device).repeat(s)
    keep = i != j
    i, j = i[keep], j[keep]
    K = torch.stack([i, j], dim=1)  # (pairs, 2)
    G = AA[K[:, :, None], K[:, None, :]]  # (pairs, 2, 2)
    B = AMA[K[:, :, None], K[:, None, :]]
    u, v, z = AC[K, j[:, None]], AT[K, j[:, None]], AMC[K, j[:, None]]  # (pairs, 2)
    Ginv = torch.linalg.inv(G)
    Gu = (Ginv @ u[:, :, None]).squeeze(-1)
    t = (torch.trace(M) - (Ginv * B.transpose(1, 2)).sum(dim=(1, 2)) + d[j]
         - 2 * (ct[j] - (v * Gu).sum(dim=1))
         + cMc[j] - 2 * (z * Gu).sum(dim=1) + (Gu * (B @ Gu[:, :, None]).squeeze(-1)).sum(dim=1))
    theta = t.reshape(s, s - 1).mean(dim=1)  # θ₋ᵢ
    variance = (s - 1) / s * (theta - theta.mean()).square().sum()
    return variance.sqrt() * (_t975(s - 1) / _Z975)


def _xdiag(
    op: Operator, s: int, generator: Optional[torch.Generator], chunk_size: ChunkSize, bar: Progress
) -> Tuple[Tensor, Tensor, bool]:
    """XDiag from 2s products: (estimate, stderr, whether every product was finite).
    Sample i is diag(Q₋ᵢQ₋ᵢᵀH) + wᵢ ⊙ (I − Q₋ᵢQ₋ᵢᵀ)Hwᵢ; with Q₋ᵢQ₋ᵢᵀ = Q(I − sᵢsᵢᵀ)Qᵀ
    it is diag(QQᵀH) − Qsᵢ ⊙ HQsᵢ + wᵢ ⊙ (Hwᵢ − Qtᵢ + (sᵢᵀtᵢ)Qsᵢ), tᵢ = (HQ)ᵀwᵢ."""
    sketch = _exchangeable_sketch(op, s, generator, chunk_size, bar)
    if sketch is None:
        nan = torch.full((sum(op.layout.sizes),), math.nan, dtype=op.dtype, device=op.device)
        return nan, nan, False
    W, HW, Q, HQ, S = sketch
    projected = (Q * HQ).sum(dim=0)  # diag(QQᵀH)
    if S is None:  # range(H) inside span(Q): exact but for rounding
        return projected, _floored(torch.zeros_like(projected), op, (Q * HQ).abs().sum(dim=0)), True
    QS, HQS = S.T @ Q, S.T @ HQ  # rows i: Qsᵢ and HQsᵢ
    T = op.total(HQ @ W.T)  # column i: tᵢ
    c = (S * T).sum(dim=0)  # sᵢᵀtᵢ
    samples = projected - QS * HQS + W * (HW - T.T @ Q + c[:, None] * QS)
    scale = (Q * HQ).abs().sum(dim=0) + (W * HW).abs().mean(dim=0)
    return samples.mean(dim=0), _floored(_diagonal_jackknife(W, HW, Q, HQ, S, T, projected), op, scale), True


def _diagonal_jackknife(W: Tensor, HW: Tensor, Q: Tensor, HQ: Tensor, A: Tensor, T: Tensor,
                        projected: Tensor) -> Tensor:
    """Per entry, the delete-one jackknife standard error of XDiag's estimate, as
    :func:`_jackknife_stderr` for XTrace: XDiag without probe i has, for each j ≠ i, the
    sample diag(QᵀΠQH) + w_j ⊙ (Hw_j − QᵀΠt_j) with Π = I − A_K(A_KᵀA_K)⁻¹A_Kᵀ over
    K = {i, j}. With X = AᵀQ, Y = AᵀHQ (rows x_a, y_a) that is

        diag(QᵀHQ) + w_j ⊙ (Hw_j − Qᵀt_j) − Σ_{a,b∈K} G⁻¹_ab x_a ⊙ y_b + w_j ⊙ Σ_{a,b∈K} G⁻¹_ab (a_bᵀt_j) x_a,

    whose mean over j ≠ i takes O(sn) per i through weighted sums of the rows of X, Y,
    X ⊙ Y and W ⊙ X: O(s²n) in all, the cost of the sketch's QR."""
    s = W.shape[0]
    X, Y = A.T @ Q, A.T @ HQ
    XY, WX = X * Y, W * X
    base = W * (HW - T.T @ Q)  # row j: w_j ⊙ (Hw_j − Qᵀt_j)
    AA, AT = A.T @ A, A.T @ T
    base_total = base.sum(dim=0)
    theta = torch.empty(s, W.shape[1], dtype=W.dtype, device=W.device)
    everyone = torch.arange(s, device=W.device)
    for i in range(s):
        j = everyone[everyone != i]
        G = torch.stack([torch.stack([AA[i, i].expand(s - 1), AA[i, j]], dim=1),
                         torch.stack([AA[j, i], AA[j, j]], dim=1)], dim=1)  # (s − 1, 2, 2) over K = (i, j)
        Ginv = torch.linalg.inv(G)
        at = torch.stack([AT[i, j], AT[j, j]], dim=1)  # (s − 1, 2): a_bᵀt_j
        coefficient = (Ginv @ at[:, :, None]).squeeze(-1)  # (s − 1, 2): Σ_b G⁻¹_ab a_bᵀt_j, a = i, j
        m = s - 1
        cross = (Ginv[:, 0, 0].sum() * XY[i] + X[i] * (Ginv[:, 0, 1] @ Y[j]) + (Ginv[:, 1, 0] @ X[j]) * Y[i]
                 + Ginv[:, 1, 1] @ XY[j]) / m
        along = (X[i] * (coefficient[:, 0] @ W[j]) + coefficient[:, 1] @ WX[j]) / m
        theta[i] = projected + (base_total - base[i]) / m - cross + along
    variance = (s - 1) / s * (theta - theta.mean(dim=0)).square().sum(dim=0)
    return variance.sqrt() * (_t975(s - 1) / _Z975)


def _quadratic_forms(
    op: Operator,
    count: int,
    generator: Optional[torch.Generator],
    chunk_size: ChunkSize,
    bar: Progress,
    deflate: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, bool]:
    """zᵀHz for ``count`` Rademacher z (projected off the rows of ``deflate``), drawn a
    block at a time so that memory holds one block of probes, not all of them; their
    rounding scales ‖z‖‖Hz‖ (:func:`_floored`); and whether every product was finite (if
    not, the samples before the first one that was not, and no more products)."""
    samples, scales = [], []
    for Z, HZ in op.probe_blocks(count, generator, chunk_size):
        if deflate is not None:
            Z = Z - op.total(Z @ deflate.T) @ deflate
        products = op.batch(Z, chunk_size=chunk_size, bar=bar, out=HZ)
        forms, finite = finite_rows(op.total(rowdot(Z, products)))
        samples.append(forms)
        scales.append((_norms(op, Z) * _norms(op, products))[: forms.shape[0]])
        if not finite:
            return torch.cat(samples), torch.cat(scales), False
    return torch.cat(samples), torch.cat(scales), True


@in_plain_autograd
def diagonal(
    matvec: MatvecFn,
    like: Tree,
    *,
    num_probes: int = 100,
    method: DiagonalMethod = "hutchinson",
    generator: Optional[torch.Generator] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> DiagonalResult:
    """Estimate diag(H), as a tree shaped like ``like``, from Rademacher probes.

    ``"hutchinson"`` (default): for Rademacher z, E[z ⊙ Hz] = diag(H) (Bekas,
    Kokiopoulou & Saad 2007): entry i of a sample is Hᵢᵢ + Σ_{j≠i} Hᵢⱼ zᵢzⱼ, so the error
    of entry i after m probes is about sqrt(Σ_{j≠i} Hᵢⱼ² / m). Exact for diagonal H.

    ``"xdiag"``: the exchangeable estimator of Epperly, Tropp & Webber (2024): with
    s = ``num_probes // 2`` probes W and Q = orth(HW), the mean over i of
    diag(Q₋ᵢQ₋ᵢᵀH) + wᵢ ⊙ (I − Q₋ᵢQ₋ᵢᵀ)Hwᵢ, Q₋ᵢ spanning HW without column i (all from one
    QR, as in :func:`trace`'s XTrace). Far more accurate when a few eigenvalues carry
    most of H (exact when H's rank is below s; 90× Hutchinson's accuracy on a spectrum
    of six outliers over a small bulk), but worse where they do not: on a small tanh
    MLP's Hessian at initialization it was 1.3–1.4× less accurate than Hutchinson
    (``python -m benchmarks --only estimators``). Its standard errors are the delete-one
    jackknife's, per entry, from the same products (as XTrace's): nominal 95% intervals
    held an entry 97–100% of the time (the spread of the s correlated samples over √s:
    83–95%); Hutchinson's, from independent samples, 95%.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``like``.
        like: a tree giving the vectors' structure (the params).
        num_probes: products to spend, at least 2 (``"xdiag"``: 4).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        generator: draws the probes; ``None`` uses PyTorch's global generator.
        chunk_size: probes per ``vmap`` call, as in :func:`trace` (default ``"auto"``).
        progress: ``True`` for a progress bar, or a callable ``progress(products_done)``.

    Returns:
        :class:`~hvpfunc.DiagonalResult`: ``estimate`` and ``stderr`` trees shaped like
        ``like``, ``num_matvecs``, and ``status`` as in :func:`trace`.

    Raises:
        ValueError: unknown ``method`` or too few probes.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> res = hf.diagonal(lambda v: {"w": H @ v["w"]}, {"w": torch.zeros(2)}, num_probes=200, generator=g)
        >>> res.estimate["w"].round(decimals=1)
        tensor([2., 3.])

    References:
        Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix",
        Appl. Numer. Math. 57 (2007); Epperly, Tropp & Webber, SIAM J. Matrix Anal.
        Appl. 45 (2024), §5 (XDiag).
    """
    if method not in ("hutchinson", "xdiag"):
        raise ValueError(f"method must be 'hutchinson' or 'xdiag', got {method!r}")
    minimum = 2 if method == "hutchinson" else 4
    if check_count(num_probes, "num_probes") < minimum:
        raise ValueError(f"diagonal(method={method!r}) needs num_probes >= {minimum} to report a standard error, "
                         f"got {num_probes}")
    op = Operator(matvec, like, name="like")
    op.expect(num_probes)
    bar = Progress(progress, total=num_probes, desc=f"diagonal ({method})")
    try:
        result = _diagonal(op, num_probes, method, generator, chunk_size, bar)
    finally:
        bar.close()
    return finish(result, "diagonal")


def _diagonal(op: Operator, num_probes: int, method: str, generator: Optional[torch.Generator],
              chunk_size: ChunkSize, bar: Progress) -> DiagonalResult:
    """The estimate of :func:`diagonal` (its ``finish`` left to it)."""
    if method == "xdiag":
        mean, stderr, finite = _xdiag(op, num_probes // 2, generator, chunk_size, bar)
        status, message = probes_outcome(finite, num_probes if finite else 0, num_probes)
        return DiagonalResult(op.layout.unflatten(mean), op.layout.unflatten(stderr), op.num_matvecs, status, message)
    # Running mean and sum of squared deviations, merged chunk by chunk (Chan et al.),
    # so memory holds one chunk of probes and the variance does not cancel.
    count, mean, m2 = 0, torch.zeros(sum(op.layout.sizes), dtype=op.dtype, device=op.device), None
    magnitude = torch.zeros_like(mean)  # Σ |z ⊙ Hz|, the rounding scale (:func:`_floored`)
    all_finite = True
    for Z, HZ in op.probe_blocks(num_probes, generator, chunk_size):
        samples, finite = finite_rows(op.batch(Z, chunk_size=chunk_size, bar=bar, out=HZ).mul_(Z))
        all_finite = all_finite and finite
        c = samples.shape[0]
        if c == 0:
            break
        c_mean = samples.mean(dim=0)
        magnitude += samples.abs().sum(dim=0)
        c_m2 = ((samples - c_mean) ** 2).sum(dim=0)
        delta = c_mean - mean
        total = count + c
        mean = mean + delta * (c / total)
        m2 = c_m2 if m2 is None else m2 + c_m2 + delta**2 * (count * c / total)
        count = total
        if not all_finite:
            break
    if count == 0:
        mean = torch.full_like(mean, math.nan)
    if count > 1:
        stderr = _floored(torch.sqrt(m2 / (count - 1)) / math.sqrt(count) * (_t975(count - 1) / _Z975), op,
                          magnitude / count)
    else:
        stderr = torch.full_like(mean, math.nan)
    status, message = probes_outcome(all_finite, count, num_probes)
    return DiagonalResult(
        estimate=op.layout.unflatten(mean),
        stderr=op.layout.unflatten(stderr),
        num_matvecs=op.num_matvecs,
        status=status,
        message=message,
    )


def _mean(samples: Tensor) -> Tensor:
    """The mean along dim 0 (nan for no samples, without a warning)."""
    if samples.shape[0] == 0:
        return torch.tensor(math.nan, dtype=samples.dtype, device=samples.device)
    return samples.mean(dim=0)


def _stderr(samples: Tensor) -> Tensor:
    """Standard error of the mean along dim 0, sample std (ddof=1) / sqrt(count), widened
    by Student's t so that ±1.96·stderr is a 95% interval however few the samples (with
    8, the plain standard error's band covered 86% of the time); nan for fewer than two."""
    count = samples.shape[0]
    if count < 2:
        return torch.tensor(math.nan, dtype=samples.dtype, device=samples.device)
    return samples.std(dim=0, correction=1) / math.sqrt(count) * (_t975(count - 1) / _Z975)


_Z975 = 1.959963984540054


def _norms(op: Operator, rows: Tensor) -> Tensor:
    """The 2-norm of every row (over all ranks for sharded vectors)."""
    return op.total(rowdot(rows, rows)).sqrt()


def _floored(stderr: Tensor, op: Operator, scale: Tensor) -> Tensor:
    """``stderr``, but never below the products' rounding, ``STEP_ROUNDING · ε · scale``
    (ε of the less precise of the vectors and the products), ``scale`` summing ‖x‖‖Hx‖
    over the forms xᵀHx that make up the estimate (per entry for a diagonal: |x ⊙ Hx|).
    Where every probe gives the same value (a diagonal H with Rademacher probes, a
    sketch that spans range(H)) the sample spread is exactly zero, but the value still
    carries the rounding of H's products and of their sums: in float32 with ‖H‖ = 1e6,
    XTrace was 0.28 off with a standard error of 0. A nan standard error stays nan."""
    return torch.maximum(stderr, step_rounding(op) * scale.to(stderr.dtype))


def _t975(dof: int) -> float:
    """The 97.5% quantile of Student's t with ``dof`` degrees of freedom, by its
    Cornish–Fisher expansion in 1/dof (exact to 0.5% from 3 degrees of freedom on; the
    exact values below them)."""
    if dof <= 2:
        return (12.706204736, 4.302652730)[dof - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * dof) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)


def _orthonormal_rows(Y: Tensor, allsum: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """An orthonormal basis of the rows of Y, as rows: Householder QR, or for sharded
    rows (whose QR would need every shard) SVQB twice, from the all-reduced Gram matrix
    YYᵀ = UΛUᵀ: Λ^{-1/2}UᵀY, dropping directions below √ε of the largest (rank-revealing;
    Stathopoulos & Wu, SIAM J. Sci. Comput. 23 (2002))."""
    if allsum is None:
        Q, _ = torch.linalg.qr(Y.T)
        return Q.T
    eps = torch.finfo(Y.dtype).eps
    for _ in range(2):
        lam, U = torch.linalg.eigh(allsum(Y @ Y.T).to(torch.float64))
        keep = lam > math.sqrt(eps) * lam.max().clamp_min(torch.finfo(torch.float64).tiny)
        Y = ((U[:, keep] / lam[keep].sqrt()).T.to(Y.dtype)) @ Y
    return Y


def _qr_rows(Y: Tensor, allsum: Optional[Callable[[Tensor], Tensor]]) -> Tuple[Tensor, Optional[Tensor]]:
    """Q, R with Y = RᵀQ, the rows of Q orthonormal, R upper triangular: Householder QR
    of Yᵀ, or for sharded rows Cholesky QR twice from all-reduced Gram matrices (Fukaya
    et al., "CholeskyQR2", 2014). R is None when Y is rank deficient to rounding (its
    Gram matrix is not positive definite); Q is then an orthonormal basis of its rows
    (:func:`_orthonormal_rows`)."""
    if allsum is None:
        Q, R = torch.linalg.qr(Y.T)
        return Q.T, R
    R_total = None
    Q = Y
    for _ in range(2):
        L, info = torch.linalg.cholesky_ex(allsum(Q @ Q.T).to(torch.float64))
        if int(info):
            return _orthonormal_rows(Y, allsum), None
        Q = torch.linalg.solve_triangular(L.to(Q.dtype), Q, upper=False)  # L⁻¹Q
        R_total = L.T if R_total is None else L.T @ R_total
    return Q, R_total.to(Y.dtype)
