"""Thick-restart Lanczos with partial reorthogonalization for k extreme eigenpairs."""

from __future__ import annotations

import math
import numbers
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, NamedTuple, Optional, Tuple, Union, get_args

import numpy as np
import torch
from torch import Tensor

from .._krylov import (
    cancelled,
    check_symmetric,
    empty_basis,
    expand,
    lanczos_step,
    orthogonalize,
    reorthogonalize,
    step_rounding,
    symmetry_slack,
    three_term,
)
from .._operator import Operator, check_count, check_start, eigen_tol, norm, total
from .._outcome import finish
from .._precision import deterministic, in_plain_autograd
from .._progress import Progress
from .._sharding import rank_generator
from .._types import MatvecFn, ProgressArg, Tree, Which
from ..results import EigResult, Status
from .block import block_lanczos
from .ritz import eigh, eigvalsh, select

_WHICH = get_args(Which)


@in_plain_autograd
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
    find_copies: Optional[bool] = None,
    basis_device: Optional[Union[str, torch.device]] = None,
    basis_dtype: Optional[torch.dtype] = None,
    block_size: int = 1,
) -> EigResult:
    """The k extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Lanczos builds an orthonormal basis V of the Krylov space span{v0, Hv0, H²v0, ...};
    the eigenpairs (θ, y) of the small projected matrix T = VᵀHV give Ritz pairs
    (θ, Vy) whose residual is ‖H Vy − θ Vy‖ = β |y_last|, known without extra products.
    Plain three-term Lanczos loses orthogonality as Ritz pairs converge and then
    produces spurious "ghost" copies of them; orthogonalizing every new vector against
    the whole basis prevents that but costs O(basis · n) per step, which on a large model
    rivals the product itself. Instead each step orthogonalizes against its two
    predecessors and follows the loss of orthogonality with Simon's recurrence
    (scalars only); when it passes √ε (or a tenth of the smallest residual the stopping
    test needs, relative to ‖H‖, if lower: tol·|θ| for ``stop="residual"``, about
    √(tol·|θ|·gap) for ``stop="eigenvalue"``) the new vector and the next are
    orthogonalized against the whole basis (one classical Gram–Schmidt pass). The basis
    stays semi-orthogonal,
    which keeps the Ritz values accurate to rounding (Simon 1984).
    When the basis holds ``max_basis`` vectors it is restarted (Wu & Simon): it keeps
    the residual direction and the Ritz vectors that make the next cycle fastest by
    Chebyshev's bound (at least ``k + (max_basis − k) // 3`` at the wanted end, and
    outliers at the other end, which would otherwise slow every cycle; Yamazaki et al.
    2010), so memory stays at ``max_basis + 1`` parameter-sized vectors however long
    the run.

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
    the eigenvectors are then only about sqrt(tol) accurate. The gap is an estimate: the
    distance to the nearest other Ritz value θ_j, less its residual r_j (an eigenvalue
    lies within r_j of θ_j, and a Ritz value still moving would otherwise overstate the
    gap). It cannot see an eigenvalue that the run has not yet separated from θ's own
    (a mixture of two close eigenvectors has a small residual and a wide apparent gap).
    With k ≥ 2 the copy check (below) looks for such eigenvalues; with k = 1 nothing
    does, and the result's ``message`` says so. On a spectrum whose top is a dense bulk
    (80 eigenvalues uniform in [−1, 1], k = 1, tol 1e-3, 200 random problems) 6% of
    runs stopped more than 2·tol off λ₁ (13% with the plain Ritz gap), against 1% with
    ``stop="residual"``, whose miss is any Krylov method's (the start vector's component
    along λ₁'s eigenvector was tiny) and 0 of 150 with k = 2. On network Hessians, whose
    top eigenvalues are outliers, the bound held on every test and job. From a start
    vector close to an eigenvector a run of two or three steps can stop at that
    eigenvector's eigenvalue, whatever ``which`` asks (the residual stop took seven).

    A Krylov space holds one vector per distinct eigenvalue, so a single Lanczos
    sequence cannot see that an eigenvalue is repeated (the Hessian of every softmax
    classifier has a null space of dimension at least the classes; symmetric networks
    have repeated outliers). With ``find_copies`` (by default for k ≥ 2) Lanczos runs
    again on (I − UUᵀ) H (I − UUᵀ) from a fresh random vector drawn from ``generator``,
    U's rows spanning the pairs found (as ARPACK locks converged pairs) and, with the
    default ``max_basis`` where memory's share holds them, the first run's other Ritz
    vectors that are resolved enough to hide no missed eigenvalue, until its best pair
    meets the residual tolerance beyond the k-th eigenvalue (or as a copy of it, within
    the tolerance), or a probabilistic bound (Hochstenbach 2013, from the Lanczos
    polynomial) shows that, with probability at least 1 − 10⁻² over the fresh vector,
    that operator has nothing beyond the k-th eigenvalue by more than the tolerance (a
    pair converged short of it does not end the check; one that ends it as a copy of the
    k-th is followed, once, by a run from another fresh vector). Deflating the
    resolved neighbours of the k-th eigenvalue makes the check short (on ARPACK's
    clustered spectrum, k = 5 smallest, at the miss probability 10⁻³: 37 products where
    deflating the 5 pairs alone took 95; 27–29 now). The check also finds eigenvalues
    the first run reached but had not resolved (inside a cluster, at a loose ``tol``).
    A better pair found takes the place
    of the k-th, its residual measured in H with one product, and the check runs
    again. The same check runs for any k when the start vector lay in an invariant
    subspace (an eigenvector, say); the pairs found are then what is deflated. With
    ``find_copies=False`` a run with k ≥ 2 stops at the first convergence and its
    ``message`` says that missed eigenvalues were not ruled out: copies, and at a loose
    ``tol`` also distinct ones (on the jobs benchmark's MLP, k = 5 at tol 1e-3, the fifth
    returned was the sixth eigenvalue; the check found the missed 0.6575).

    Args:
        matvec: ``v -> H v`` on trees shaped like ``v0``; H must be symmetric.
        v0: start vector, a nonzero finite tree (random is best).
        k: number of eigenpairs, 1 ≤ k ≤ dimension.
        which: ``"LA"`` largest algebraic (default), ``"SA"`` smallest algebraic,
            ``"LM"`` largest magnitude.
        tol: relative residual tolerance.
        max_iters: most products; default ``max(1000, 20 k)``.
        max_basis: basis size before a restart; default: ``max(2k + 1, 20)``
            (ARPACK's ``ncv`` in scipy), doubled when full while a step's cost beyond
            its product stays under half a product's, up to as many vectors as fit in
            10% of the device's free memory, at most ``max(100, 2k + 1)`` and the
            dimension (a larger basis restarts less, but orthogonalizing against it
            costs more per step). As timings and free memory vary from run to run, so
            may the products spent and the last bits of the answer, except under
            ``torch.use_deterministic_algorithms(True)``: the basis then doubles
            whenever full, up to 10% of the device's total memory (pass ``max_basis``
            where less is free). At least ``k + 2`` unless it equals the dimension.
            ``EigResult.basis_size`` says how many vectors were held.
        generator: draws the fresh vectors of the copy check and of continuations after
            an invariant subspace; default a CPU generator seeded with 0, so results
            are reproducible. A draw within 60° of the start vector (a start drawn
            from the same seed) is drawn again.
        progress: ``True`` for a progress bar, or a callable
            ``progress(step, largest_unconverged_residual)``.
        stop: ``"residual"`` (default) or ``"eigenvalue"``: what ``tol`` bounds (above).
        find_copies: check for further copies of the k eigenvalues found (above).
            ``None`` (default): for k ≥ 2. ``True`` checks for k = 1 too, where no copy
            changes the value but a start vector that is not random (a warm start from
            earlier eigenvectors) can miss the top eigenvalue: the check rules that out
            with probability 1 − 10⁻² over its fresh vector, at the cost of about a
            cold run's products.
        basis_device: where the basis is held (default: the vectors' device). ``"cpu"``
            keeps a GPU model's basis in host memory: each step then moves one vector
            to the GPU for the product and the product back, and orthogonalizes on the
            host; the default basis size follows the host's free memory.
        block_size: vectors per step (default 1). Above 1, block Lanczos: each step's
            products go through one ``vmap`` call (one pass of a GPU's kernels for the
            block, or one collective per block for a data-parallel matvec), the basis
            is fully reorthogonalized, and up to ``block_size`` copies of a repeated
            eigenvalue are found by the block itself (``find_copies`` runs the copy
            check after it for more). It does not reduce products (it usually takes
            more), so it pays only where a batched product costs much less than
            ``block_size`` single ones. Its default basis holds at least ``block_size``
            times the single-vector floor, max(2k + 1, 20), even where memory binds
            (with fewer it restarts after a few blocks and takes up to 7x the products).
            Not with ``stop="eigenvalue"``, ``basis_device``/``basis_dtype`` or sharded
            vectors.
        basis_dtype: the basis' precision (default: the vectors'), at least theirs:
            float64 for a float32 model orthogonalizes in double precision (products
            stay float32). A less precise basis is refused: with a bfloat16 basis the
            Ritz values stopped 75% off their eigenvalues while their residuals met
            every tolerance its rounding allows; to save device memory, hold the basis
            on the host instead.

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
        Lanczos (1950); Simon, "The Lanczos algorithm with partial reorthogonalization",
        Math. Comp. 42 (1984); Wu & Simon, "Thick-restart Lanczos method for large
        symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22 (2000); Yamazaki, Bai,
        Simon, Wang & Wu, "Adaptive projection subspace dimension for the thick-restart
        Lanczos method", ACM Trans. Math. Softw. 37 (2010); Lehoucq, Sorensen &
        Yang, *ARPACK Users' Guide* (1998); Hochstenbach, "Probabilistic upper bounds for
        the matrix two-norm", J. Sci. Comput. 57 (2013).
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if stop not in ("residual", "eigenvalue"):
        raise ValueError(f"stop must be 'residual' or 'eigenvalue', got {stop!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    op = Operator(matvec, v0, name="v0")
    tol = eigen_tol(tol, op, "lanczos")
    n = op.n
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        k = int(k)  # numpy integers too
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer between 1 and the dimension {n}, got {k}")
    held_on = torch.device(basis_device) if basis_device is not None else op.device
    held_as = basis_dtype if basis_dtype is not None else op.dtype
    if not held_as.is_floating_point or torch.finfo(held_as).eps > torch.finfo(op.dtype).eps:
        raise ValueError(
            f"basis_dtype={held_as} is less precise than the vectors ({op.dtype}): every eigenvalue's accuracy "
            "would be capped at its rounding. Use the vectors' dtype or a more precise one, and "
            "basis_device='cpu' to keep a large basis off the GPU."
        )
    if max_basis is not None:
        m = cap = min(check_count(max_basis, "max_basis"), n)
    else:  # start small; grow toward what memory allows while orthogonalizing stays cheap
        m, cap = min(_arpack_ncv(k), n), default_basis(n, k, held_as, held_on)
    if m < n and m < k + 2:
        raise ValueError(
            f"max_basis={max_basis} is too small for k={k}: it must be at least k + 2 = "
            f"{k + 2} (or the dimension {n})"
        )
    budget = check_count(max_iters, "max_iters") if max_iters is not None else max(1000, 20 * k)
    if budget < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    x0 = op.layout.flatten(v0)
    check_start(x0, name="v0", allsum=op.allsum)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    if op.layout.sharding is not None:  # each rank draws its own shards of fresh vectors
        generator = rank_generator(generator)
    eps = torch.finfo(op.dtype).eps
    ctx = _Options(
        which=which, tol=tol, stop=stop, eps=eps, budget=budget, generator=generator,
        slack=symmetry_slack(op.layout.product_eps),
        rounding=step_rounding(op), allsum=op.allsum, start=x0,
    )
    find_copies = k > 1 if find_copies is None else bool(find_copies)
    if block_size != 1:
        return finish(_blocked(op, x0, k, n, ctx, max_basis=max_basis, progress=progress, block_size=block_size,
                               find_copies=find_copies,
                               held_elsewhere=basis_device is not None or basis_dtype is not None),
                      f"lanczos(k={k}, which={which!r}, block_size={block_size})")
    repeat = find_copies
    bar = Progress(progress, total=budget, desc=f"lanczos (k={k}, {which})")
    try:
        state, status, detail = _run(op, _start(x0.to(held_on, held_as), m, cap, ctx.allsum), k, n, ctx, bar)
        pairs = _extract(state, k, ctx)
        checking = status is Status.CONVERGED and state.j < n and (repeat or state.deficient)
        held = state.V.shape[0]
        if checking:
            m = state.V.shape[0] - 1
            # the check's basis and the k pairs it deflates stay within the main run's limit
            carried = _Carried(state.norm_estimate, m, max(state.cap - k, 2), state.product_seconds,
                               state.fixed_seconds, state.step_seconds)
            resolved = None
            if not state.deficient and max_basis is None:
                # the check may also deflate the main basis' resolved Ritz vectors (see
                # _resolved), where memory's share holds them beside the check's basis
                room = _fitting(n, held_as, held_on) - state.j - 1
                fits = room >= max(m, _CHECK_BASIS)
                if ctx.allsum is not None:  # free memory differs between ranks: all must agree
                    votes = ctx.allsum(torch.tensor([float(fits), 1.0], dtype=torch.float64, device=op.device))
                    fits = float(votes[0]) == float(votes[1])
                if fits:
                    resolved = _resolved(state, pairs, ctx)
                    carried = carried._replace(cap=min(state.cap, room))
            del state  # the pairs (and the resolved vectors) hold all that is kept
            pairs, status, detail, check_held = _check_copies(op, pairs, carried, n, ctx, bar, repeat=repeat,
                                                              resolved=resolved)
            held = max(held, check_held)
    finally:
        bar.close()
    return finish(_result(op, pairs, status, detail, held, ctx, checking=checking, find_copies=find_copies),
                  f"lanczos(k={k}, which={which!r})")


def _result(op: Operator, pairs: _Pairs, status: Status, detail: str, held: int, ctx: _Options, *, checking: bool,
            find_copies: bool) -> EigResult:
    """The ``EigResult`` of the pairs found (by either path), with the status and the
    message they warrant."""
    if status is Status.CONVERGED and not bool(pairs.converged.all()):
        status = Status.MAX_ITERS  # an invariant subspace smaller than k: pairs are missing
    return EigResult(
        eigenvalues=torch.as_tensor(pairs.values).to(op.device, op.dtype),
        eigenvectors=op.layout.unflatten(pairs.vectors.to(op.device, op.dtype)),
        converged=torch.as_tensor(pairs.converged).to(op.device),
        residuals=torch.as_tensor(pairs.residuals).to(op.device, op.dtype),
        errors=torch.as_tensor(pairs.errors).to(op.device, op.dtype),
        num_matvecs=op.num_matvecs,
        which=ctx.which,
        status=status,
        message=_message(status, detail, pairs, op.n, checking=checking, find_copies=find_copies, stop=ctx.stop),
        basis_size=held,
    )


def _message(status: Status, detail: str, pairs: _Pairs, n: int, *, checking: bool, find_copies: bool,
             stop: str) -> str:
    """The result's message: why it stopped short, or what a converged run did not rule out."""
    k = len(pairs.values)
    if status is not Status.CONVERGED:
        short = int((~pairs.converged).sum())
        unchecked = "; further copies of these eigenvalues were not yet ruled out" if checking else ""
        return f"{detail}; {short} of {k} pairs above tolerance{unchecked}. {status.remedy}"
    if k > 1 and not find_copies and k < n:
        return ("find_copies=False: eigenvalues a single Krylov sequence misses (copies of these, or "
                "neighbours inside a cluster it had not resolved) were not ruled out")
    if stop == "eigenvalue" and not checking and k < n:
        return ("stop='eigenvalue': the error bound takes its gap from the other Ritz values, and no second "
                "run looked for an eigenvalue the first had not resolved within the residual of θ (at a "
                "clustered end such a bound can be several times too small); k=2 has the neighbours checked, "
                "stop='residual' bounds |λ − θ| by the residual alone")
    return ""


