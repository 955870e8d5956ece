"""The small immutable records the solvers return, and the warning they emit."""

from __future__ import annotations

import enum
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from torch import Tensor

from ._plotting import axes
from ._types import Which

__all__ = [
    "Status",
    "ConvergenceWarning",
    "EigResult",
    "SolveResult",
    "TraceResult",
    "DiagonalResult",
    "SpectralDensity",
]


class Status(str, enum.Enum):
    """Why a solver or estimator stopped: one vocabulary for every result.

    A ``str`` enum, so ``res.status == "diverged"`` holds and statuses print as their
    values. Each member's ``remedy`` is the generic advice for it; a result's
    ``message`` says what happened in that run.

    Example:
        >>> from hvpfunc.results import Status
        >>> Status("max_iters") is Status.MAX_ITERS, Status.DIVERGED == "diverged"
        (True, True)
        >>> Status.NEGATIVE_CURVATURE.remedy.split(":")[0]
        'H + damping is not positive definite'
    """

    CONVERGED = ("converged", "")
    MAX_ITERS = (
        "max_iters",
        "The iteration budget ran out: raise max_iters (num_terms for a series), loosen "
        "tol, or add damping or a preconditioner",
    )
    DIVERGED = (
        "diverged",
        "The iteration grew instead of contracting: use a smaller step (alpha=None picks "
        "1/||H||), damping above the magnitude of the most negative eigenvalue, or hf.cg",
    )
    NEGATIVE_CURVATURE = (
        "negative_curvature",
        "H + damping is not positive definite: add damping above the magnitude of the most "
        "negative eigenvalue (hf.lanczos(..., which='SA') finds it), or use hf.minres",
    )
    INDEFINITE = (
        "indefinite",
        "H + damping has an eigenvalue <= 0, for which this method cannot converge: add "
        "damping above its magnitude, or use hf.minres",
    )
    INCONSISTENT = (
        "inconsistent",
        "The right-hand side b is not in the range of a singular H + damping: add damping, or use the "
        "least-squares x returned (its residual lies in the null space)",
    )
    NON_FINITE = (
        "non_finite",
        "A product was nan or inf: check the loss at these parameters "
        "(torch.autograd.detect_anomaly() names the operation) or compute in float64",
    )

    remedy: str

    def __new__(cls, value: str, remedy: str) -> Status:
        member = str.__new__(cls, value)
        member._value_ = value
        member.remedy = remedy
        return member

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class ConvergenceWarning(UserWarning):
    """A solver stopped without meeting its tolerance; its result says so too."""


class EigResult(NamedTuple):
    """Eigenpairs of a symmetric operator.

    Attributes:
        eigenvalues: tensor of shape ``(k,)``, ordered as ``which`` asks ("LA":
            descending, "SA": ascending, "LM": descending magnitude).
        eigenvectors: a tree shaped like the start vector with a leading dimension ``k``
            on every leaf; each eigenvector has unit norm over the whole tree.
        converged: bool tensor of shape ``(k,)``.
        residuals: ‖H q − λ q‖ for every pair, shape ``(k,)``.
        num_matvecs: products with the operator spent.
        which: which end of the spectrum was computed: "LM", "LA" or "SA".
        status: a :class:`Status`: ``"converged"`` when every pair is, else
            ``"max_iters"`` or ``"non_finite"`` (the last finite pairs are returned).
        message: what happened, and what to do when it did not converge.
        errors: a bound on |λ − θ| per eigenvalue: min(r, r²/gap) from the residual r
            and the gap to the nearest other Ritz value less that value's residual
            (Lanczos), or r (power iteration, which knows no gap). The eigenvalue is this
            accurate even when the eigenvector is only as accurate as ``residuals`` say.
            r is a bound; the gap is an estimate, which an eigenvalue the run has not
            separated from θ's own voids (see :func:`hvpfunc.lanczos`, ``stop``). Never
            below the products' rounding, 10·ε·‖H‖ (ε of the less precise of the vectors
            and the parameters), which no residual can see.
        basis_size: the most parameter-sized vectors the solver held at once, its
            memory (Lanczos: the basis plus the next vector; power iteration: 1).
    """

    eigenvalues: Tensor
    eigenvectors: Any
    converged: Tensor
    residuals: Tensor
    num_matvecs: int
    which: Which
    status: Status = Status.CONVERGED
    message: str = ""
    errors: Optional[Tensor] = None
    basis_size: int = 1


class SolveResult(NamedTuple):
    """Solution of a linear system (H + δI) x = b.

    Attributes:
        x: solution tree shaped like ``b``; always finite.
        converged: whether ‖b − (H + δI) x‖ ≤ tol · ‖b‖ was reached.
        status: a :class:`Status`: ``"converged"``, ``"max_iters"``, ``"diverged"``,
            ``"negative_curvature"``, ``"indefinite"``, ``"inconsistent"`` or
            ``"non_finite"``.
        num_matvecs: products with the operator spent, including any spent choosing
            parameters (``stats`` breaks it down).
        residual_norm: ‖b − (H + δI) x‖ for the returned ``x`` (for LiSSA, whose products
            are stochastic, the last term's norm, an estimate).
        message: what happened, and what to do when it did not converge.
        stats: solver-specific details, e.g. Neumann's ``alpha``.
    """

    x: Any
    converged: bool
    status: Status
    num_matvecs: int
    residual_norm: float
    message: str = ""
    stats: Mapping[str, Any] = MappingProxyType({})


