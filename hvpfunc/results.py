"""The small immutable records the solvers return, and the warning they emit."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping, NamedTuple

from torch import Tensor

__all__ = [
    "ConvergenceWarning",
    "EigResult",
    "SolveResult",
    "TraceResult",
    "DiagonalResult",
    "SpectralDensity",
]


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
    """

    eigenvalues: Tensor
    eigenvectors: Any
    converged: Tensor
    residuals: Tensor
    num_matvecs: int
    which: str


class SolveResult(NamedTuple):
    """Solution of a linear system (H + δI) x = b.

    Attributes:
        x: solution tree shaped like ``b``; always finite.
        converged: whether ‖b − (H + δI) x‖ ≤ tol · ‖b‖ was reached.
        status: ``"converged"``, ``"max_iters"``, ``"diverged"``,
            ``"negative_curvature"``, ``"indefinite"`` or ``"non_finite"``.
        num_matvecs: products with the operator spent, including any spent choosing
            parameters (``stats`` breaks it down).
        residual_norm: ‖b − (H + δI) x‖ for the returned ``x`` (for LiSSA, whose products
            are stochastic, the last term's norm, an estimate).
        message: what happened, and what to do when it did not converge.
        stats: solver-specific details, e.g. Neumann's ``alpha``.
    """

    x: Any
    converged: bool
    status: str
    num_matvecs: int
    residual_norm: float
    message: str = ""
    stats: Mapping[str, Any] = MappingProxyType({})


class TraceResult(NamedTuple):
    """A stochastic trace estimate.

    Attributes:
        estimate: 0-dim tensor.
        stderr: standard error of ``estimate`` (its standard deviation estimated from
            the probes; for Hutch++ the low-rank part is exact given its sketch, so the
            error is the stochastic remainder's).
        num_matvecs: products with the operator spent.
    """

    estimate: Tensor
    stderr: Tensor
    num_matvecs: int


class DiagonalResult(NamedTuple):
    """A stochastic estimate of diag(H), as trees shaped like the parameters."""

    estimate: Any
    stderr: Any
    num_matvecs: int


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
    """

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    num_matvecs: int

    def plot(self, ax: Any = None, *, log: bool = True, **kwargs: Any) -> Any:
        """Plot the density with matplotlib and return the figure.

        Args:
            ax: an existing matplotlib axes, or ``None`` for a new figure.
            log: logarithmic density axis (the usual view of Hessian spectra).
            **kwargs: passed to ``ax.plot``.

        Raises:
            ImportError: matplotlib is not installed (``pip install "hvpfunc[plot]"``).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise ImportError(
                "SpectralDensity.plot needs matplotlib: pip install 'hvpfunc[plot]'"
            ) from err
        if ax is None:
            fig, ax = plt.subplots(figsize=(6, 4))
        else:
            fig = ax.figure
        grid = self.grid.detach().cpu().double().numpy()
        density = self.density.detach().cpu().double().numpy()
        floor = max(density.max() * 1e-8, 1e-300)
        ax.plot(grid, density.clip(min=floor), **kwargs)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return fig
