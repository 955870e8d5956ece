"""Thick-restart Lanczos with full reorthogonalization for k extreme eigenpairs."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from ._operator import _check_start, _Operator
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
            match ``v0`` (the message names the leaf); a matvec that is not symmetric
            (detected for free: ⟨v_{j-1}, Hv_j⟩ must equal the previous step's β).

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
    # The projected matrix and its eigenproblems are tiny: numpy float64 on the host,
    # where each small operation costs microseconds rather than a kernel launch.
    T = np.zeros((m + 1, m + 1))
    V[0] = x0 / torch.linalg.vector_norm(x0)
    j = 0  # basis vectors whose products are in T
    beta = 0.0
    norm_estimate = 0.0
    reason = f"max_iters={budget} products reached"
    done = False
    exploring = explored = False
    plain = False  # whether V[j] came from the three-term step, so that T[j, j-1] = β
    # A symmetric H gives ⟨v_{j-1}, H v_j⟩ = ⟨H v_{j-1}, v_j⟩ = β_{j-1}; a gap beyond the
    # products' rounding means the matvec is not symmetric and every eigenvalue is wrong.
    symmetry_slack = 10 * math.sqrt(op.layout.product_eps)
    bar = _Progress(progress, total=budget, desc=f"lanczos (k={k}, {which})")
    try:
        while not done:
            w = op(V[j])
            w, h = _orthogonalize(V[: j + 1], w)
            # one device-to-host transfer per step for the coefficients and the norm
            host = torch.cat([h, torch.linalg.vector_norm(w)[None]]).to("cpu", torch.float64).numpy()
            h, beta = host[:-1], float(host[-1])
            if not np.isfinite(host).all():
                reason = "a product was not finite"
                break
            if plain and abs(h[j - 1] - T[j, j - 1]) > symmetry_slack * max(norm_estimate, abs(h[j])):
                raise ValueError(_asymmetry_message(h[j - 1], T[j, j - 1]))
            T[: j + 1, j] = h
            T[j, : j + 1] = h
            j += 1
            theta, Y = np.linalg.eigh(T[:j, :j])
            norm_estimate = max(norm_estimate, float(np.abs(theta).max()))
            wanted = _select(theta, which, k)
            residuals = beta * np.abs(Y[j - 1, wanted])
            ok = residuals <= _threshold(theta[wanted], tol, eps, norm_estimate)
            bar.update(float(residuals[~ok].max()) if not ok.all() else 0.0)
            invariant = beta <= 100 * eps * norm_estimate
            if invariant and j == n:
                done = True  # the basis spans the whole space: T's pairs are exact
                break
            if invariant and not explored:
                # A Krylov space holds one vector per distinct eigenvalue, so copies of a
                # repeated eigenvalue lie outside it: explore fresh directions until the
                # basis fills before accepting convergence, or they would be missed.
                exploring = explored = True
            if len(wanted) == k and ok.all() and not exploring:
                done = True
                break
            if op.num_matvecs >= budget:
                break
            if invariant:
                nxt = _fresh_direction(V[:j], generator)
            else:
                nxt = w / beta
                T[j, j - 1] = beta  # vᵀ_{j-1}Hv_j must come back equal: the symmetry check
            plain = not invariant and j != m
            if j == m:
                exploring = False
                p = k + (m - k) // 2
                keep = _select(theta, which, p)
                Yk = torch.as_tensor(Y[:, keep]).to(op.device, op.dtype)
                V[:p] = Yk.T @ V[:j]
                T[:] = 0.0
                T[:p, :p] = np.diag(theta[keep])
                j = p
            V[j] = nxt
    finally:
        bar.close()

    if j == 0:  # the first product was not finite: nothing to report but the start
        theta, Y = np.full(1, np.nan), np.ones((1, 1))
        j, beta = 1, float("nan")
    else:
        theta, Y = np.linalg.eigh(T[:j, :j])
    wanted = _select(theta, which, k)
    pad = k - len(wanted)  # nonzero when stopped before the basis held k vectors
    eigenvalues = torch.as_tensor(np.concatenate([theta[wanted], np.full(pad, np.nan)]))
    residuals_np = np.concatenate([beta * np.abs(Y[j - 1, wanted]), np.full(pad, np.inf)])
    converged = torch.as_tensor(residuals_np <= _threshold(eigenvalues.numpy(), tol, eps, norm_estimate))
    residuals = torch.as_tensor(residuals_np)
    vectors = torch.as_tensor(Y[:, wanted].T.copy()).to(op.device, op.dtype) @ V[:j]
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
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


def _asymmetry_message(forward: float, backward: float) -> str:
    return (
        f"the matvec is not symmetric: for consecutive Lanczos vectors, <v_j-1, H v_j> = "
        f"{forward:.6g} but <H v_j-1, v_j> = {backward:.6g}. Lanczos, power iteration, "
        "CG and SLQ need a symmetric operator (check it with "
        "hvpfunc.testing.assert_symmetric)."
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


def _select(theta: np.ndarray, which: str, count: int) -> np.ndarray:
    """Indices of the ``count`` Ritz values ``which`` prefers, in its order."""
    key = {"LA": -theta, "SA": theta, "LM": -np.abs(theta)}[which]
    return np.argsort(key, kind="stable")[:count]


def _threshold(theta: np.ndarray, tol: float, eps: float, norm_estimate: float) -> np.ndarray:
    """Residual a Ritz pair may have: tol·|θ|, floored at rounding level 100·ε·‖H‖."""
    return np.maximum(tol * np.abs(theta), 100 * eps * norm_estimate)


def _fresh_direction(V: Tensor, generator: torch.Generator) -> Tensor:
    """A random unit vector orthogonal to the rows of V."""
    z = torch.randn(V.shape[1], generator=generator, dtype=torch.float64)
    z, _ = _orthogonalize(V, z.to(V.device, V.dtype))
    return z / torch.linalg.vector_norm(z)