class TraceResult(NamedTuple):
    """A stochastic trace estimate.

    Attributes:
        estimate: 0-dim tensor.
        stderr: standard error of ``estimate`` (its standard deviation estimated from
            the probes, widened by Student's t for few probes so that ±1.96·stderr is a
            95% interval; for Hutch++ the low-rank part is exact given its sketch, so the
            error is the stochastic remainder's; XTrace's is the jackknife's, see
            :func:`hvpfunc.trace`). Never below the products' rounding, 10·ε·Σ‖x‖‖Hx‖
            over the forms xᵀHx that make the estimate (ε of the less precise of the
            vectors and the products): where every probe gives the same value (a
            diagonal H with Rademacher probes, a sketch that spans range(H)) the spread
            is zero but the value is not exact.
        num_matvecs: products with the operator spent.
        status: ``"converged"`` (every product was finite), or ``"non_finite"``: the
            estimate then comes from the probes before the first non-finite product
            (nan if there were none).
        message: what happened.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int
    status: Status = Status.CONVERGED
    message: str = ""


class DiagonalResult(NamedTuple):
    """A stochastic estimate of diag(H), as trees shaped like the parameters.

    ``stderr`` per entry, as in :class:`TraceResult`, its rounding floor 10·ε times the
    entry's mean |x ⊙ Hx| over the probes (and the sketch's basis for XDiag). ``status``
    and ``message`` as in :class:`TraceResult`.
    """

    estimate: Any
    stderr: Any
    num_matvecs: int
    status: Status = Status.CONVERGED
    message: str = ""


class SpectralDensity(NamedTuple):
    """A smoothed spectral density from stochastic Lanczos quadrature.

    Attributes:
        grid: points where the density is evaluated, shape ``(num_points,)``.
        density: the density on ``grid``; its trapezoidal integral over ``grid`` is one.
        nodes: Ritz values, shape ``(num_probes, num_iters)``.
        weights: quadrature weights, shape ``(num_probes, num_iters)``; each row sums to
            one, and the density is the mean over probes of Σ_i w_i · N(t; θ_i, σ²).
        sigma: the standard deviation of the Gaussian smoothing.
        num_matvecs: products with the operator spent.
        status: ``"converged"``, or ``"non_finite"``: the density then comes from the
            probes whose products were all finite (nan everywhere if none were).
        message: what happened.
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int
    status: Status = Status.CONVERGED
    message: str = ""

    def plot(self, ax: Any = None, *, log: bool = True, **kwargs: Any) -> Any:
        """Plot the density with matplotlib and return the figure.

        Args:
            ax: an existing matplotlib axes, or ``None`` for a new figure.
            log: logarithmic density axis (the usual view of Hessian spectra).
            **kwargs: passed to ``ax.plot``.

        Raises:
            ImportError: matplotlib is not installed (``pip install "hvpfunc[plot]"``).
        """
        fig, ax = axes(ax, "SpectralDensity.plot")
        grid = self.grid.detach().cpu().double().numpy()
        density = self.density.detach().cpu().double().numpy()
        floor = max(density.max() * 1e-8, 1e-300)
        ax.plot(grid, density.clip(min=floor), **kwargs)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return fig


class BlockSpectra(NamedTuple):
    """Per-group (per-layer) curvature: the trace and top eigenvalues of each diagonal
    block H_bb of the Hessian (:func:`hvpfunc.block_spectra`).

    Attributes:
        groups: the groups' names, in the order of their first parameter.
        traces: tr H_bb per group (Hutchinson, shared probes), shape ``(groups,)``.
        stderrs: their standard errors (±1.96·stderr is a 95% interval; never below the
            rounding of the products, as :class:`TraceResult`'s, from each group's Σ|z ⊙ Hz|).
        shares: each trace over their sum (the whole trace's estimate).
        sizes: parameters per group.
        top: the top ``k`` eigenvalues of each block, shape ``(groups, k)``, float64;
            nan where a block has fewer than ``k`` parameters.
        converged: per eigenvalue, whether Lanczos met its tolerance.
        num_matvecs: products with the operator spent (probes and Lanczos runs).
        status: ``"converged"``, ``"max_iters"`` (an eigenvalue missed its tolerance) or
            ``"non_finite"`` (a probe's product was not finite).
        message: what happened.
    """

    groups: Tuple[str, ...]
    traces: Tensor
    stderrs: Tensor
    shares: Tensor
    sizes: Tensor
    top: Tensor
    converged: Tensor
    num_matvecs: int
    status: Status = Status.CONVERGED
    message: str = ""

    def table(self) -> str:
        """The results as a Markdown table, one row per group."""
        k = self.top.shape[1]
        head = "| group | parameters | trace ± stderr | share |" + ("" if not k else f" top {k} |")
        rows = [head, "|" + "---|" * (4 + bool(k))]
        for i, name in enumerate(self.groups):
            row = (f"| {name} | {int(self.sizes[i])} | {float(self.traces[i]):.4g} ± {float(self.stderrs[i]):.2g} "
                   f"| {100 * float(self.shares[i]):.1f}% |")
            if k:
                row += " " + ", ".join(f"{float(v):.4g}" + ("" if bool(c) else "*")
                                       for v, c in zip(self.top[i], self.converged[i])) + " |"
            rows.append(row)
        if k and not bool(self.converged.all()):
            rows.append("\n\\* not converged")
        return "\n".join(rows)

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """A bar plot of the blocks' traces with 95% intervals; returns the figure.

        Raises:
            ImportError: matplotlib is not installed (``pip install "hvpfunc[plot]"``).
        """
        fig, ax = axes(ax, "BlockSpectra.plot", (max(4, 0.6 * len(self.groups) + 2), 4))
        x = range(len(self.groups))
        ax.bar(x, self.traces.detach().cpu().double().numpy(),
               yerr=1.96 * self.stderrs.detach().cpu().double().numpy(), **kwargs)
        ax.set_xticks(list(x))
        ax.set_xticklabels(self.groups, rotation=45, ha="right")
        ax.set_ylabel("trace of the diagonal block")
        return fig