def _blocked(op: Operator, x0: Tensor, k: int, n: int, ctx: _Options, *, max_basis: Optional[int],
             progress: ProgressArg, block_size: int, find_copies: bool, held_elsewhere: bool) -> EigResult:
    """:func:`lanczos` with ``block_size`` > 1: arguments checked, :func:`block_lanczos`
    run, the copy check (:func:`_check_copies`) run after it with ``find_copies``, the
    pairs returned as an ``EigResult`` (for :func:`lanczos` to finish)."""
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    which, tol, budget = ctx.which, ctx.tol, ctx.budget
    if ctx.stop != "residual" or held_elsewhere:
        raise ValueError("block_size > 1 works with stop='residual' and the basis on the vectors' device and dtype")
    if op.layout.sharding is not None:
        raise NotImplementedError("block_size > 1 for sharded (DTensor) vectors: use block_size=1")
    # the basis holds at least k + 2 blocks and leaves room for the next block
    if k + 3 * block_size > n:
        raise ValueError(f"block_size={block_size} with k={k} needs a dimension of at least k + 3·block_size = "
                         f"{k + 3 * block_size}, got {n}: use a smaller block_size (or block_size=1)")
    # A large basis by default (memory's share, as lanczos grows to): restarts cost a block
    # method more products than a single-vector one (measured k = 5 on ARPACK's clustered
    # spectrum, block of 4: 304 products with a basis of 60, 244 with 100). Where memory
    # binds, at least block_size times the single-vector floor: a restart keeps about k +
    # (m - k)/2 vectors and builds the rest in blocks, so the single-vector floor (20)
    # left block Lanczos polynomials of degree 2-4 between restarts (block of 4: 2,400-2,600
    # products on that spectrum, 353-357 with 60 vectors; block of 2: 761-857, 342-356 with 40).
    floor = block_size * _arpack_ncv(k)
    basis = max_basis if max_basis is not None else max(default_basis(n, k, op.dtype, op.device), floor)
    basis = min(basis, n - block_size)
    if basis < k + 2 * block_size:
        raise ValueError(f"max_basis={max_basis} is too small for k={k} and block_size={block_size}: it must be "
                         f"at least k + 2·block_size = {k + 2 * block_size}")
    checking = False
    bar = Progress(progress, total=budget, desc=f"block lanczos (k={k}, {which}, b={block_size})")
    try:
        values, vectors, converged, residuals, held, status, detail = block_lanczos(
            op, x0 / norm(x0, None), k, block_size=block_size, which=which, tol=tol, budget=budget,
            max_basis=basis, generator=ctx.generator, chunk_size="auto", bar=bar)
        # |λ − θ| ≤ ‖r‖: the residuals are the block's error bounds
        residuals = np.asarray(residuals)
        scale = float(np.abs(values[np.isfinite(values)]).max(initial=0.0))
        pairs = _Pairs(np.asarray(values), vectors, np.asarray(converged), residuals,
                       _rounded(residuals, scale, ctx))
        # a block finds up to block_size copies of an eigenvalue: six copies of the top one,
        # blocks of two, k = 6 returned 5, 5, 5, 5, 4, 4 as converged
        checking = find_copies and status is Status.CONVERGED and bool(pairs.converged.all())
        if checking:
            carried = _Carried(float(np.abs(values).max()), basis, max(basis - k, 2), math.inf, 0.0, 0.0)
            pairs, status, detail, check_held = _check_copies(op, pairs, carried, n, ctx, bar, repeat=True)
            held = max(held, check_held)
    finally:
        bar.close()
    return _result(op, pairs, status, detail, held, ctx, checking=checking, find_copies=find_copies)


