"""Following the top eigenvalues of a changing Hessian (sharpness during training)."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch.utils import _pytree as pytree

from .._plotting import axes
from .._types import MatvecFn, Tree, Which
from ..results import EigResult
from ..tree import norm, random_like
from .lanczos import lanczos

_UNCHECKED = ("warm-started with find_copies=False: an eigenvalue that overtook the tracked ones since the "
              "last call can be missed (the start holds little of its eigenvector); drop find_copies=False "
              "to check")


class EigenTracker:
    """The top ``k`` eigenvalues of a Hessian that changes with training, for k ≥ 2
    warm-started from the previous call's eigenvectors.

    Between nearby optimizer steps the top eigenvectors move little, so a Lanczos start
    vector built from them (their sum, plus a small random part) has most of its weight
    on the wanted subspace already and converges in fewer products. But it is not
    random: an eigenvalue that overtook the tracked ones since the last call has little
    weight in it, and a run from it stops at the old eigenvalues (k = 1, a crossing 1%
    above the old top, tol 1e-3: 120 of 120 warm updates returned the old top as
    converged). So a warm start is always followed by :func:`hvpfunc.lanczos`' copy
    check, which looks from a fresh random vector for anything beyond the k-th value
    found (0 of 120 missed). With k ≥ 2 that check runs anyway, and warm starts save
    products (along an MLP's training, k = 2 at tol 1e-6: 199 products for 9 calls
    against 227 cold); with k = 1 the check costs more than the warm start saves (131
    against 93 cold), so k = 1 starts cold, with the guarantee of a random start.
    ``find_copies=False`` warm-starts without the check (53 products for k = 1), and
    every result's ``message`` then says what it may have missed. The tracker holds only
    the last eigenvectors (k parameter-sized vectors), the history of eigenvalues, and
    the products each call spent; it is explicit state you create and keep.

    Args:
        k: eigenvalues to follow.
        which: ``"LA"`` (default: sharpness), ``"SA"`` or ``"LM"``.
        tol: Lanczos's relative residual tolerance (default 1e-3, which leaves the
            eigenvalues far more accurate: about r²/gap; 2e-6 on the test's MLP).
        stop: as in :func:`hvpfunc.lanczos`; default ``"residual"``. ``"eigenvalue"``
            trusts a gap estimated from the other Ritz values, which the few steps of a
            warm start make unreliable (measured: a 1.2e-3 error at tol 1e-3 after two
            products).
        generator: draws the random part of the start vectors (and the first call's);
            default a CPU generator seeded with 0.
        random_share: the norm of the random part relative to the warm part (0.1).
        **lanczos_options: passed to :func:`hvpfunc.lanczos` (``max_iters``,
            ``max_basis``, ``find_copies``, ``progress``). ``find_copies=True``
            warm-starts k = 1 too, checked; ``False`` warm-starts unchecked (above).

    Attributes:
        steps, eigenvalues, num_matvecs, converged: one entry per :meth:`update`: the
            step given, the eigenvalues (a tensor of k), the products spent, and whether
            all k converged.

    Example:
        >>> import torch, hvpfunc as hf
        >>> tracker = hf.EigenTracker(k=1, tol=1e-8)
        >>> for step, scale in enumerate([1.0, 1.1, 1.2]):
        ...     H = torch.diag(scale * torch.arange(1.0, 21.0, dtype=torch.float64))
        ...     _ = tracker.update(lambda v: H @ v, torch.zeros(20, dtype=torch.float64), step=step)
        >>> [round(float(e[0]), 6) for e in tracker.eigenvalues]
        [20.0, 22.0, 24.0]
    """

    def __init__(self, k: int = 1, *, which: Which = "LA", tol: float = 1e-3, stop: str = "residual",
                 generator: Optional[torch.Generator] = None, random_share: float = 0.1, **lanczos_options: Any):
        if not random_share >= 0:
            raise ValueError(f"random_share must be non-negative, got {random_share}")
        self.k, self.which, self.tol, self.stop = k, which, tol, stop
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.random_share = random_share
        self.options = lanczos_options
        self.vectors: Optional[Tree] = None  # the last eigenvectors, stacked on a leading k
        self.steps: List[Any] = []
        self.eigenvalues: List[torch.Tensor] = []
        self.num_matvecs: List[int] = []
        self.converged: List[bool] = []

    def update(self, matvec: MatvecFn, params: Tree, *, step: Any = None) -> EigResult:
        """The top eigenpairs of ``matvec`` (at ``params``, which gives the vectors'
        shape), started from the previous call's eigenvectors where :meth:`_warm` says so;
        recorded with ``step`` (default: the call's index)."""
        warm = self._warm()
        result = lanczos(matvec, self._start(params, warm), k=self.k, which=self.which, tol=self.tol,
                         stop=self.stop, generator=self.generator, **self.options)
        if warm and self.options.get("find_copies") is False:
            result = result._replace(message="; ".join(filter(None, [result.message, _UNCHECKED])))
        self.vectors = result.eigenvectors
        self.steps.append(len(self.steps) if step is None else step)
        self.eigenvalues.append(result.eigenvalues.detach())
        self.num_matvecs.append(result.num_matvecs)
        self.converged.append(bool(result.converged.all()))
        return result

    def _warm(self) -> bool:
        """Whether this call starts from the last eigenvectors: only where the copy check
        runs after it (k ≥ 2, or ``find_copies=True``), or the user waived it
        (``find_copies=False``); see the class docstring."""
        return self.vectors is not None and (self.k > 1 or self.options.get("find_copies") is not None)

    def _start(self, params: Tree, warm: bool) -> Tree:
        noise = random_like(params, generator=self.generator, kind="gaussian")
        if not warm:
            return noise
        previous = pytree.tree_map(lambda stacked: stacked.sum(dim=0), self.vectors)
        scale = self.random_share * float(norm(previous)) / float(norm(noise))
        return pytree.tree_map(lambda w, z: w.to(z.dtype) + scale * z, previous, noise)

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """The tracked eigenvalues against the steps; returns the figure.

        Raises:
            ImportError: matplotlib is not installed (``pip install "hvpfunc[plot]"``).
        """
        fig, ax = axes(ax, "EigenTracker.plot")
        if self.eigenvalues:
            values = torch.stack([e.double().cpu() for e in self.eigenvalues]).numpy()
            for i in range(values.shape[1]):
                ax.plot(self.steps, values[:, i], marker="o", **kwargs)
        ax.set_xlabel("step")
        ax.set_ylabel("top eigenvalue" if self.k == 1 else f"top {self.k} eigenvalues")
        return fig
