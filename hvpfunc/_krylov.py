"""The Krylov kernel shared by Lanczos and stochastic Lanczos quadrature.

One expansion step of an orthonormal basis (full reorthogonalization: classical
Gram–Schmidt twice, as matrix products; for a Lanczos basis, the three-term step and
one pass) and the free symmetry check that the three-term structure gives. Everything
works batched: a basis ``V`` of shape ``(..., j, n)`` with products ``w`` of shape ``(..., n)``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from ._operator import Operator, norm, total


def empty_basis(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Uninitialized rows for a Krylov basis, from torch's allocator in its default pages.

    Not transparent huge pages (numpy's allocator advises them for 4 MB and more, where
    an earlier version took host bases from): a basis is written a row per step into
    memory glibc maps afresh for each call, and on the virtual machines the benchmarks
    run on a 2 MB page's first touch often waits for the hypervisor to back it. Writing
    28 rows of the 400k-parameter MLP's basis took 71-82 ms in a fresh process and
    28-30 ms on average after it in huge pages, 12-15 ms and 15-16 ms in 4 kB ones; that
    MLP's top-eigenvalue job (tol 1e-2) 178-213 ms against 166-197 ms at the median and
    194-236 ms against 170-201 ms on average (16 rounds, alternating in one process). On
    the host where huge pages were first measured they saved 5-7% of that job at the
    median and cost 31% at the 90th percentile.
    """
    return torch.empty(tuple(shape), dtype=dtype, device=device)