# The basis may take this share of the device's free memory, up to _BASIS_CAP vectors:
# a larger basis restarts less (on a clustered spectrum 300 × 300, k = 5: 248 products
# with 20 vectors, 138 with 100, 134 with no restart at all) but its orthogonalization
# costs O(basis · n) per step, which dominates cheap products.
_MEMORY_SHARE = 0.1
_BASIS_CAP = 100


def _arpack_ncv(k: int) -> int:
    """ARPACK's basis size for k eigenpairs as scipy's ``eigsh`` sets it, max(2k + 1, 20):
    the fewest vectors a default basis holds (per vector of a block)."""
    return max(2 * k + 1, 20)


def default_basis(n: int, k: int, dtype: torch.dtype, device: torch.device) -> int:
    """The default ``max_basis``: as many vectors as fit in ``_MEMORY_SHARE`` of the free
    memory of ``device`` (of its total memory under ``torch.use_deterministic_algorithms``,
    which a run does not change), at least max(2k + 1, 20) (ARPACK's ``ncv`` in scipy),
    at most max(``_BASIS_CAP``, 2k + 1) and the dimension n."""
    floor = _arpack_ncv(k)
    return min(n, max(floor, min(_fitting(n, dtype, device) - 1, max(_BASIS_CAP, 2 * k + 1))))


def _fitting(n: int, dtype: torch.dtype, device: torch.device) -> int:
    """How many vectors of n numbers of ``dtype`` fit in ``_MEMORY_SHARE`` of the
    memory of ``device`` that :func:`default_basis` counts."""
    return int(_MEMORY_SHARE * _memory(device, total=deterministic()) / (n * torch.finfo(dtype).bits / 8))


