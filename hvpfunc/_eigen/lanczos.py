"""Thick-restart Lanczos with full reorthogonalization for k extreme eigenpairs."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Optional, get_args

import numpy as np
import torch
from torch import Tensor

from .._krylov import check_symmetric, expand, orthogonalize, symmetry_slack
from .._operator import Operator, check_start
from .._outcome import finish
from .._progress import Progress
from .._types import MatvecFn, ProgressArg, Tree, Which
from ..results import EigResult, Status

_WHICH = get_args(Which)


def lanczos(
    matvec: MatvecFn,
    v0: Tree,
    k: int = 1,
    *,
    which: Which = "LA",
    tol: float = 1e-6,
    max_iters: Optional[int] = None,
    max_basis: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: ProgressArg = False,
    stop: Literal["residual", "eigenvalue"] = "residual",
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

    The iteration checks the wanted Ritz pairs after every product. With
    ``stop="residual"`` (default) it stops when all k residuals r = ‖Hq − θq‖ are at
    most ``tol · |θ|`` (or the rounding level ``100 ε ‖H‖`` for eigenvalues near zero),
    the criterion ARPACK uses: the eigenvectors are then accurate too. An eigenvalue is
    far more accurate than its residual: |λ − θ| ≤ min(r, r²/gap), with gap the distance
    to the rest of the spectrum (Parlett, *The Symmetric Eigenvalue Problem*, §11.7),
    estimated from the other Ritz values; that bound is ``EigResult.errors``. With
    ``stop="eigenvalue"`` the iteration stops when every bound is at most ``tol · |θ|``,
    which is what a relative tolerance on the eigenvalue means (PyHessian's ``tol`` is a
    relative change between iterations, which bounds nothing) and costs fewer products;
    the eigenvectors are then only about sqrt(tol) accurate. If the Krylov space becomes
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
        stop: ``"residual"`` (default) or ``"eigenvalue"``: what ``tol`` bounds (above).

    Returns:
        :class:`~hvpfunc.EigResult`: eigenvalues ordered as ``which`` asks (descending,
        ascending, or descending magnitude), unit-norm eigenvectors stacked on a leading
        dimension k of every leaf, per-pair ``converged`` and ``residuals``, and a
        ``status``: ``"converged"``, ``"max_iters"``, or ``"non_finite"`` (a product was
        nan or inf; the Ritz pairs of the last finite basis are returned). Any status
        but ``"converged"`` comes with a :class:`~hvpfunc.ConvergenceWarning`.

    Raises:
        ValueError: bad ``which``, ``tol``, ``k`` (e.g. larger than the dimension) or
            ``max_basis``; a zero or non-finite ``v0``; a matvec output that does not
            match ``v0`` (the message names the leaf); a matvec that is not symmetric
            (detected for free: ⟨v_{j-1}, Hv_j⟩ must equal the previous step's β).

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> res = hf.lanczos(lambda v: H @ v, torch.ones(100, dtype=torch.float64), k=3, tol=1e-10)
        >>> res.eigenvalues, res.status
        (tensor([100.,  99.,  98.], dtype=torch.float64), <Status.CONVERGED: 'converged'>)

    References:
        Lanczos (1950); Wu & Simon, "Thick-restart Lanczos method for large symmetric
        eigenvalue problems", SIAM J. Matrix Anal. Appl. 22 (2000); Lehoucq, Sorensen &
        Yang, *ARPACK Users' Guide* (1998).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if stop not in ("residual", "eigenvalue"):
        raise ValueError(f"stop must be 'residual' or 'eigenvalue', got {stop!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    op = Operator(matvec, v0, name="v0")
    n = op.n
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = int(k)  # numpy integers too
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
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
    check_start(x0, name="v0")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    eps = torch.finfo(op.dtype).eps
    slack = symmetry_slack(op.layout.product_eps)
    state = _start(x0, m)
    status, detail = Status.MAX_ITERS, f"max_iters={budget} products reached"
    bar = Progress(progress, total=budget, desc=f"lanczos (k={k}, {which})")
    try:
        while True:
            w = _expand(state, op, slack)
            if w is None:
                status, detail = Status.NON_FINITE, "a product was not finite (nan or inf)"
                break
            ritz = _ritz(state, which, k, tol, eps, stop)
            bar.update(float(ritz.residuals[~ritz.ok].max()) if not ritz.ok.all() else 0.0)
            invariant = state.beta <= 100 * eps * state.norm_estimate
            if invariant and state.j == n:
                status = Status.CONVERGED  # the basis spans the whole space: T's pairs are exact
                break
            if invariant and not state.explored:
                # A Krylov space holds one vector per distinct eigenvalue, so copies of a
                # repeated eigenvalue lie outside it: explore fresh directions until the
                # basis fills before accepting convergence, or they would be missed.
                state.exploring = state.explored = True
            if len(ritz.wanted) == k and ritz.ok.all() and not state.exploring:
                status = Status.CONVERGED
                break
            if op.num_matvecs >= budget:
                break
            _advance(state, w, ritz, invariant=invariant, keep=k + (m - k) // 2, which=which, generator=generator)
    finally:
        bar.close()

    eigenvalues, vectors, converged, residuals, errors = _extract(state, which, k, tol, eps, stop)
    if status is Status.CONVERGED and not bool(converged.all()):
        status = Status.MAX_ITERS  # an invariant subspace smaller than k: pairs are missing
    message = ""
    if status is not Status.CONVERGED:
        short = int((~converged).sum())
        message = f"{detail}; {short} of {k} pairs above tolerance. {status.remedy}"
    result = EigResult(
        eigenvalues=eigenvalues.to(op.device, op.dtype),
        eigenvectors=op.layout.unflatten(vectors),
        converged=converged.to(op.device),
        residuals=residuals.to(op.device, op.dtype),
        errors=errors.to(op.device, op.dtype),
        num_matvecs=op.num_matvecs,
        which=which,
        status=status,
        message=message,
    )
    return finish(result, f"lanczos(k={k}, which={which!r})")


@dataclass
class _State:
    """A thick-restart Lanczos run between steps."""

    V: Tensor  # (m + 1, n): rows :j are the basis whose products are in T, row j is next
    T: np.ndarray  # (m + 1, m + 1): the projected matrix VᵀHV, on the host in float64
    j: int = 0
    beta: float = 0.0  # norm of the last residual direction
    # c with H V[:j] − V[:j] T[:j, :j] = V[j] cᵀ: β e_last after an expansion, β Y[last, kept]
    # after a restart; a Ritz pair (θ, y) has residual |cᵀy|
    coupling: np.ndarray = field(default_factory=lambda: np.zeros(0))
    norm_estimate: float = 0.0  # the largest |Ritz value| seen, a lower bound of ‖H‖
    plain: bool = False  # V[j] came from the three-term step, so T[j, j-1] = β is to be checked
    exploring: bool = False  # after an invariant subspace, until the basis fills
    explored: bool = False


class _Ritz(NamedTuple):
    theta: np.ndarray  # Ritz values, ascending
    Y: np.ndarray  # their eigenvectors in the basis
    wanted: np.ndarray  # indices of the k pairs ``which`` prefers, in its order
    residuals: np.ndarray  # ‖H Vy − θ Vy‖ = β |y_last| of the wanted pairs
    ok: np.ndarray  # whether each wanted residual meets the tolerance


def _start(x0: Tensor, m: int) -> _State:
    V = torch.zeros(m + 1, x0.shape[0], dtype=x0.dtype, device=x0.device)
    V[0] = x0 / torch.linalg.vector_norm(x0)
    # The projected matrix and its eigenproblems are tiny: numpy float64 on the host,
    # where each small operation costs microseconds rather than a kernel launch.
    return _State(V=V, T=np.zeros((m + 1, m + 1)))


def _expand(state: _State, op: Operator, slack: float) -> Optional[Tensor]:
    """One product: H V[j] goes into column j of T. Returns the residual direction, or
    None (the state unchanged) when the product was not finite."""
    j = state.j
    w, h, beta = expand(state.V[: j + 1], op(state.V[j]))
    # one device-to-host transfer per step for the coefficients and the norm
    host = torch.cat([h, beta[None]]).to("cpu", torch.float64).numpy()
    if not np.isfinite(host).all():
        return None
    h = host[:-1]
    if state.plain:
        check_symmetric(h[j - 1], state.T[j, j - 1], max(state.norm_estimate, abs(h[j])), slack)
    state.T[: j + 1, j] = h
    state.T[j, : j + 1] = h
    state.j = j + 1
    state.beta = float(host[-1])
    state.coupling = np.zeros(j + 1)
    state.coupling[j] = state.beta
    return w


def _ritz(state: _State, which: str, k: int, tol: float, eps: float, stop: str) -> _Ritz:
    """The Ritz pairs of the current basis and which of the wanted ones have converged."""
    j = state.j
    theta, Y = np.linalg.eigh(state.T[:j, :j])
    state.norm_estimate = max(state.norm_estimate, float(np.abs(theta).max()))
    wanted = _select(theta, which, k)
    residuals = np.abs(state.coupling @ Y[:, wanted])
    measure = residuals if stop == "residual" else _error_bounds(theta, wanted, residuals)
    ok = measure <= _threshold(theta[wanted], tol, eps, state.norm_estimate)
    return _Ritz(theta, Y, wanted, residuals, ok)


def _error_bounds(theta: np.ndarray, wanted: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """min(r, r²/gap) per wanted Ritz value, the gap estimated by the nearest other Ritz
    value (Parlett §11.7; ARPACK's error estimates use the same gap)."""
    if len(theta) < 2:
        return residuals
    others = np.abs(theta[wanted][:, None] - theta[None, :])
    others[np.arange(len(wanted)), wanted] = np.inf
    gap = others.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        quadratic = np.where(gap > 0, residuals**2 / gap, np.inf)
    return np.minimum(residuals, quadratic)


def _advance(
    state: _State, w: Tensor, ritz: _Ritz, *, invariant: bool, keep: int, which: str,
    generator: torch.Generator,
) -> None:
    """Put the next basis vector in place: w/β, or a fresh random direction after an
    invariant subspace; restart first when the basis is full."""
    j, m = state.j, state.V.shape[0] - 1
    if invariant:
        nxt = _fresh_direction(state.V[:j], generator)
    else:
        nxt = w / state.beta
        state.T[j, j - 1] = state.beta  # vᵀ_{j-1}Hv_j must come back equal: the symmetry check
    state.plain = not invariant and j != m
    if j == m:
        _restart(state, ritz, keep, which)
    state.V[state.j] = nxt


def _restart(state: _State, ritz: _Ritz, keep: int, which: str) -> None:
    """Thick restart (Wu & Simon): keep the ``keep`` preferred Ritz vectors as the new
    basis, T their diagonal of Ritz values; the next expansion refills the coupling."""
    state.exploring = False
    kept = _select(ritz.theta, which, keep)
    Yk = torch.as_tensor(ritz.Y[:, kept]).to(state.V.device, state.V.dtype)
    state.V[:keep] = Yk.T @ state.V[: state.j]
    state.T[:] = 0.0
    state.T[:keep, :keep] = np.diag(ritz.theta[kept])
    state.coupling = state.beta * ritz.Y[state.j - 1, kept]
    state.j = keep


def _extract(state: _State, which: str, k: int, tol: float, eps: float, stop: str):
    """The k wanted pairs of the last finite basis: eigenvalues, unit vectors (rows),
    per-pair convergence and residuals; missing pairs are nan with zero vectors."""
    n = state.V.shape[1]
    if state.j == 0:  # the first product was not finite: nothing but the start vector
        theta, Y, j, coupling = np.full(1, np.nan), np.ones((1, 1)), 1, np.full(1, np.nan)
    else:
        j, coupling = state.j, state.coupling
        theta, Y = np.linalg.eigh(state.T[:j, :j])
    wanted = _select(theta, which, k)
    pad = k - len(wanted)  # nonzero when stopped before the basis held k vectors
    eigenvalues = torch.as_tensor(np.concatenate([theta[wanted], np.full(pad, np.nan)]))
    found = np.abs(coupling @ Y[:, wanted])
    residuals = np.concatenate([found, np.full(pad, np.inf)])
    errors = np.concatenate([_error_bounds(theta, wanted, found), np.full(pad, np.inf)])
    measure = residuals if stop == "residual" else errors
    converged = torch.as_tensor(measure <= _threshold(eigenvalues.numpy(), tol, eps, state.norm_estimate))
    V = state.V
    vectors = torch.as_tensor(Y[:, wanted].T.copy()).to(V.device, V.dtype) @ V[:j]
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    vectors = torch.cat([vectors, torch.zeros(pad, n, dtype=V.dtype, device=V.device)])
    return eigenvalues, vectors, converged, torch.as_tensor(residuals), torch.as_tensor(errors)


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
    z, _ = orthogonalize(V, z.to(V.device, V.dtype))
    return z / torch.linalg.vector_norm(z)