def orthogonalize(V: Tensor, w: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """Project w off the rows of V twice (classical Gram–Schmidt, "twice is enough").

    Returns the projected w and the coefficients Vᵀw of both passes summed, shape
    ``(..., j)``. With ``allsum`` (sharded vectors) each pass's coefficients are
    completed over the ranks: one all-reduce per pass.

    Reference: Giraud, Langou & Rozložník, "The loss of orthogonality in the
    Gram–Schmidt orthogonalization process", Comput. Math. Appl. 50 (2005).
    """
    if V.dim() == 2:
        # matrix-vector kernels, the second pass in place: on a 400k-vector CPU basis the
        # (1 × j) @ (j × n) products and their fresh outputs cost 8x more for j = 2
        h = total(torch.mv(V, w), allsum)
        w = torch.addmv(w, V.T, h, alpha=-1)
        h2 = total(torch.mv(V, w), allsum)
        w.addmv_(V.T, h2, alpha=-1)
        return w, h + h2
    h = total((V @ w.unsqueeze(-1)).squeeze(-1), allsum)
    w = w - (h.unsqueeze(-2) @ V).squeeze(-2)
    h2 = total((V @ w.unsqueeze(-1)).squeeze(-1), allsum)
    w = w - (h2.unsqueeze(-2) @ V).squeeze(-2)
    return w, h + h2


def expand(V: Tensor, w: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """One Lanczos expansion: ``w = H v_last`` orthogonalized against the basis ``V``.

    Returns ``(w, h, beta)``: the new direction (not normalized), the projected
    matrix's new column h = Vᵀ H v_last (shape ``(..., j)``), and β = ‖w‖ (shape
    ``(...)``). The next basis vector is w / β unless β is at rounding level (the
    Krylov space became invariant). ``allsum`` as in :func:`orthogonalize`.
    """
    w, h = orthogonalize(V, w, allsum)
    return w, h, norm(w, allsum)


# One step's rounding, in units of ε‖H‖/β, seeding Simon's estimates. PROPACK and SLEPc
# take the worst case of an n-term inner product, √n ε / 2, which in float32 on a
# 400k-parameter network (1e-4 ε) left nearly no room below √ε and reorthogonalized every
# step, while the measured loss after a local step was 1–5 ε: blocked summation makes
# rounding grow like log n, not √n. 10 keeps a margin over what was measured.
STEP_ROUNDING = 10.0

# A second Gram–Schmidt pass follows where the first removed more than this share of w's
# norm (Daniel, Gragg, Kaufman & Stewart's criterion, 1/√2).
_SECOND_PASS = 1 / math.sqrt(2)


def lanczos_step(
    V: Tensor, w: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`expand` for a Lanczos basis, at half its passes over V.

    ``w = H v_last`` couples only to the last two rows of a Lanczos basis, so the
    three-term step (against those two) leaves w orthogonal to the rest up to the basis'
    own loss of orthogonality, which full reorthogonalization keeps at rounding level.
    One classical Gram–Schmidt pass against the whole basis then removes what is left
    (:func:`reorthogonalize`). ``expand`` orthogonalizes twice against everything: four
    passes over a basis whose reading costs more than the product on a large model (SLQ
    on a 400k-parameter MLP: 8.7 ms per step against 3 ms for the product, at 90 steps).

    Returns ``(w, h, beta)`` as :func:`expand` does: h = Vᵀ H v_last, shape ``(..., j)``.
    """
    j = V.shape[-2]
    w, c = three_term(V[..., max(j - 2, 0) :, :], w, allsum)
    w, d, beta = reorthogonalize(V, w, allsum, norm(w, allsum))
    d[..., max(j - 2, 0) :] += c
    return w, d, beta


def three_term(pair: Tensor, w: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None) -> Tuple[Tensor, Tensor]:
    """w projected off the (at most two) rows of ``pair`` in one pass: the Lanczos
    recurrence's step, with its coefficients ⟨v_{j-1}, w⟩, ⟨v_j, w⟩ (Paige's form).
    w (a product the caller owns) is projected in place: a fresh vector per step is
    memory the allocator may map afresh, and page faults cost more than the step."""
    if pair.dim() == 3 and pair.shape[0] == 1:  # one probe: the matrix-vector kernels
        w0, c = three_term(pair[0], w[0], allsum)
        return w0[None], c[None]
    if pair.dim() == 2:
        c = total(torch.mv(pair, w), allsum)
        return w.addmv_(pair.T, c, alpha=-1), c
    c = total((pair @ w.unsqueeze(-1)).squeeze(-1), allsum)
    return w.sub_((c.unsqueeze(-2) @ pair).squeeze(-2)), c


def cancelled(coefficients: np.ndarray, beta: np.ndarray, eps: float, level: float) -> np.ndarray:
    """Whether a three-term step (:func:`three_term`) must be repeated: its one pass
    leaves w off the pair by about ε‖Hv_j‖/β_j, β_j = ‖w‖ (‖Hv_j‖² = β_j² + Σ c², the
    coefficients), and the next step carries that into the older vectors multiplied by
    up to ‖H‖/β_j, past Simon's estimate, which takes the pair as orthogonal to rounding.
    So a second pass is due where ε (‖Hv_j‖/β_j)² exceeds ``level``, the loss of
    orthogonality allowed. Never on the benchmark networks (‖Hv_j‖/β_j of a few); on
    H = 5I + O(10⁻⁶) it is 10⁶–10⁸, and without the second pass Lanczos' Ritz values were
    10⁻⁷ off with residuals of 10⁻²² and SLQ raised "the matvec is not symmetric" on a
    symmetric matrix. ``coefficients``: (..., 2) on the host, ``beta``: (...)."""
    squared = np.square(beta)
    return eps * (np.square(coefficients).sum(axis=-1) + squared) > level * squared


def reorthogonalize(
    V: Tensor, w: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None, before: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Tensor]:
    """w, nearly orthogonal to the rows of V already, projected off them: one classical
    Gram–Schmidt pass, and a second where the first removed more than 1 − 1/√2 of w's
    norm ``before`` (cancellation; Daniel, Gragg, Kaufman & Stewart, Math. Comp. 30,
    1976). Returns ``(w, coefficients summed over the passes, ‖w‖)``; a single w (no
    batch) is projected in place."""
    if V.dim() == 3 and V.shape[0] == 1:
        w, d, beta = reorthogonalize(V[0], w[0], allsum, None if before is None else before[0])
        return w[None], d[None], beta[None]
    before = norm(w, allsum) if before is None else before
    total_d = None
    for _ in range(2):
        if V.dim() == 2:
            d = total(torch.mv(V, w), allsum)
            w.addmv_(V.T, d, alpha=-1)
        else:
            d = total((V @ w.unsqueeze(-1)).squeeze(-1), allsum)
            w = w - (d.unsqueeze(-2) @ V).squeeze(-2)
        total_d = d if total_d is None else total_d + d
        beta = norm(w, allsum)
        if not bool((beta < _SECOND_PASS * before).any()):
            break
        before = beta
    return w, total_d, beta


def step_rounding(op: Operator) -> float:
    """One step's rounding relative to ‖H‖, ``STEP_ROUNDING · ε``, with ε that of the less
    precise of the vectors and the products: the loss of orthogonality a step may cause
    (Simon's estimates) and the floor of a reported eigenvalue error."""
    return STEP_ROUNDING * max(torch.finfo(op.dtype).eps, op.layout.product_eps)


def symmetry_slack(product_eps: float) -> float:
    """Relative gap allowed between ⟨v_{j-1}, H v_j⟩ and β_{j-1}: well above the
    products' rounding (they may be computed in a lower precision than the basis)."""
    return 10 * math.sqrt(product_eps)


def check_symmetric(forward: np.ndarray, backward: np.ndarray, scale: np.ndarray, slack: float) -> None:
    """Raise unless ⟨v_{j-1}, H v_j⟩ (``forward``) equals β_{j-1} = ⟨H v_{j-1}, v_j⟩
    (``backward``) up to ``slack · scale``: the three-term recurrence gives this check
    for free, and a non-symmetric matvec makes every eigenvalue wrong."""
    gap = np.abs(np.asarray(forward) - np.asarray(backward))
    bad = np.atleast_1d(gap > slack * np.asarray(scale))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        f, b = np.atleast_1d(forward)[i], np.atleast_1d(backward)[i]
        relative = float(np.atleast_1d(gap)[i] / np.atleast_1d(scale)[i])
        raise ValueError(
            f"the matvec is not symmetric: for consecutive Lanczos vectors, <v_j-1, H v_j> = "
            f"{f:.6g} but <H v_j-1, v_j> = {b:.6g}. Lanczos, power iteration, CG and SLQ "
            "need a symmetric operator (check it with hvpfunc.testing.assert_symmetric)."
            + _low_precision_hint(relative, slack)
        )


def _low_precision_hint(relative: float, slack: float) -> str:
    """What to do when the gap is no larger than one bfloat16 rounding of the operator's
    norm and the check assumed finer products: a matvec that computes in a lower
    precision than its vectors (a bfloat16 model behind float32 vectors, a float32 one
    behind float64) looks asymmetric at the vectors' slack."""
    half = torch.finfo(torch.bfloat16).eps
    if relative >= half or slack >= symmetry_slack(half):
        return ""
    return (
        f" The gap, {relative:.1e} of the operator's norm, is within the rounding of low-precision products: "
        "if the matvec computes in a lower precision than its vectors (a bfloat16 model behind float32 "
        "vectors, say), give it vectors of its own precision: the solvers still work in float32, and their "
        "checks then allow for that rounding."
    )


def orthogonality_estimate(
    alpha: np.ndarray, beta: np.ndarray, beta_j: np.ndarray, previous: np.ndarray, current: np.ndarray,
    j: int, source: np.ndarray,
) -> np.ndarray:
    """Simon's estimates of q_kᵀq_{j+1}, k ≤ j, for plain Lanczos runs (one per row):
    β_j ω_{j+1,k} = β_k ω_{j,k+1} + (α_k − α_j) ω_{j,k} + β_{k−1} ω_{j,k−1} − β_{j−1} ω_{j−1,k},
    plus one step's rounding with the sign that makes it larger (Simon 1984; Larsen's
    PROPACK). q_{j-1} and q_j are orthogonalized against explicitly: rounding level.
    ``alpha``, ``beta``: the runs' T so far (β_k couples q_k and q_{k+1}); ``beta_j``:
    this step's norm; ``previous``, ``current``: the estimates for q_{j-1} and q_j;
    ``source``: one step's rounding, ``STEP_ROUNDING · ε · ‖H‖``-sized, per run. Returns
    the estimates for q_{j+1} (1 at index j + 1)."""
    out = np.zeros_like(current)
    out[:, j + 1] = 1.0
    out[:, max(j - 1, 0) : j + 1] = source[:, None] / np.where(beta_j > 0, beta_j, np.inf)[:, None]
    if j >= 2:
        k = np.arange(j - 1)
        below = np.where(k > 0, beta[:, np.maximum(k - 1, 0)] * current[:, np.maximum(k - 1, 0)], 0.0)
        sums = (beta[:, k] * current[:, k + 1] + (alpha[:, k] - alpha[:, j : j + 1]) * current[:, k] + below
                - beta[:, j - 1 : j] * previous[:, k])
        with np.errstate(divide="ignore", invalid="ignore"):
            values = (sums + np.copysign(source[:, None], sums)) / beta_j[:, None]
        out[:, k] = np.where(np.isfinite(values), values, np.inf)
    return out