def _memory(device: torch.device, *, total: bool) -> float:
    """Bytes free (or in all, with ``total``) on ``device``: the CUDA allocator's view, or
    the host's memory."""
    if device.type == "cuda":
        free, everything = torch.cuda.mem_get_info(device)
        return float(everything if total else free)
    try:
        return float(os.sysconf("SC_PHYS_PAGES" if total else "SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows) or no such name (macOS)
        return float(2**30)


@dataclass(frozen=True)
class _Options:
    which: str
    tol: float
    stop: str
    eps: float  # the unit roundoff of the vectors' dtype
    budget: int
    generator: torch.Generator
    slack: float  # of the symmetry check
    rounding: float  # the loss of orthogonality one step's rounding may cause, times β/‖H‖
    allsum: Optional[Callable[[Tensor], Tensor]] = None  # completes sums over sharded vectors
    start: Optional[Tensor] = None  # the start vector, which no fresh vector may repeat (_fresh_direction)


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
    # Simon's estimates of v_iᵀv_k (i ≠ k) for the rows of V, and whether the next step
    # must orthogonalize against the whole basis (the step after one that did)
    omega: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    # ‖Hv_i − Σ_k T_ki v_k − (coupling)‖ beyond rounding, per row: the coefficients a
    # partial reorthogonalization removed without entering T, and for the kept Ritz
    # vectors of a restart what the basis' errors leave in their relation. Each is a
    # source of loss of orthogonality in every later step (Simon's recurrence adds it).
    relation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    reorthogonalize: bool = False
    level: float = 0.0  # the loss of orthogonality allowed (set from the tolerance by _ritz)
    deficient: bool = False  # an invariant subspace was met: the start vector missed directions
    krylov: bool = True  # V[:j] is still the plain Krylov sequence of V[0] (no restart, no fresh vector)
    cap: int = 0  # the basis may grow to this many vectors (memory's limit)
    # grow whenever full, whatever a step costs, up to cap: the copy check's bound needs
    # the unrestarted Krylov sequence
    unrestarted: bool = False
    # The rows V is a view of; on the host also those of the next growth (:func:`_reserve`):
    # pages nothing has written hold no memory, and growing into them is a longer view
    # instead of a copy (6 ms, 32 MB, in the 400k-parameter MLP's top-eigenvalue job).
    storage: Optional[Tensor] = None
    product_seconds: float = math.inf  # the fastest product seen
    last_product: float = 0.0  # this step's product
    # what a step costs beyond its product (orthogonalization, the small eigenproblems,
    # the checks): at the first step (its fixed part), and on average over the steps
    # since the basis last grew or restarted (the occasional full reorthogonalizations
    # amortized), from their total and count
    fixed_seconds: float = math.inf
    step_seconds: float = 0.0
    overhead_total: float = 0.0
    overhead_steps: int = 0


class _Ritz(NamedTuple):
    theta: np.ndarray  # Ritz values, ascending
    Y: np.ndarray  # their eigenvectors in the basis
    wanted: np.ndarray  # indices of the k pairs ``which`` prefers, in its order
    residuals: np.ndarray  # ‖H Vy − θ Vy‖ = |cᵀy| of the wanted pairs
    ok: np.ndarray  # whether each wanted residual meets the tolerance


class _Pairs(NamedTuple):
    """Eigenpairs found, in ``which``'s order; missing ones are nan with zero vectors."""

    values: np.ndarray
    vectors: Tensor  # (k, n), unit rows
    converged: np.ndarray
    residuals: np.ndarray
    errors: np.ndarray  # bounds of |λ − θ|


def _start(x0: Tensor, m: int, cap: int, allsum: Optional[Callable[[Tensor], Tensor]]) -> _State:
    # rows are written before they are read (row j before the product that reads it)
    cap = max(cap, m)
    storage = _reserve(x0, m, cap)
    V = storage[: m + 1]
    V[0] = x0 / norm(x0, allsum)
    # The projected matrix and its eigenproblems are tiny: numpy float64 on the host,
    # where each small operation costs microseconds rather than a kernel launch.
    return _State(V=V, T=np.zeros((m + 1, m + 1)), omega=np.zeros((m + 1, m + 1)), relation=np.zeros(m + 1),
                  cap=cap, storage=storage)


def _reserve(like: Tensor, m: int, cap: int) -> Tensor:
    """Rows for a basis of m vectors (and the next): on the host also those of the
    next growth, min(2m, cap) vectors (on accelerators allocations are memory held).
    Not all of ``cap``: a reservation that large (161 MB for the 400k-parameter MLP) is
    always mapped afresh by glibc, where one of the next size (65 MB) comes from memory
    freed earlier in the process where glibc's thresholds allow (README: the malloc
    settings), without its page faults."""
    rows = min(2 * m, cap) + 1 if like.device.type == "cpu" else m + 1
    return empty_basis((rows, like.shape[-1]), like.dtype, like.device)


def _run(
    op: Operator, state: _State, k: int, dim: int, ctx: _Options, bar: Progress,
    done: Optional[Callable[[_State, _Ritz, bool], bool]] = None, deflate: Optional[Tensor] = None,
    converge: bool = True,
) -> Tuple[_State, Status, str]:
    """Expand and restart until the k wanted pairs converge (unless ``converge`` is
    False), ``done(state, ritz, invariant)`` says so, or the budget or a non-finite
    product ends the run. With ``deflate`` (rows U) the operator is PHP, P = I − UᵀU;
    ``dim`` is the dimension of the space the basis lives in."""
    while True:
        start = time.perf_counter()
        w = _expand(state, op, ctx, deflate)
        if w is None:
            return state, Status.NON_FINITE, "a product was not finite (nan or inf)"
        ritz = _ritz(state, k, ctx)
        bar.update(float(ritz.residuals[~ritz.ok].max()) if not ritz.ok.all() else 0.0)
        invariant = state.beta <= 100 * ctx.eps * state.norm_estimate
        if invariant and state.j == dim:
            return state, Status.CONVERGED, ""  # the basis spans the whole space: T's pairs are exact
        # An invariant subspace means the start vector missed part of the space:
        # whatever converges must then be checked from a fresh vector.
        state.deficient |= invariant
        converged = converge and len(ritz.wanted) == k and ritz.ok.all()
        if converged or (done is not None and done(state, ritz, invariant)):
            return state, Status.CONVERGED, ""
        _time_step(state, time.perf_counter() - start)
        if op.num_matvecs >= ctx.budget:
            return state, Status.MAX_ITERS, f"max_iters={ctx.budget} products reached"
        _advance(state, w, ritz, ctx, invariant=invariant, k=k)


class _Carried(NamedTuple):
    """What the copy check takes from the main run (not its basis, which it frees)."""

    norm_estimate: float  # a lower bound of ‖H‖: the rounding floor of tolerances
    m: int  # the basis size reached
    cap: int  # the most vectors the check's own basis may grow to
    product_seconds: float
    fixed_seconds: float
    step_seconds: float


def _check_copies(
    op: Operator, pairs: _Pairs, main: _Carried, n: int, ctx: _Options, bar: Progress, *, repeat: bool,
    resolved: Optional[Tensor] = None,
) -> Tuple[_Pairs, Status, str, int]:
    """Look for eigenvalues better than the k-th found, which a single Krylov sequence
    misses when it is a copy of one found, when its eigenvector is orthogonal to the
    start vector, or inside a cluster it has not resolved: Lanczos on the deflated
    operator PHP, P = I − UUᵀ, from a fresh random vector, its best pair held to the
    residual tolerance (an eigenvalue bound's gap from a short run's Ritz values can be
    overstated a hundredfold). U's rows are the pairs' vectors, or ``resolved``: those
    and the main basis' resolved Ritz vectors (:func:`_resolved`), then the vectors
    found since.

    It stops when its best pair converges better than the k-th or as a copy of it
    (:func:`_tied`; the first time, it then runs again from another fresh vector), or
    when :func:`_nothing_beyond` rules out anything better; its
    basis grows rather than restart (up to memory's cap), as the bound needs the plain
    Krylov sequence. A better pair found joins the k (replacing the worst), and its
    vector joins U; with ``repeat`` the check runs again. One found with ``resolved``
    deflated whose residual in H misses the tolerance is first converged by a run
    deflating the pairs alone, started from its vector (see the comment there).
    ``main`` carries the main run's basis size, limits, timings and ‖H‖'s estimate;
    the most vectors held (U's rows included) is returned last."""
    norm_estimate = main.norm_estimate
    held = 0
    polish: Optional[Tensor] = None  # a vector found with K deflated, to converge against the pairs
    looked_twice = False  # a check that ended on a copy of the k-th ran again from another fresh vector
    while True:
        U = pairs.vectors if resolved is None or polish is not None else resolved
        dim = n - U.shape[0]
        if dim == 0:  # the pairs, the resolved vectors and the copies found span the whole space
            return pairs, Status.CONVERGED, "", held
        kth = float(pairs.values[-1])
        floor = float(_threshold(np.array([kth]), ctx.tol, ctx.eps, norm_estimate)[0])
        beyond = _beyond(kth, floor, ctx.which)
        tied = False  # whether this run ended on a copy of the k-th

        def done(state: _State, ritz: _Ritz, invariant: bool) -> bool:
            # An invariant Krylov space of a random vector holds every distinct eigenvalue.
            # A converged best pair ends the run only when it is better than the k-th or a
            # copy of it within the tolerance (which no polynomial of a short run can tell
            # from a better eigenvalue): one converged below the k-th says nothing of an
            # eigenvalue beyond it that the fresh vector barely touches. Stopping there
            # (at a loose tol the bulk's edge converges early) missed such an eigenvalue
            # in 1-2% of fresh vectors, whatever the miss probability asked. The bound
            # is for beyond the k-th by more than the tolerance, what `_better` finds:
            # a copy of the k-th lies short of it. A copy still ends the run, although it
            # can hide a better eigenvalue the fresh vector barely touches (a bulk edge
            # inside the k-th's tolerance and one hidden from the start vector 2.2
            # tolerances beyond: 1-7% of fresh vectors at tol 1e-1..1e-3): telling them
            # apart costs about ln(spread / tolerance) / (2 √(gap / spread)) more
            # products, hundreds for the exact copies of a softmax Hessian's null space.
            # Instead a check so ended runs once more from another fresh vector (0-0.7%
            # missed there; softmax regression's smallest three: 20-30% more products).
            # Past a restart (the basis at its memory cap) the bound is gone and any
            # converged best pair ends the run, as before.
            if invariant:
                return True
            value, residual = float(ritz.theta[ritz.wanted[0]]), float(ritz.residuals[0])
            if ritz.ok[0] and (_better(value, kth, floor, ctx.which) or not state.krylov):
                return True
            if _tied(value, residual, kth, floor, ctx.which):
                nonlocal tied
                tied = True
                return True
            return _nothing_beyond(state, beyond, ctx.which, dim)

        # The check's best pair must meet the tolerance by its residual: the eigenvalue
        # bound's gap, from the few Ritz values of a short run whose start has not yet
        # resolved a cluster (or, when polishing, starts next to an eigenvector), can be
        # overstated a hundredfold, and a check that stopped on it missed an eigenvalue
        # inside a cluster of the top five (relative error 7e-3 at tol 1e-3).
        run_ctx = replace(ctx, stop="residual")
        if polish is None:
            start = _fresh_direction(U, ctx.generator, ctx.allsum, avoid=ctx.start)
        else:  # not random: only convergence may stop this run
            start, _ = orthogonalize(U, polish.clone(), ctx.allsum)
            start = start / norm(start, ctx.allsum)
        size = min(max(main.m, _CHECK_BASIS), main.cap, dim)
        state = _start(start, size, min(main.cap, dim), ctx.allsum)
        state.unrestarted = polish is None
        state.norm_estimate = norm_estimate
        state.product_seconds, state.fixed_seconds, state.step_seconds = (
            main.product_seconds, main.fixed_seconds, main.step_seconds)
        state, status, detail = _run(op, state, 1, dim, run_ctx, bar, done if polish is None else None, deflate=U,
                                     converge=polish is not None)
        held = max(held, state.V.shape[0] + U.shape[0] + (0 if resolved is None or polish is None else len(resolved)))
        if status is not Status.CONVERGED:
            return pairs, status, detail, held
        theta, Y = eigh(state.T[: state.j, : state.j])
        best = select(theta, ctx.which, 1)
        value = float(theta[best[0]])
        if not _better(value, kth, floor, ctx.which):
            if polish is None and tied and not looked_twice:
                looked_twice = True
                continue
            if polish is None:
                return pairs, Status.CONVERGED, "", held
            resolved = polish = None  # what that deflation showed was not there: deflate the pairs alone
            continue
        norm_estimate = max(norm_estimate, state.norm_estimate)
        found = _extract(state, 1, run_ctx)
        # u lies in the deflated space, so its gap is to the deflated operator's spectrum
        # (a copy's twin among the pairs is the same eigenvalue, not a neighbour)
        gap = float(_gaps(theta, best, np.abs(state.coupling @ Y))[0])
        merged, accepted = _merge(pairs, found, gap, op, norm_estimate, run_ctx)
        if resolved is not None and polish is None and not accepted:
            # H couples the vector found to the deflated Ritz vectors through their own
            # residuals, which can keep its residual in H above a tolerance at rounding
            # level although it converged in the deflated operator: converge it against
            # the pairs alone, from where it is.
            polish = found.vectors[0]
            continue
        polish = None
        if resolved is not None:
            resolved = torch.cat([resolved, _orthonormal_rows(found.vectors, ctx.allsum, against=resolved)])
        pairs = merged
        if not repeat:
            return pairs, Status.CONVERGED, "", held


# The copy check's basis: at least this many vectors (its probabilistic stop needs an
# unrestarted Krylov sequence; with 10 or 20 vectors on ARPACK's clustered spectrum it
# restarted and took 1.5-2x the products of a 41-vector one).
_CHECK_BASIS = 20


def _orthonormal_rows(V: Tensor, allsum: Optional[Callable[[Tensor], Tensor]] = None,
                      against: Optional[Tensor] = None) -> Tensor:
    """An orthonormal copy of the rows of V (nearly orthonormal already, as a
    semi-orthogonal Lanczos basis is), projected off the orthonormal rows ``against``
    first: Cholesky QR twice, whose second pass brings a Gram matrix within √ε of I
    down to rounding."""
    Z = V if against is None else torch.stack([orthogonalize(against, row, allsum)[0] for row in V])
    for _ in range(2):
        L = torch.linalg.cholesky(total(Z @ Z.T, allsum).to("cpu", torch.float64))
        Z = torch.linalg.solve_triangular(L.to(Z.device, Z.dtype), Z, upper=False)
    return Z


# The share of the k-th eigenvalue's tolerance that deflating resolved Ritz vectors may
# cost the copy check's view of a missed eigenvalue (see _resolved).
_RESOLVED_SHARE = 0.1


def _resolved(state: _State, pairs: _Pairs, ctx: _Options) -> Tensor:
    """Orthonormal rows spanning the pairs found and the main basis' other Ritz vectors
    that are resolved eigenvectors, for the copy check to deflate.

    Deflating a Ritz vector g (value θ_g, residual r_g) hides little of an eigenvector w
    the main run missed (value λ beyond the k-th found, θ_k): |gᵀw| ≤ r_g/|λ − θ_g|, and
    the deflated operator keeps an eigenvalue beyond λ − Σ_g r_g²/|λ − θ_g| (to first
    order). So the vectors on the far side of θ_k are taken, smallest r_g²/|θ_k − θ_g|
    first, while those terms sum to at most ``_RESOLVED_SHARE`` of θ_k's tolerance: a
    missed eigenvalue stays visible to the check, and the resolved neighbours of θ_k
    leave the deflated operator, which shortens the check (ARPACK's clustered spectrum,
    k = 5 smallest: 37 products instead of 95). Deflating the whole basis instead
    (which holds no part of a copy) was shorter still but hid eigenvalues the main run
    had reached without resolving: inside a cluster of the top five at tol 1e-3 it
    returned 0.65 for 0.6543 as converged.
    """
    g = state.j
    theta, Y = eigh(state.T[:g, :g])
    residuals = np.abs(state.coupling @ Y)
    kth = float(pairs.values[-1])
    floor = float(_threshold(np.array([kth]), ctx.tol, ctx.eps, state.norm_estimate)[0])
    wanted = set(select(theta, ctx.which, len(pairs.values)).tolist())
    if ctx.which == "LA":
        distance = kth - theta
    elif ctx.which == "SA":
        distance = theta - kth
    else:
        distance = abs(kth) - np.abs(theta)
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(distance > 0, residuals**2 / distance, np.inf)
    order = [i for i in np.argsort(cost) if i not in wanted and np.isfinite(cost[i])]
    spent = np.cumsum(cost[order]) if order else np.zeros(0)
    chosen = [i for i, c in zip(order, spent) if c <= _RESOLVED_SHARE * floor]
    G = torch.as_tensor(Y[:, chosen].T.copy()).to(state.V.device, state.V.dtype) @ state.V[:g]
    return _orthonormal_rows(torch.cat([pairs.vectors, G]), ctx.allsum)


def _beyond(kth: float, floor: float, which: str) -> float:
    """The point past which an eigenvalue is preferred to the k-th by more than its
    tolerance ``floor``: above it for ``"LA"``, below for ``"SA"``, above it in
    magnitude for ``"LM"``."""
    return {"LA": kth + floor, "SA": kth - floor, "LM": abs(kth) + floor}[which]


def _better(value: float, kth: float, floor: float, which: str) -> bool:
    """Whether ``value`` is preferred to the k-th eigenvalue by more than its tolerance."""
    t = _beyond(kth, floor, which)
    if which == "SA":
        return value < t
    return (abs(value) if which == "LM" else value) > t


def _tied(value: float, residual: float, kth: float, floor: float, which: str) -> bool:
    """Whether the eigenvalue a Ritz pair vouches for (within ``residual`` of ``value``)
    lies within ``floor`` of the k-th eigenvalue: a copy of it as far as the tolerance
    can tell."""
    if which == "LM":
        value, kth = abs(value), abs(kth)
    return kth - floor <= value - residual and value + residual <= kth + floor


def _merge(
    pairs: _Pairs, found: _Pairs, gap: float, op: Operator, norm_estimate: float, ctx: _Options
) -> Tuple[_Pairs, bool]:
    """The k best of ``pairs`` and the pair ``found`` by the deflated run (``gap``: its
    :func:`_gaps` there), and whether the found pair meets the tolerance. Its residual in
    H (not in the deflated operator) costs one product: Hu − θu has a part along U that
    the deflated run cannot see."""
    value, u = float(found.values[0]), found.vectors[0]
    r = norm(_product(op, u) - value * u, ctx.allsum)
    residual = float(r.to("cpu", torch.float64))
    error = float(_error_bounds(np.array([residual]), np.array([gap]))[0])
    measure = residual if ctx.stop == "residual" else error
    # Hu − θu gains a part U g with g_i = r_iᵀu from each deflated pair's own residual
    # r_i, which the deflated run cannot see and no longer run could reduce: a pair
    # found next to pairs converged to tol·|θ_i| is as accurate as they allow, up to
    # ‖(‖r_i‖)_i‖, above the floor grown by √(k + 1) for rounding.
    floor = math.sqrt(len(pairs.values) + 1) * norm_estimate
    leak = float(np.linalg.norm(pairs.residuals[np.isfinite(pairs.residuals)]))
    ok = bool(measure <= _threshold(np.array([value]), ctx.tol, ctx.eps, floor)[0] + leak)
    values = np.append(pairs.values, value)
    order = select(values, ctx.which, len(pairs.values))
    return _Pairs(
        values=values[order],
        vectors=torch.cat([pairs.vectors, u[None]])[torch.as_tensor(order, device=u.device)],
        converged=np.append(pairs.converged, ok)[order],
        residuals=np.append(pairs.residuals, residual)[order],
        errors=np.append(pairs.errors, _rounded(np.array([error]), norm_estimate, ctx))[order],
    ), ok


def _expand(state: _State, op: Operator, ctx: _Options, deflate: Optional[Tensor] = None) -> Optional[Tensor]:
    """One product: H V[j] (P H V[j] with ``deflate``) goes into column j of T. Returns
    the residual direction normalized (w/β, in row j + 1; unnormalized where β = 0), or
    None (the state unchanged) when the product was not finite.

    After a three-term step (``state.plain``) H v_j couples only to v_{j-1} and v_j, so
    the product is orthogonalized against those two and :func:`_orthogonality` says
    whether the result must also be orthogonalized against the rest; after a restart or
    a fresh direction it is orthogonalized against the whole basis."""
    j = state.j
    start = time.perf_counter()
    # the product goes straight into the next row (free: the basis holds m + 1 rows and
    # j < m here), where the step orthogonalizes and normalizes it in place
    product = _product(op, state.V[j], out=state.V[j + 1])
    if product.is_cuda and state.V.shape[0] - 1 < state.cap:
        # the timing decides whether the basis grows: only then is a synchronization worth it
        torch.cuda.synchronize(product.device)
    middle = time.perf_counter()
    local = state.plain and not state.reorthogonalize
    first = j - 1 if local else 0
    if local:
        # the three-term step in one pass (Paige): ⟨v_{j-1}, Hv_j⟩ (for the symmetry
        # check) and α_j from one product with the pair; the estimates watch the rest
        pair = state.V[j - 1 : j + 1]
        h = total(torch.mv(pair, product), ctx.allsum)
        w = product.addmv_(pair.T, h, alpha=-1)  # the product is ours: no new vector
    elif state.plain:  # Simon asked for this step to be orthogonalized against the whole basis
        w, h, _ = lanczos_step(state.V[: j + 1], product, ctx.allsum)
    else:  # after a restart or a fresh direction H v_j couples to every kept vector
        w, h, _ = expand(state.V[: j + 1], product, ctx.allsum)
    if deflate is not None:  # projected after the step: the basis' parts along U would grow
        w, _ = orthogonalize(deflate, w, ctx.allsum)
    beta = norm(w, ctx.allsum)
    # one device-to-host transfer per step for the coefficients and the norm
    host = torch.cat([h, beta[None]]).to("cpu", torch.float64).numpy()
    if local and cancelled(host[:-1], host[-1], ctx.eps, state.level):
        # a second pass brings w to rounding off the pair ("twice is enough"); its
        # coefficients are T's too
        w, again = three_term(pair, w, ctx.allsum)
        if deflate is not None:
            w, _ = orthogonalize(deflate, w, ctx.allsum)
        host = torch.cat([h + again, norm(w, ctx.allsum)[None]]).to("cpu", torch.float64).numpy()
    state.last_product = middle - start
    state.product_seconds = min(state.product_seconds, state.last_product)
    if not np.isfinite(host).all():
        return None
    h = np.zeros(j + 1)
    h[first:] = host[:-1]
    if state.plain:
        check_symmetric(h[j - 1], state.T[j, j - 1], max(state.norm_estimate, abs(h[j])), ctx.slack)
    state.T[: j + 1, j] = h
    state.T[j, : j + 1] = h
    state.beta = float(host[-1])
    omega = np.full(j + 1, ctx.rounding)
    state.reorthogonalize = False
    if local and j >= 2:
        estimate = _orthogonality(state, ctx.rounding)
        if np.abs(estimate[: j - 1]).max() > state.level:
            # one pass: w is already orthogonal to within the level (≤ √ε), which a
            # single classical Gram–Schmidt pass brings down to rounding (a second only
            # on cancellation, as SLQ's and block_spectra's steps do)
            w, dropped, beta = reorthogonalize(state.V[: j + 1], w, ctx.allsum, beta)
            both = torch.stack([torch.linalg.vector_norm(dropped), beta]).to("cpu", torch.float64)
            state.relation[j] += float(both[0])  # those coefficients are not in T's column j
            state.beta = float(both[1])
            state.reorthogonalize = True  # Simon: the next vector too, its estimate rests on this one's
        else:
            omega = estimate
            omega[j - 1 :] = ctx.rounding  # orthogonalized against explicitly
    state.omega[j + 1, : j + 1] = omega
    state.omega[: j + 1, j + 1] = omega
    state.j = j + 1
    state.coupling = np.zeros(j + 1)
    state.coupling[j] = state.beta
    if state.beta > 0:
        # normalized here, right after the step's other vector operations, while torch's
        # OpenMP workers still spin: in _advance, after the small eigenproblem, the
        # division first woke the sleeping workers (0.6 ms a step for a 400k-parameter
        # vector on a 2-core VM against 0.05 ms here, as with OMP_WAIT_POLICY=ACTIVE)
        w = torch.div(w, state.beta, out=state.V[j + 1])
    return w


def _product(op: Operator, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """H x for a basis vector: computed on the vectors' device and dtype, returned in the
    basis' (written into ``out`` where the basis has the vectors' device and dtype, else
    a fresh tensor; the step may overwrite either)."""
    if out is not None and x.device == op.device and x.dtype == op.dtype:
        return op(x, out=out)
    return op(x.to(op.device, op.dtype)).to(x.device, x.dtype)


def _orthogonality(state: _State, rounding: float) -> np.ndarray:
    """Simon's estimate of v_kᵀ v_{j+1} for k ≤ j, before v_{j+1} = w/β is normalized.

    From β v_{j+1} = H v_j − Σ_i T_ij v_i and H v_k = Σ_i T_ik v_i (column k ≤ j − 1 of
    T is complete, also for the kept Ritz vectors of a thick restart, whose column is θ
    on the diagonal and the coupling to the vector after them), with W = VᵀV:
    β v_kᵀ v_{j+1} = (T W − W T)_kj, plus the rounding of one step, ε √n ‖H‖ / 2 with the
    sign that makes it larger (Simon 1984; Larsen's PROPACK; SLEPc), plus the relation
    errors of rows k and j (``_State.relation``): after a thick restart the kept Ritz
    vectors carry the coefficients partial reorthogonalizations left out of T, which
    without this term were underestimated a thousandfold until the symmetry check failed."""
    j = state.j
    T = state.T[: j + 1, : j + 1]
    W = state.omega[: j + 1, : j + 1].copy()
    np.fill_diagonal(W, 1.0)
    commutator = T @ W[:, j] - W @ T[:, j]
    scale = max(state.norm_estimate, float(np.abs(T[:, j]).sum()) + state.beta)
    # v_kᵀ(Hv_j) − (Hv_k)ᵀv_j: the relation errors of rows k and j, each at most its size
    source = rounding * scale + state.relation[: j + 1] + state.relation[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        estimate = (commutator + np.copysign(source, commutator)) / state.beta
    return np.where(np.isfinite(estimate), estimate, np.inf)


def _ritz(state: _State, k: int, ctx: _Options) -> _Ritz:
    """The Ritz pairs of the current basis and which of the wanted ones have converged."""
    j = state.j
    theta, Y = eigh(state.T[:j, :j])
    state.norm_estimate = max(state.norm_estimate, float(np.abs(theta).max()))
    wanted = select(theta, ctx.which, k)
    every = np.abs(state.coupling @ Y)
    residuals = every[wanted]
    threshold = _threshold(theta[wanted], ctx.tol, ctx.eps, state.norm_estimate)
    if ctx.stop == "residual":
        measure, asked = residuals, threshold
    else:  # min(r, r²/gap) ≤ threshold holds once r ≤ √(threshold · gap)
        gaps = _gaps(theta, wanted, every)
        measure = _error_bounds(residuals, gaps)
        asked = np.maximum(threshold, np.sqrt(threshold * np.where(np.isfinite(gaps), gaps, 0)))
    ok = measure <= threshold
    if state.norm_estimate > 0:
        # Reorthogonalizing discards coefficients of the size of the loss of
        # orthogonality times ‖H‖, which then blur the residuals: keep it 10x below
        # the smallest residual the stopping test needs (full reorthogonalization at
        # the rounding floor). An eigenvalue bound needs less than its tolerance: on
        # the 400k-parameter MLP (float32, tol 1e-3) one reorthogonalization instead of two.
        state.level = min(math.sqrt(ctx.eps), 0.1 * float(asked.min()) / state.norm_estimate)
    return _Ritz(theta, Y, wanted, residuals, ok)


def _error_bounds(residuals: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """min(r, r²/gap) per Ritz value (Parlett §11.7), from its residual and its gap
    (:func:`_gaps`); r where the gap is zero or unknown (infinite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        quadratic = np.where((gap > 0) & np.isfinite(gap), residuals**2 / gap, np.inf)
    return np.minimum(residuals, quadratic)


def _rounded(errors: np.ndarray, norm_estimate: float, ctx: _Options) -> np.ndarray:
    """Error bounds as reported: at least one product's rounding, ``ctx.rounding·‖H‖``.
    min(r, r²/gap) bounds the error for the operator the products apply, which differs
    from H by their rounding: a float32 Hessian with ‖H‖ = 10⁶ and 29 eigenvalues 10⁻³
    gave 7·10⁻⁴ for the smallest with a bound of 10⁻¹⁰ (r²/gap, r = 0.01)."""
    return np.maximum(errors, ctx.rounding * norm_estimate)


def _gaps(theta: np.ndarray, wanted: np.ndarray, every: np.ndarray) -> np.ndarray:
    """The distance from each wanted Ritz value to the nearest eigenvalue another Ritz
    pair vouches for: |θ − θ_j| − r_j, as an eigenvalue lies within r_j of θ_j (inf if
    alone). The plain Ritz gap (ARPACK's) is overstated while θ_j is still moving: on a
    dense top, k = 1, tol 1e-2, the bound it gave held in 47 of 100 runs (83 less r_j)."""
    if len(theta) < 2:
        return np.full(len(wanted), np.inf)
    others = np.maximum(np.abs(theta[wanted][:, None] - theta[None, :]) - every[None, :], 0.0)
    others[np.arange(len(wanted)), wanted] = np.inf
    return others.min(axis=1)


def _advance(state: _State, w: Tensor, ritz: _Ritz, ctx: _Options, *, invariant: bool, k: int) -> None:
    """Put the next basis vector in place: w (already w/β, from :func:`_expand`), or a
    fresh random direction from ``ctx.generator`` after an invariant subspace. When the
    basis is full it grows if :func:`_grown` allows, else restarts keeping the Ritz
    vectors :func:`_kept` chooses."""
    j, m, allsum = state.j, state.V.shape[0] - 1, ctx.allsum
    if j == m:
        grown = _grown(state)
        if allsum is not None:
            # timings differ between ranks, the basis size may not: grow only if all agree
            votes = allsum(torch.tensor([float(grown > m), 1.0], dtype=state.V.dtype, device=state.V.device))
            grown = grown if float(votes[0]) == float(votes[1]) else m
        state.overhead_total, state.overhead_steps = 0.0, 0
        if grown > m:
            if state.storage.shape[0] <= grown:
                storage = _reserve(state.V, grown, state.cap)
                storage[: j + 1] = state.V[: j + 1]  # with w/β in row j
                state.storage = storage
            V = state.storage[: grown + 1]
            T, omega = np.zeros((grown + 1, grown + 1)), np.zeros((grown + 1, grown + 1))
            T[: m + 1, : m + 1] = state.T
            omega[: m + 1, : m + 1] = state.omega
            relation = np.zeros(grown + 1)
            relation[: m + 1] = state.relation
            state.V, state.T, state.omega, state.relation, m = V, T, omega, relation, grown
    if invariant:
        nxt = _fresh_direction(state.V[:j], ctx.generator, allsum, avoid=ctx.start)
        state.omega[j, :j] = state.omega[:j, j] = 0.0
        state.krylov = False
    else:
        # w/β is row j (of a grown basis too); a restart rewrites the rows: a copy
        nxt = state.V[j] if j < m else w.clone()
        state.T[j, j - 1] = state.beta  # vᵀ_{j-1}Hv_j must come back equal: the symmetry check
    state.plain = not invariant and j != m
    if j == m:
        _restart(state, ritz, _kept(ritz.theta, k, ctx.which), nxt, allsum)
    elif invariant:
        state.V[j] = nxt


# Grow the basis only while a step's cost beyond its product (orthogonalization, the
# small eigenproblems) stays under this share of a product (on a 400k-parameter MLP a
# basis of 100 made each step 3.5x slower than one of 20 for the same products, and on a
# 3,922-parameter MLP, whose products take 1 ms, the eigenproblems of a 100-vector basis
# made Lanczos 7x slower; on a CNN, whose products cost more, it is nearly free), or under
# _NEGLIGIBLE_SECONDS, which nothing notices.
_ORTHOGONALIZATION_SHARE = 0.5
_NEGLIGIBLE_SECONDS = 1e-4


def _time_step(state: _State, seconds: float) -> None:
    """Record what this step cost beyond its product (the running mean of the cycle)."""
    overhead = max(0.0, seconds - state.last_product)
    if state.j == 1:
        state.fixed_seconds = min(state.fixed_seconds, overhead)
    else:
        state.overhead_total += overhead
        state.overhead_steps += 1
        state.step_seconds = state.overhead_total / state.overhead_steps


def _grown(state: _State) -> int:
    """The basis size to continue with when it is full: doubled (up to ``state.cap``) if
    a step's cost beyond its product and its fixed part, measured now and extrapolated to
    the doubled basis as its square (orthogonalization grows linearly with the basis, the
    small eigenproblems faster), stays within the allowance; else unchanged."""
    m = state.V.shape[0] - 1
    target = min(2 * m, state.cap)
    if deterministic() or state.unrestarted:  # no timing decides: always
        return target
    growing = max(0.0, state.step_seconds - state.fixed_seconds) * (target / m) ** 2
    allowed = max(_ORTHOGONALIZATION_SHARE * state.product_seconds, _NEGLIGIBLE_SECONDS)
    if target > m and growing <= allowed:
        return target
    return m


def _kept(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """The Ritz values (indices into ascending ``theta``) a thick restart keeps.

    After a restart keeping a vectors at the wanted end and b at the other, the next
    s = m − a − b steps build a polynomial on the interval the other Ritz values span,
    I = [θ_a, θ_{m−1−b}] in the order ``which`` prefers; the k-th wanted value lies
    outside it at δ = |θ_a − θ_k|, and Chebyshev's bound shrinks its residual by about
    exp(−2 s √(δ/|I|)) over those steps. So the restart keeps the (a, b) that maximize
    s √(δ/|I|), with a ≥ k + (m − k) / 3 guards and s ≥ max(3, m / 5) new steps; failing
    that, the fixed rule a = k + (m − k) / 2, b = 0 (also for ``"LM"`` with wanted values
    at both ends; at one end, as that end). Keeping the far end's outliers
    narrows I (on a clustered spectrum with outliers on both sides, k = 5 smallest: 137
    products with a 41-vector basis instead of 159, the unrestarted count being 134);
    with more guards than a third, k = 20 on a 26-vector basis took 1.5x longer.

    Reference: Yamazaki, Bai, Simon, Wang & Wu, "Adaptive projection subspace dimension
    for the thick-restart Lanczos method", ACM Trans. Math. Softw. 37 (2010), whose
    TRLan keeps both ends the same way.
    """
    m = len(theta)
    fixed = select(theta, which, k + (m - k) // 2)
    lowest, fewest = k + (m - k) // 3, max(3, m // 5)
    if lowest > m - fewest:
        return fixed
    if which == "LM":
        # The k of largest magnitude all at one end (a Hessian's top is usually all
        # positive) are that end's k, and restart as that end does; k = 9 of diag(1, …,
        # 1000) with 20 vectors took 435–453 products with the fixed rule, 300 so, and
        # ARPACK 290–311 (arpack-ng's bug 1315 test). Wanted values at both ends keep
        # the fixed rule: the unwanted values then lie between, with no far end to keep.
        wanted = set(select(theta, "LM", k).tolist())
        ends = [end for end in ("LA", "SA") if set(select(theta, end, k).tolist()) == wanted]
        if not ends:
            return fixed
        which = ends[0]
    order = np.arange(m) if which == "SA" else np.arange(m)[::-1]
    ordered = theta[order]
    a = np.arange(lowest, m - fewest + 1)[:, None]
    b = np.arange(m)[None, :]
    steps = m - a - b
    feasible = steps >= fewest
    inner = np.where(feasible, m - 1 - b, 0)
    width = np.abs(ordered[inner] - ordered[a])
    with np.errstate(divide="ignore", invalid="ignore"):
        merit = np.where(feasible & (width > 0), steps * np.sqrt(np.abs(ordered[a] - ordered[k - 1]) / width), -np.inf)
    if not np.isfinite(merit).any():
        return fixed
    i, kept_far = np.unravel_index(int(np.argmax(merit)), merit.shape)
    kept_near = int(a[i, 0])
    return np.concatenate([order[:kept_near], order[m - kept_far :]]) if kept_far else order[:kept_near]


def _restart(state: _State, ritz: _Ritz, kept: np.ndarray, nxt: Tensor,
             allsum: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """Thick restart (Wu & Simon): keep the Ritz vectors U = YᵀV of indices ``kept``
    (:func:`_kept`) and the residual direction ``nxt`` as the new basis, T their Ritz
    values; the next expansion refills the coupling.

    A semi-orthogonal basis gives Ritz vectors orthogonal only to about √ε, so the new
    basis Z = [U; nxt] is orthonormalized (Cholesky QR: Z ← L⁻¹Z with LLᵀ = ZZᵀ, one
    pass suffices for a Gram matrix this close to I), and T and the coupling follow it:
    from HU = ΘU + c nxtᵀ, with U = L_U U' and nxt = U'ᵀl + λ nxt', the kept block is
    HU' = (L_U⁻¹ΘL_U + L_U⁻¹c lᵀ) U' + λ L_U⁻¹c nxt'ᵀ, whose symmetric part is kept."""
    keep, V = len(kept), state.V
    # each kept u = Vy inherits Σ yᵢ eᵢ from the rows' relation errors eᵢ: at most ‖E‖_F
    inherited = float(np.sqrt(np.square(state.relation[: state.j]).sum()))
    Yk = torch.as_tensor(ritz.Y[:, kept]).to(V.device, V.dtype)
    # Column blocks are independent in Z = [YₖᵀV; nxt], its Gram matrix and L⁻¹Z: each
    # is computed in place through small temporaries. Whole-basis temporaries (40 MB for
    # 25 kept vectors of a 400k-parameter model) were mapped afresh by the allocator at
    # every restart: 74 ms per restart of the MLP's top-5 job, 23 products' worth.
    blocks = _column_blocks(V.shape[1], state.j, V)
    gram = torch.zeros(keep + 1, keep + 1, dtype=torch.float64, device=V.device)
    for cols in blocks:
        V[:keep, cols] = Yk.T @ V[: state.j, cols]
        V[keep, cols] = nxt[cols]
        Z = V[: keep + 1, cols]
        gram += (Z @ Z.T).to(torch.float64)
    # the small factorizations on the host through torch's LAPACK (see ritz.eigh)
    L = torch.linalg.cholesky(total(gram, allsum).to("cpu"))
    # L is within √ε of I: its inverse is as accurate as a triangular solve, and a
    # matrix product is 2.5x faster than torch's solve on a wide CPU block
    L_inverse = torch.linalg.solve_triangular(L, torch.eye(keep + 1, dtype=L.dtype), upper=False).to(V.device, V.dtype)
    for cols in blocks:
        V[: keep + 1, cols] = L_inverse @ V[: keep + 1, cols]
    L_U, tail, lam = L[:keep, :keep], L[keep, :keep], float(L[keep, keep])
    coupling = torch.as_tensor(state.beta * ritz.Y[state.j - 1, kept])[:, None]
    c = torch.linalg.solve_triangular(L_U, coupling, upper=False)
    theta = torch.as_tensor(ritz.theta[kept])[:, None]
    block = (torch.linalg.solve_triangular(L_U, theta * L_U, upper=False) + c * tail[None, :]).numpy()
    c = c[:, 0].numpy()
    state.T[:] = 0.0
    state.T[:keep, :keep] = (block + block.T) / 2
    state.omega[:] = 0.0
    state.relation[:] = 0.0
    state.relation[:keep] = inherited + float(np.abs(block - block.T).max()) / 2  # the asymmetry left out
    state.coupling = lam * c
    state.j = keep
    state.krylov = False


# A restart's temporaries per column block on a CPU: small enough for the allocator to
# recycle them from its heap (glibc maps anything over 32 MiB afresh, and returns freed
# memory above its thresholds, so a whole-basis temporary is faulted in every time).
_RESTART_BLOCK_BYTES = 8 << 20


def _column_blocks(n: int, rows: int, V: Tensor) -> list:
    """Column slices of a basis with ``rows`` rows read at once, ``_RESTART_BLOCK_BYTES``
    each on a CPU; one slice elsewhere (a GPU's caching allocator recycles whole blocks,
    and every slice costs kernel launches)."""
    if V.device.type != "cpu":
        return [slice(0, n)]
    width = max(1, _RESTART_BLOCK_BYTES // (rows * V.element_size()))
    return [slice(start, min(start + width, n)) for start in range(0, n, width)]


# The chance, over the fresh vector, that the copy check misses a better eigenvalue: at
# most, as the bound holds at the k-th eigenvalue's threshold and one missed farther
# beyond is seen sooner. Measured with an eigenvalue the start vector could not see, just
# beyond the threshold over a bulk just below it: 0.15% of fresh vectors missed it at
# 10⁻² (3 of 2,000), 1.1% at 10⁻¹, 11% at 0.5. Each decade costs about ln 10 / (2 √(gap /
# spread)) products: 5 of the 50 of the jobs' CNN top-5 (k = 5, tol 1e-3), which at 10⁻³
# took 1.04-1.08x the time of curvlinops + scipy's eigsh (which looks for nothing missed).
_MISS_PROBABILITY = 1e-2


def _nothing_beyond(state: _State, t: float, which: str, dim: int) -> bool:
    """Whether, with probability ≥ 1 − ``_MISS_PROBABILITY`` over the random start z,
    the operator (dimension ``dim``) has no eigenvalue beyond t: above t for ``"LA"``,
    below for ``"SA"``, outside (−t, t) for ``"LM"``.

    After s plain Lanczos steps from z, p(A) z = β_1 ⋯ β_s v_{s+1} with p the
    characteristic polynomial of the steps' tridiagonal T_s. An eigenvalue λ whose
    eigenvector u has γ = uᵀz thus has |p(λ)| |γ| ≤ β_1 ⋯ β_s, and |p| only grows beyond
    the extreme Ritz values; for z uniform on the sphere, P[|γ| < g] ≤ g √(2n/π). So if
    |p(t)| ≥ β_1 ⋯ β_s √(2n/π) / δ at a point t beyond every Ritz value of T_s, then
    with probability ≥ 1 − δ no eigenvalue lies beyond t (Hochstenbach, "Probabilistic
    upper bounds for the matrix two-norm", J. Sci. Comput. 57 (2013); the bound adapts
    to the spectrum, unlike Kuczyński & Woźniakowski's worst case).
    """
    j = state.j
    if not state.krylov or j == 0:
        return False
    theta = eigvalsh(state.T[:j, :j])
    betas = np.append(np.diag(state.T[1:j, : j - 1]), state.beta)
    log_norm = float(np.log(np.maximum(betas, np.finfo(float).tiny)).sum())
    needed = log_norm + math.log(math.sqrt(2 * dim / math.pi) / _MISS_PROBABILITY)
    # (t, +1): nothing may lie above t; (t, -1): nothing below
    ends = {"LA": [(t, 1)], "SA": [(t, -1)], "LM": [(abs(t), 1), (-abs(t), -1)]}[which]
    for end, side in ends:
        if not (side * (end - theta) > 0).all() or np.log(np.abs(theta - end)).sum() < needed:
            return False
    return True


def _extract(state: _State, k: int, ctx: _Options) -> _Pairs:
    """The k wanted pairs of the last finite basis; missing pairs (stopped before the
    basis held k vectors) are nan with zero vectors."""
    n = state.V.shape[1]
    if state.j == 0:  # the first product was not finite: nothing but the start vector
        theta, Y, j, coupling = np.full(1, np.nan), np.ones((1, 1)), 1, np.full(1, np.nan)
    else:
        j, coupling = state.j, state.coupling
        theta, Y = eigh(state.T[:j, :j])
    wanted = select(theta, ctx.which, k)
    pad = k - len(wanted)
    values = np.concatenate([theta[wanted], np.full(pad, np.nan)])
    every = np.abs(coupling @ Y)
    residuals = np.concatenate([every[wanted], np.full(pad, np.inf)])
    errors = np.concatenate([_error_bounds(every[wanted], _gaps(theta, wanted, every)), np.full(pad, np.inf)])
    measure = residuals if ctx.stop == "residual" else errors
    converged = measure <= _threshold(values, ctx.tol, ctx.eps, state.norm_estimate)
    errors = _rounded(errors, state.norm_estimate, ctx)
    V = state.V
    vectors = torch.as_tensor(Y[:, wanted].T.copy()).to(V.device, V.dtype) @ V[:j]
    vectors = vectors / norm(vectors, ctx.allsum, dim=1, keepdim=True)
    vectors = torch.cat([vectors, torch.zeros(pad, n, dtype=V.dtype, device=V.device)])
    return _Pairs(values, vectors, converged, residuals, errors)


def _threshold(theta: np.ndarray, tol: float, eps: float, norm_estimate: float) -> np.ndarray:
    """Residual a Ritz pair may have: tol·|θ|, floored at rounding level 100·ε·‖H‖."""
    return np.maximum(tol * np.abs(theta), 100 * eps * norm_estimate)


# A fresh draw within this cosine of the start vector is the start vector drawn again.
_SAME_DRAW = 0.5


def _fresh_direction(V: Tensor, generator: torch.Generator, allsum: Optional[Callable[[Tensor], Tensor]] = None,
                     avoid: Optional[Tensor] = None) -> Tensor:
    """A random unit vector orthogonal to the rows of V, drawn again while it lies within
    60° of ``avoid`` (the start vector). A generator seeded as the start vector's was
    (the default seeds 0; ``torch.randn(n, dtype=torch.float64)`` after
    ``torch.manual_seed(0)`` is such a start) draws the start vector itself, whose part
    outside the pairs found has no component along the copies the first run missed: the
    copy check then returned [5, 4] for [5, 5] as converged."""
    start = None if avoid is None else avoid.to(V.device, V.dtype)
    start_norm = None if start is None else norm(start, allsum)
    while True:
        z = torch.randn(V.shape[1], generator=generator, dtype=torch.float64).to(V.device, V.dtype)
        if start is None:
            break
        cosine = total(torch.dot(z, start)[None], allsum) / (norm(z, allsum) * start_norm)
        if abs(float(cosine[0])) < _SAME_DRAW:
            break
    z, _ = orthogonalize(V, z, allsum)
    return z / norm(z, allsum)
