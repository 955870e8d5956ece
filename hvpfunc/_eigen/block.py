"""Block Lanczos: several vectors per step, their products in one batched call."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .._krylov import check_symmetric, empty_basis, orthogonalize, symmetry_slack
from .._operator import Operator
from .._progress import Progress
from ..results import Status
from .ritz import eigh, select

# Columns of a block whose part outside the basis is below this share of their norm are
# replaced by fresh random directions (the block Krylov space lost rank there).
_RANK_TOLERANCE = 1e3


def block_lanczos(
    op: Operator, x0: Tensor, k: int, *, block_size: int, which: str, tol: float, budget: int, max_basis: int,
    generator: torch.Generator, chunk_size, bar: Progress,
) -> Tuple[np.ndarray, Tensor, np.ndarray, np.ndarray, int, Status, str]:
    """The k ``which``-most eigenpairs by thick-restart block Lanczos with full
    reorthogonalization.

    Each step applies H to a block of ``block_size`` orthonormal vectors through one
    ``op.batch`` call (a ``vmap`` of the matvec: one pass of a GPU's kernels, or one
    collective of a data-parallel matvec, for the whole block), orthogonalizes the
    products against the whole basis (classical Gram–Schmidt twice, whose coefficients
    are the new columns of T = VᵀHV) and against each other (QR: HV_j = ... + V_{j+1}B_j).
    A Ritz pair (θ, Vy) has residual ‖B_last y_last‖, with y_last the part of y on the
    last block. When the basis holds ``max_basis`` vectors it restarts from the best
    k + (max_basis − k − block_size) // 2 Ritz vectors and the last block (Wu & Simon's
    thick restart, block form). A block of b vectors also finds up to b copies of a
    repeated eigenvalue, which a single vector's Krylov space cannot.

    Reference: Golub & Underwood, "The block Lanczos method for computing eigenvalues",
    Mathematical Software III (1977); Zhou & Saad, "Block Krylov–Schur method for large
    symmetric eigenvalue problems", Numer. Algorithms 47 (2008).

    Returns (values, vectors (k, n), converged, residuals, basis vectors held, status,
    detail).
    """
    n, b = x0.shape[0], block_size
    eps = torch.finfo(op.dtype).eps
    start = torch.randn(b, n, generator=generator, dtype=torch.float64).to(op.device, op.dtype)
    start[0] = x0
    V = empty_basis((max_basis + b, n), op.dtype, op.device)
    V[:b] = _orthonormal(start, None, generator)
    T = np.zeros((max_basis + b, max_basis + b))
    j = 0  # rows of V whose products are in T
    R_previous: Optional[np.ndarray] = None  # the last block's coupling, to check symmetry against
    norm_estimate = 0.0
    held = b
    while True:
        W = op.batch(V[j : j + b], chunk_size=chunk_size)
        if not bool(torch.isfinite(W).all()):
            return (*_pairs(T, V, j, R_previous, k, which, tol, eps, norm_estimate), held, Status.NON_FINITE,
                    "a product was not finite (nan or inf)")
        W, h = _project(V[: j + b], W)
        h = h.to("cpu", torch.float64).numpy()  # (b, j + b): the new block column of T
        if R_previous is not None:  # vᵀ_prev H v_new must come back as the coupling R found
            scale = np.maximum(np.abs(R_previous), max(norm_estimate, float(np.abs(h).max())))
            check_symmetric(h[:, j - b : j].ravel(), R_previous.ravel(), scale.ravel(),
                            symmetry_slack(op.layout.product_eps))
        T[: j + b, j : j + b] = h.T
        T[j : j + b, : j + b] = h
        T[j : j + b, j : j + b] = (h[:, j : j + b] + h[:, j : j + b].T) / 2
        j += b
        nxt, R = _next_block(V[:j], W, generator)
        theta, Y = eigh(T[:j, :j])
        norm_estimate = max(norm_estimate, float(np.abs(theta).max()))
        order = select(theta, which, min(k, j))
        residuals = np.linalg.norm(R @ Y[j - b : j, order], axis=0)
        ok = residuals <= np.maximum(tol * np.abs(theta[order]), 100 * eps * norm_estimate)
        bar.update(float(residuals[~ok].max()) if not ok.all() else 0.0)
        if len(order) == k and ok.all():
            return (*_pairs(T, V, j, R, k, which, tol, eps, norm_estimate), held, Status.CONVERGED, "")
        if op.num_matvecs + b > budget:
            return (*_pairs(T, V, j, R, k, which, tol, eps, norm_estimate), held, Status.MAX_ITERS,
                    f"max_iters={budget} products reached")
        R_previous = R
        if j + b > max_basis:  # thick restart: the preferred Ritz vectors, then the next block
            keep = min(k + max(max_basis - k - b, 0) // 2, j)
            kept = select(theta, which, keep)
            V[:keep] = torch.as_tensor(Y[:, kept].T.copy()).to(V.device, V.dtype) @ V[:j]
            T[:] = 0.0
            T[np.arange(keep), np.arange(keep)] = theta[kept]
            j = keep
            nxt = _orthonormal(nxt, V[:j], generator)  # Ritz vectors are orthonormal up to rounding
            R_previous = None  # the kept vectors' coupling to nxt enters T with the next expansion
        V[j : j + b] = nxt
        held = max(held, j + b)


def _project(V: Tensor, W: Tensor) -> Tuple[Tensor, Tensor]:
    """W (rows) orthogonalized against the rows of V, twice; the summed coefficients."""
    coefficients = torch.zeros(W.shape[0], V.shape[0], dtype=W.dtype, device=W.device)
    for _ in range(2):
        c = W @ V.T
        W = W - c @ V
        coefficients += c
    return W, coefficients


def _next_block(V: Tensor, W: Tensor, generator: torch.Generator) -> Tuple[Tensor, np.ndarray]:
    """The next block Q (rows orthonormal, orthogonal to V) and upper-triangular R with
    W = RᵀQ, by Gram–Schmidt twice, a row at a time; a row of W that lies in the span
    of V and the rows before it (a rank-deficient block) gets a fresh random direction,
    orthogonal to those, and a zero diagonal entry of R; one that nearly does is
    projected off V again.

    Householder QR did this wrongly: after a deficient column it puts an arbitrary
    direction in q_i and the later columns' parts along it in R[i, r > i], which zeroing
    row i of R dropped (and the fresh q_i was not orthogonal to the q_l after it), so T
    lost couplings and the symmetry check fired on symmetric matrices with repeated
    eigenvalues."""
    b = W.shape[0]
    Q = torch.empty_like(W)
    R = np.zeros((b, b))
    sizes = torch.linalg.vector_norm(W, dim=1).tolist()
    floor = _RANK_TOLERANCE * torch.finfo(W.dtype).eps * (max(sizes) or 1.0)
    for r in range(b):
        w, c = orthogonalize(Q[:r], W[r].clone())
        size = float(torch.linalg.vector_norm(w))
        if size < 0.5 * sizes[r]:
            # cancellation: what is left is off V by ε‖W_r‖/‖w‖ (W was projected off V
            # at ‖W_r‖'s scale), 1e-4 on a block near rank loss: project it off V again
            w, again = _off(V, Q[:r], w)
            c = c + again
            size = float(torch.linalg.vector_norm(w))
        R[:r, r] = c.to("cpu", torch.float64).numpy()
        if size > floor:
            Q[r] = w / size
            R[r, r] = size
            continue
        fresh = torch.randn(W.shape[1], generator=generator, dtype=torch.float64).to(W.device, W.dtype)
        fresh, _ = _off(V, Q[:r], fresh)
        Q[r] = fresh / torch.linalg.vector_norm(fresh)
    return Q, R


def _off(V: Tensor, Q: Tensor, w: Tensor) -> Tuple[Tensor, Tensor]:
    """w projected off the rows of V, then off the rows of Q (orthogonal to V), twice
    each, without concatenating V and Q (a copy of the whole basis); the coefficients
    along Q."""
    w, _ = orthogonalize(V, w)
    return orthogonalize(Q, w)


def _orthonormal(X: Tensor, V: Optional[Tensor], generator: torch.Generator) -> Tensor:
    """Rows of X made orthonormal (and orthogonal to the rows of V)."""
    if V is not None and V.shape[0]:
        X, _ = _project(V, X)
    Q, _ = _next_block(V if V is not None else X[:0], X, generator)
    return Q


def _pairs(T: np.ndarray, V: Tensor, j: int, R: Optional[np.ndarray], k: int, which: str, tol: float, eps: float,
           norm_estimate: float) -> Tuple[np.ndarray, Tensor, np.ndarray, np.ndarray]:
    """The k wanted Ritz pairs of the first j rows (values, unit vectors, converged,
    residuals); missing ones are nan with zero vectors, unknown residuals inf."""
    if j == 0:
        return (np.full(k, np.nan), torch.zeros(k, V.shape[1], dtype=V.dtype, device=V.device),
                np.zeros(k, dtype=bool), np.full(k, np.inf))
    theta, Y = eigh(T[:j, :j])
    order = select(theta, which, min(k, j))
    residuals = (np.linalg.norm(R @ Y[j - R.shape[0] : j, order], axis=0) if R is not None
                 else np.full(len(order), math.inf))
    converged = residuals <= np.maximum(tol * np.abs(theta[order]), 100 * eps * norm_estimate)
    pad = k - len(order)
    vectors = torch.as_tensor(Y[:, order].T.copy()).to(V.device, V.dtype) @ V[:j]
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    vectors = torch.cat([vectors, torch.zeros(pad, V.shape[1], dtype=V.dtype, device=V.device)])
    return (np.concatenate([theta[order], np.full(pad, np.nan)]), vectors,
            np.concatenate([converged, np.zeros(pad, dtype=bool)]),
            np.concatenate([residuals, np.full(pad, np.inf)]))
