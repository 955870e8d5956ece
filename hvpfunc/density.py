"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ._operator import ChunkSize, _Operator, _resolve_chunk
from ._progress import _Progress
from .lanczos import _asymmetry_message, _orthogonalize
from .results import SpectralDensity

__all__ = ["spectral_density"]

Tree = Any


def spectral_density(
    matvec: Callable[[Tree], Tree],
    like: Tree,
    *,
    num_probes: int = 10,
    num_iters: int = 90,
    generator: Optional[torch.Generator] = None,
    sigma: Optional[float] = None,
    num_points: int = 2000,
    chunk_size: ChunkSize = "auto",
    progress: Any = False,
) -> SpectralDensity:
    """The smoothed eigenvalue density of H by stochastic Lanczos quadrature.

    The density φ(t) = (1/n) Σᵢ δ(t − λᵢ) is estimated from ``num_probes`` Rademacher
    vectors z: ``num_iters`` Lanczos steps from z/‖z‖ give a tridiagonal T = YΘYᵀ, and
    the Gauss quadrature rule with nodes θⱼ and weights (Y₀ⱼ)² integrates polynomials of
    degree < 2·num_iters against zᵀδ(t − H)z/‖z‖² exactly. Averaging the rules over probes
    and smoothing each node with a Gaussian of standard deviation σ gives the density:

    .. math:: \\hat\\phi(t) = \\frac{1}{P} \\sum_{p=1}^{P} \\sum_j w_{pj}\\,
              \\mathcal{N}(t;\\, \\theta_{pj}, \\sigma^2)

    Each probe's Lanczos run uses full reorthogonalization, and the probes of one chunk
    run together: one ``vmap`` over the matvec per step, batched Gram–Schmidt.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``like``; H symmetric.
        like: a tree giving the vectors' structure (the params).
        num_probes: random probes P (PyHessian uses 1; more lowers the variance).
        num_iters: Lanczos steps per probe (80–100 is the usual choice for network
            Hessians, Ghorbani et al. 2019); capped at the dimension.
        generator: draws the probes; ``None`` uses PyTorch's global generator.
        sigma: standard deviation of the smoothing Gaussian. Default: PyHessian's
            convention, variance 1e-5 · max(1, λ̂_max − λ̂_min) over the nodes that
            carry weight.
        num_points: grid points; the grid spans the nodes plus 5σ on each side.
        chunk_size: probes run together (memory: chunk_size · num_iters
            parameter-sized vectors); ``1`` runs them one by one without ``vmap``;
            ``None`` all together; ``"auto"`` (default) 16 on a GPU, 1 on a CPU.
        progress: ``True`` for a progress bar, or a callable ``progress(step)``.

    Returns:
        :class:`~hvpfunc.SpectralDensity` with ``grid``, ``density`` (normalized so its
        trapezoidal integral over the grid is exactly one), ``nodes`` and ``weights``
        (shape ``(num_probes, num_iters)``, each row of weights summing to one),
        ``sigma``, ``num_matvecs``.

    Raises:
        ValueError: non-positive ``num_probes``, ``num_iters``, ``num_points`` or ``sigma``;
            a product that is not finite; a matvec that is not symmetric.

    References:
        Lin, Saad & Yang, "Approximating spectral densities of large matrices",
        SIAM Review 58 (2016); Ghorbani, Krishnan & Xiao, "An investigation into neural
        net optimization via Hessian eigenvalue density", ICML (2019); Yao et al.,
        "PyHessian", IEEE BigData (2020).
    """
    for name, value in (("num_probes", num_probes), ("num_iters", num_iters), ("num_points", num_points)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    op = _Operator(matvec, like, name="like")
    steps = min(num_iters, op.n)
    chunk_size = _resolve_chunk(chunk_size, op.device)
    chunk = num_probes if chunk_size is None else chunk_size
    nodes, weights = [], []
    bar = _Progress(progress, total=num_probes * steps, desc="spectral density")
    try:
        for start in range(0, num_probes, chunk):
            probes = op.probes(min(chunk, num_probes - start), generator)
            T = _tridiagonalize(op, probes, steps, chunk_size, bar)
            theta, Y = torch.linalg.eigh(T)
            nodes.append(theta)
            weights.append(Y[:, 0, :] ** 2)
    finally:
        bar.close()
    nodes_t = torch.cat(nodes)
    weights_t = torch.cat(weights)
    if not bool(torch.isfinite(nodes_t).all()):
        raise ValueError("spectral_density: a product was not finite; the operator returned nan or inf")
    # Probes whose Krylov space became invariant carry padding nodes of zero weight;
    # they must not stretch the grid.
    carried = nodes_t[weights_t > 1e-12 * float(weights_t.max())]
    lo, hi = float(carried.min()), float(carried.max())
    if sigma is None:
        sigma = math.sqrt(1e-5 * max(1.0, hi - lo))
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None] - nodes_t.reshape(-1)[None, :]) / sigma) ** 2)
    density = gauss @ weights_t.reshape(-1) / (num_probes * sigma * math.sqrt(2 * math.pi))
    if num_points > 1:
        density = density / torch.trapezoid(density, grid)
    return SpectralDensity(
        grid=grid.to(op.device, op.dtype),
        density=density.to(op.device, op.dtype),
        nodes=nodes_t.to(op.device, op.dtype),
        weights=weights_t.to(op.device, op.dtype),
        sigma=float(sigma),
        num_matvecs=op.num_matvecs,
    )


def _tridiagonalize(
    op: _Operator, Z: Tensor, steps: int, chunk_size: ChunkSize, bar: _Progress
) -> Tensor:
    """Lanczos with full reorthogonalization from each row of Z at once.

    Returns the projected matrices T of shape ``(len(Z), steps, steps)`` (float64, CPU).
    A probe whose Krylov space becomes invariant continues with zero vectors, which adds
    zero rows and columns to its T: nodes with zero weight, so the quadrature is intact.
    """
    b, n = Z.shape
    eps = torch.finfo(op.dtype).eps
    Q = torch.zeros(b, steps, n, dtype=op.dtype, device=op.device)
    alpha = torch.zeros(b, steps, dtype=torch.float64)
    beta = torch.zeros(b, steps, dtype=torch.float64)
    q = Z / torch.linalg.vector_norm(Z, dim=1, keepdim=True)
    scale = torch.zeros(b, dtype=op.dtype, device=op.device)
    slack = 10 * math.sqrt(op.layout.product_eps)
    for j in range(steps):
        Q[:, j] = q
        w = op.batch(q, chunk_size=b if chunk_size is None else chunk_size)
        w, h = _orthogonalize(Q[:, : j + 1], w)
        norms = torch.linalg.vector_norm(w, dim=1)
        scale = torch.maximum(scale, h.abs().max(dim=1).values)
        if j > 0:  # ⟨q_{j-1}, H q_j⟩ must equal β_{j-1} = ⟨H q_{j-1}, q_j⟩ for symmetric H
            forward = h[:, j - 1].to("cpu", torch.float64)
            gap = (forward - beta[:, j - 1]).abs()
            bad = gap > slack * scale.to("cpu", torch.float64)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(_asymmetry_message(float(forward[i]), float(beta[i, j - 1])))
        alive = norms > 100 * eps * scale
        alpha[:, j] = h[:, j].to("cpu", torch.float64)
        beta[:, j] = torch.where(alive, norms, 0).to("cpu", torch.float64)
        q = torch.where(alive[:, None], w / norms.clamp_min(torch.finfo(op.dtype).tiny)[:, None], 0)
        bar.update(steps=b)
    return torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
