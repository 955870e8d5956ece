"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ)."""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from .._krylov import (
    cancelled,
    check_symmetric,
    empty_basis,
    orthogonality_estimate,
    reorthogonalize,
    step_rounding,
    symmetry_slack,
    three_term,
)
from .._operator import Operator, check_count, norm
from .._outcome import finish, probes_outcome
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import ChunkSize, MatvecFn, ProgressArg, Tree
from ..results import SpectralDensity


@in_plain_autograd
def spectral_density(
    matvec: MatvecFn,
    like: Tree,
    *,
    num_probes: int = 10,
    num_iters: int = 90,
    generator: Optional[torch.Generator] = None,
    sigma: Optional[float] = None,
    num_points: int = 2000,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> SpectralDensity:
    """The smoothed eigenvalue density of H by stochastic Lanczos quadrature.

    The density φ(t) = (1/n) Σᵢ δ(t − λᵢ) is estimated from ``num_probes`` Rademacher
    vectors z: ``num_iters`` Lanczos steps from z/‖z‖ give a tridiagonal T = YΘYᵀ, and
    the Gauss quadrature rule with nodes θⱼ and weights (Y₀ⱼ)² integrates polynomials of
    degree < 2·num_iters against zᵀδ(t − H)z/‖z‖² exactly. Averaging the rules over probes
    and smoothing each node with a Gaussian of standard deviation σ gives the density:

    .. math:: \\hat\\phi(t) = \\frac{1}{P} \\sum_{p=1}^{P} \\sum_j w_{pj}\\,
              \\mathcal{N}(t;\\, \\theta_{pj}, \\sigma^2)

    Each probe's Lanczos basis is kept semi-orthogonal (partial reorthogonalization,
    Simon 1984): its nodes are those of a fully orthogonal basis to rounding, with no
    ghost copies of converged eigenvalues, while the whole basis is read only on the
    steps where the loss of orthogonality nears √ε (5 of 90 on a 400k-parameter MLP's
    Hessian, where reading it every step cost 2.5x the products). The probes of one
    chunk run together: one ``vmap`` over the matvec per step, batched Gram–Schmidt.

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
        ``sigma``, ``num_matvecs``, and ``status``: ``"converged"``, or ``"non_finite"``
        when a product was nan or inf (then the density comes from the probes whose
        products were all finite, and a :class:`~hvpfunc.ConvergenceWarning` is issued).

    Raises:
        ValueError: non-positive ``num_probes``, ``num_iters``, ``num_points`` or ``sigma``;
            a matvec that is not symmetric.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.cat([torch.zeros(50), torch.ones(50)]).double())
        >>> res = hf.spectral_density(lambda v: H @ v, torch.zeros(100, dtype=torch.float64),
        ...                           num_probes=4, num_iters=10, generator=torch.Generator().manual_seed(0))
        >>> res.nodes.shape, res.status           # two distinct eigenvalues: two nodes carry weight
        (torch.Size([4, 10]), <Status.CONVERGED: 'converged'>)

    References:
        Lin, Saad & Yang, "Approximating spectral densities of large matrices",
        SIAM Review 58 (2016); Simon, "The Lanczos algorithm with partial
        reorthogonalization", Math. Comp. 42 (1984); Ghorbani, Krishnan & Xiao, "An investigation into neural
        net optimization via Hessian eigenvalue density", ICML (2019); Yao et al.,
        "PyHessian", IEEE BigData (2020).
    """
    num_probes, num_iters, num_points = (check_count(num_probes, "num_probes"), check_count(num_iters, "num_iters"),
                                         check_count(num_points, "num_points"))
    for name, value in (("num_probes", num_probes), ("num_iters", num_iters), ("num_points", num_points)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    op = Operator(matvec, like, name="like")
    steps = min(num_iters, op.n)
    op.expect(num_probes * steps)
    chunk_size = op.resolve_chunk(chunk_size)
    chunk = num_probes if chunk_size is None else chunk_size
    nodes, weights = [], []
    bar = Progress(progress, total=num_probes * steps, desc="spectral density")
    try:
        for start in range(0, num_probes, chunk):
            probes = op.probes(min(chunk, num_probes - start), generator)
            T = _tridiagonalize(op, probes, steps, chunk_size, bar)
            finite = torch.isfinite(T).all(dim=(1, 2))
            theta, Y = torch.linalg.eigh(torch.where(finite[:, None, None], T, 0.0))
            nodes.append(theta[finite])
            weights.append(Y[finite, 0, :] ** 2)
            if not bool(finite.all()):
                break  # no more products on an operator that returns nan or inf
    finally:
        bar.close()
    nodes_t = torch.cat(nodes)
    weights_t = torch.cat(weights)
    status, message = probes_outcome(nodes_t.shape[0] == num_probes, nodes_t.shape[0], num_probes, "the density")
    if nodes_t.shape[0] == 0:
        nan = torch.full((num_points,), math.nan, dtype=op.dtype, device=op.device)
        result = SpectralDensity(nan, nan, nodes_t.to(op.device, op.dtype), weights_t.to(op.device, op.dtype),
                                 math.nan if sigma is None else float(sigma), op.num_matvecs, status, message)
        return finish(result, "spectral_density")
    # Probes whose Krylov space became invariant carry padding nodes of zero weight;
    # they must not stretch the grid.
    carried = nodes_t[weights_t > 1e-12 * float(weights_t.max())]
    lo, hi = float(carried.min()), float(carried.max())
    if sigma is None:
        sigma = math.sqrt(1e-5 * max(1.0, hi - lo))
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    gauss = torch.exp(-0.5 * ((grid[:, None] - nodes_t.reshape(-1)[None, :]) / sigma) ** 2)
    density = gauss @ weights_t.reshape(-1) / (nodes_t.shape[0] * sigma * math.sqrt(2 * math.pi))
    if num_points > 1:
        density = density / torch.trapezoid(density, grid)
    result = SpectralDensity(
        grid=grid.to(op.device, op.dtype),
        density=density.to(op.device, op.dtype),
        nodes=nodes_t.to(op.device, op.dtype),
        weights=weights_t.to(op.device, op.dtype),
        sigma=float(sigma),
        num_matvecs=op.num_matvecs,
        status=status,
        message=message,
    )
    return finish(result, "spectral_density")


def _tridiagonalize(
    op: Operator, Z: Tensor, steps: int, chunk_size: ChunkSize, bar: Progress
) -> Tensor:
    """Lanczos with partial reorthogonalization from each row of Z at once.

    Each step orthogonalizes H q_j against q_{j-1} and q_j (the three-term recurrence)
    and follows the loss of orthogonality against the older vectors with Simon's
    recurrence (scalars only); where it passes √ε, the new vector and the next are
    orthogonalized against the whole basis (one Gram–Schmidt pass, see
    :func:`~hvpfunc._krylov.reorthogonalize`). A semi-orthogonal basis gives the Ritz
    values, and so the quadrature's nodes, of a fully orthogonal one to rounding, without
    the ghost copies of converged eigenvalues that plain Lanczos makes (Simon 1984), at a
    fraction of the passes over the basis (on a 400k-parameter MLP reading a 90-vector
    basis twice per step cost 2.5x the product).

    Returns the projected matrices T of shape ``(len(Z), steps, steps)`` (float64, CPU).
    A probe whose Krylov space becomes invariant continues with zero vectors, which adds
    zero rows and columns to its T: nodes with zero weight, so the quadrature is intact.
    A probe whose product is not finite gets a non-finite T, and the run stops there.
    """
    b, n = Z.shape
    eps = torch.finfo(op.dtype).eps
    rounding = step_rounding(op)
    Q = empty_basis((b, steps, n), op.dtype, op.device)  # row j is written before it is read
    alpha = np.zeros((b, steps))
    beta = np.zeros((b, steps))
    # Simon's estimates, per probe, of q_kᵀq_{j-1} (previous) and q_kᵀq_j (current) at step j
    previous, current = np.zeros((b, steps + 1)), np.zeros((b, steps + 1))
    torch.div(Z, norm(Z, op.allsum, dim=1, keepdim=True), out=Q[:, 0])
    # the products go into one buffer, projected and normalized into Q's next row in
    # place: fresh vectors per step were memory the allocator mapped afresh (page faults
    # for each, 0.4 ms a 400k-parameter vector on a 2-core VM, a tenth of its product)
    W = torch.empty(b, n, dtype=op.dtype, device=op.device)
    scale = np.zeros(b)
    slack = symmetry_slack(op.layout.product_eps)
    again = False  # Simon: the vector after a reorthogonalized one is reorthogonalized too
    for j in range(steps):
        w = op.batch(Q[:, j], chunk_size=b if chunk_size is None else chunk_size, out=W)
        w, c = three_term(Q[:, max(j - 1, 0) : j + 1], w, op.allsum)
        norms = norm(w, op.allsum, dim=-1)
        host = torch.cat([c, norms[:, None]], dim=1).to("cpu", torch.float64).numpy()
        if cancelled(host[:, :-1], host[:, -1], eps, math.sqrt(eps)).any():  # all probes: one batched pass
            w, again_c = three_term(Q[:, max(j - 1, 0) : j + 1], w, op.allsum)
            c, norms = c + again_c, norm(w, op.allsum, dim=-1)
            host = torch.cat([c, norms[:, None]], dim=1).to("cpu", torch.float64).numpy()
        finite = np.isfinite(host).all(axis=1)
        if not finite.all():
            alpha[:, j] = np.where(finite, host[:, -2], math.nan)
            bar.update(steps=b)
            break
        alpha[:, j] = host[:, -2]
        scale = np.maximum(scale, np.abs(host[:, :-1]).max(axis=1))
        if j > 0:  # ⟨q_{j-1}, H q_j⟩ must equal β_{j-1} = ⟨H q_{j-1}, q_j⟩ for symmetric H
            check_symmetric(host[:, 0], beta[:, j - 1], scale, slack)
        estimate = orthogonality_estimate(alpha, beta, host[:, -1], previous, current, j, rounding * scale)
        # a probe whose Krylov space closed (β_j at rounding) continues with zero vectors
        estimate[host[:, -1] <= 100 * eps * scale, : j + 1] = 0.0
        norms_host = host[:, -1]
        if j >= 2 and (again or np.abs(estimate[:, : j - 1]).max() > math.sqrt(eps)):
            w, _, norms = reorthogonalize(Q[:, : j + 1], w, op.allsum, norms)
            norms_host = norms.to("cpu", torch.float64).numpy()
            estimate[:, : j + 1] = rounding
            again = not again
        previous, current = current, estimate
        alive = norms_host > 100 * eps * scale
        beta[:, j] = np.where(alive, norms_host, 0.0)
        if j + 1 < steps:
            q = torch.div(w, norms.clamp_min(torch.finfo(op.dtype).tiny)[:, None], out=Q[:, j + 1])
            if not alive.all():
                q[torch.as_tensor(~alive, device=op.device)] = 0.0
        bar.update(steps=b)
    T = np.zeros((b, steps, steps))
    index = np.arange(steps)
    T[:, index, index] = alpha
    T[:, index[1:], index[:-1]] = T[:, index[:-1], index[1:]] = beta[:, :-1]
    return torch.from_numpy(T)

