"""Thick-restart Lanczos with full reorthogonalization for k extreme eigenpairs."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from ._operator import _check_start, _isfinite, _Operator
from ._progress import _Progress
from .results import ConvergenceWarning, EigResult

__all__ = ["lanczos"]

Tree = Any
_WHICH = ("LA", "SA", "LM")


def lanczos(
    matvec: Callable[[Tree], Tree],
    v0: Tree,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    max_basis: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: Any = False,
) -> EigResult:
    """The k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Lanczos builds an orthonormal basis V of the Krylov space span{v0, Hv0, H²v0, ...};
    the eigenpairs (θ, y) of the small projected matrix T = VᵀHV give Ritz pairs
    (θ, Vy) whose residual is ‖H Vy − θ Vy‖ = β |y_last|, known without extra products.
    Every new vector is orthogonalized against the whole basis twice (classical
    Gram–Schmidt, as one matrix product per pass), which prevents the spurious
    "ghost" copies of converged eigenvalues that plain three-term Lanczos produces.
    When the basis holds ``max_basis`` vectors it is restarted (Wu & Simon): it keeps
    the best ``k + (max_basis − k) // 2`` Ritz vectors and the residual direction, so
    memory stays at ``max_basis + 1`` parameter-sized vectors however long the run.

    The iteration checks the wanted Ritz pairs after every product and stops when all
    k residuals are at most ``tol · |θ|`` (or the rounding level ``100 ε ‖H‖`` for
    eigenvalues near zero), the criterion ARPACK uses. If the Krylov space becomes
    invariant before k pairs are found (a start vector in a small eigenspace), it
    continues from a random vector orthogonal to the basis, drawn from ``generator``,
    and accepts convergence only after that direction has filled the basis: a Krylov
    space holds one vector per distinct eigenvalue, so this is how further copies of a
    repeated eigenvalue are found (as ARPACK does on breakdown).

    Args:
        matvec: ``v -> H v`` on trees shaped like ``v0``; H must be symmetric.
        v0: start vector, a nonzero finite tree (random is best).
        k: number of eigenpairs, 1 ≤ k ≤ dimension.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance.
        max_iters: most products; default ``max(1000, 20 k)``.
        max_basis: basis size before a restart; default ``max(2k + 1, 20)`` (as
            ARPACK's ``ncv`` in scipy), capped at the dimension; at least ``k + 2``
            unless it equals the dimension.
        generator: draws continuation vectors after an invariant subspace is found;
            default a CPU generator seeded with 0, so results are reproducible.
        progress: ``True`` for a progress bar, or a callable
            ``progress(step, largest_unconverged_residual)``.

    Returns:
        :class:`~hvpfunc.EigResult`: eigenvalues ordered as ``which`` asks (descending,
        ascending, or descending magnitude), unit-norm eigenvectors stacked on a leading
        dimension k of every leaf, per-pair ``converged`` and ``residuals``. If
        ``max_iters`` is reached or a product is not finite, the current Ritz pairs are
        returned with ``converged`` False where they fall short, and a
        :class:`~hvpfunc.ConvergenceWarning` is issued.

    Raises:
        ValueError: bad ``which``, ``tol``, ``k`` (e.g. larger than the dimension) or
            ``max_basis``; a zero or non-finite ``v0``; a matvec output that does not
            match ``v0`` (the message names the leaf).

    Example:
        >>> H = torch.diag(torch.arange(1.0, 101.0))
        >>> res = lanczos(lambda v: H @ v, torch.ones(100), k=3, which="LA", tol=1e-8)
        >>> res.eigenvalues
        tensor([100.,  99.,  98.])

    References:
        Lanczos (1950); Wu & Simon, "Thick-restart Lanczos method for large symmetric
        eigenvalue problems", SIAM J. Matrix Anal. Appl. 22 (2000); Lehoucq, Sorensen &
        Yang, *ARPACK Users' Guide* (1998).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    op = _Operator(matvec, v0, name="v0")
    n = op.n
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer between 1 and the dimension {n}, got {k}")
    m = min(max_basis if max_basis is not None else max(2 * k + 1, 20), n)
    if m < n and m < k + 2:
        raise ValueError(
            f"max_basis={max_basis} is too small for k={k}: it must be at least k + 2 = "
            f"{k + 2} (or the dimension {n})"
        )
    budget = max_iters if max_iters is not None else max(1000, 20 * k)
    if budget < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    x0 = op.layout.flatten(v0)
    _check_start(x0, name="v0")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    eps = torch.finfo(op.dtype).eps
    V = torch.zeros(m + 1, n, dtype=op.dtype, device=op.device)
    T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    V[0] = x0 / torch.linalg.vector_norm(x0)
    j = 0  # basis vectors whose products are in T
    beta = 0.0
    norm_estimate = 0.0
    reason = f"max_iters={budget} products reached"
    done = False
    exploring = explored = False
    bar = _Progress(progress, total=budget, desc=f"lanczos (k={k}, {which})")
    try:
        while not done:
            w = op(V[j])
            w, h = _orthogonalize(V[: j + 1], w)
            beta = float(torch.linalg.vector_norm(w))
            h = h.to("cpu", torch.float64)
            if not (_isfinite(beta) and bool(torch.isfinite(h).all())):
                reason = "a product was not finite"
                break
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            j += 1
            theta, Y = torch.linalg.eigh(T[:j, :j])
            norm_estimate = max(norm_estimate, float(theta.abs().max()))
            wanted = _select(theta, which, k)
            residuals = beta * Y[j - 1, wanted].abs()
            ok = residuals <= _threshold(theta[wanted], tol, eps, norm_estimate)
            bar.update(float(residuals[~ok].max()) if not bool(ok.all()) else 0.0)
            invariant = beta <= 100 * eps * norm_estimate
            if invariant and j == n:
                done = True  # the basis spans the whole space: T's pairs are exact
                break
            if invariant and not explored:
                # A Krylov space holds one vector per distinct eigenvalue, so copies of a
                # repeated eigenvalue lie outside it: explore fresh directions until the
                # basis fills before accepting convergence, or they would be missed.
                exploring = explored = True
            if len(wanted) == k and bool(ok.all()) and not exploring:
                done = True
                break
            if op.num_matvecs >= budget:
                break
            if invariant:
                nxt = _fresh_direction(V[:j], generator)
            else:
                nxt = w / beta
            if j == m:
                exploring = False
                p = k + (m - k) // 2
                keep = _select(theta, which, p)
                Yk = Y[:, keep].to(op.device, op.dtype)
                V[:p] = Yk.T @ V[:j]
                T.zero_()
                T[:p, :p] = torch.diag(theta[keep])
                j = p
            V[j] = nxt
    finally:
        bar.close()

    if j == 0:  # the first product was not finite: nothing to report but the start
        theta = torch.full((1,), float("nan"), dtype=torch.float64)
        Y = torch.ones(1, 1, dtype=torch.float64)
        j, beta = 1, float("nan")
    else:
        theta, Y = torch.linalg.eigh(T[:j, :j])
    wanted = _select(theta, which, k)
    residuals = beta * Y[j - 1, wanted].abs()
    converged = residuals <= _threshold(theta[wanted], tol, eps, norm_estimate)
    vectors = Y[:, wanted].T.to(op.device, op.dtype) @ V[:j]
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    eigenvalues = theta[wanted]
    if len(wanted) < k:  # stopped before the basis held k vectors
        pad = k - len(wanted)
        eigenvalues = torch.cat([eigenvalues, torch.full((pad,), float("nan"), dtype=torch.float64)])
        residuals = torch.cat([residuals, torch.full((pad,), float("inf"), dtype=torch.float64)])
        converged = torch.cat([converged, torch.zeros(pad, dtype=torch.bool)])
        vectors = torch.cat([vectors, torch.zeros(pad, n, dtype=op.dtype, device=op.device)])
    if not bool(converged.all()):
        warnings.warn(
            f"lanczos(k={k}, which={which!r}) did not converge: {reason}; "
            f"{int((~converged).sum())} of {k} pairs above tolerance",
            ConvergenceWarning,
            stacklevel=2,
        )
    return EigResult(
        eigenvalues=eigenvalues.to(op.device, op.dtype),
        eigenvectors=op.layout.unflatten(vectors),
        converged=converged.to(op.device),
        residuals=residuals.to(op.device, op.dtype),
        num_matvecs=op.num_matvecs,
        which=which,
    )


def _orthogonalize(V: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """Project w off the rows of V twice (classical Gram–Schmidt, "twice is enough").

    Works batched: V of shape ``(..., j, n)`` and w of shape ``(..., n)``. Returns the
    projected w and the coefficients Vᵀw of both passes summed, shape ``(..., j)``.

    Reference: Giraud, Langou & Rozložník, "The loss of orthogonality in the
    Gram–Schmidt orthogonalization process", Comput. Math. Appl. 50 (2005).
    """
    h = (V @ w.unsqueeze(-1)).squeeze(-1)
    w = w - (h.unsqueeze(-2) @ V).squeeze(-2)
    h2 = (V @ w.unsqueeze(-1)).squeeze(-1)
    w = w - (h2.unsqueeze(-2) @ V).squeeze(-2)
    return w, h + h2


def _select(theta: Tensor, which: str, count: int) -> Tensor:
    """Indices of the ``count`` Ritz values ``which`` prefers, in its order."""
    if which == "LA":
        order = torch.argsort(theta, descending=True)
    elif which == "SA":
        order = torch.argsort(theta)
    else:
        order = torch.argsort(theta.abs(), descending=True)
    return order[:count]


def _threshold(theta: Tensor, tol: float, eps: float, norm_estimate: float) -> Tensor:
    """Residual a Ritz pair may have: tol·|θ|, floored at rounding level 100·ε·‖H‖."""
    return torch.clamp(tol * theta.abs(), min=100 * eps * norm_estimate)


def _fresh_direction(V: Tensor, generator: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of V."""
    z = torch.randn(V.shape[1], generator=generator, dtype=torch.float64)
    z, _ = _orthogonalize(V, z.to(V.device, V.dtype))
    return z / torch.linalg.vector_norm(z)
