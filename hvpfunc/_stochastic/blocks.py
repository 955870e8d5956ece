"""Per-layer (block) spectra: the trace and top eigenvalues of each diagonal block of H."""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .._eigen.lanczos import lanczos
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
from .._operator import Operator, check_count, eigen_tol, finite_rows, norm
from .._outcome import finish, probes_outcome
from .._precision import in_plain_autograd
from .._progress import Progress
from .._types import ChunkSize, MatvecFn, ProgressArg, Tree
from ..results import BlockSpectra, ConvergenceWarning, Status
from ..tree import leaves_with_paths
from .trace import _floored, _t975

Groups = Union[None, Callable[[str], str], Mapping]

# Plain Lanczos steps a block may take in lockstep (partial reorthogonalization, its
# basis held) before thick-restart Lanczos takes over for it.
_LOCKSTEP_STEPS = 60


@in_plain_autograd
def block_spectra(
    matvec: MatvecFn,
    params: Tree,
    groups: Groups = None,
    *,
    num_probes: int = 60,
    k: int = 1,
    tol: float = 1e-4,
    find_copies: bool = True,
    generator: Optional[torch.Generator] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> BlockSpectra:
    """Trace and top eigenvalues of every parameter group's diagonal block H_bb.

    The traces of all blocks come from the same Hutchinson probes: for a Rademacher z
    split into the groups' parts z_b, E[z_bᵀ(Hz)_b] = tr H_bb, so ``num_probes`` products
    give every block's trace, with a standard error each (Student-t widened, as in
    :func:`hvpfunc.trace`), and their sum estimates tr H. Each block's top ``k``
    eigenvalues are those of v_b ↦ (H [v_b; 0])_b, the Hessian of the loss in that group's
    parameters alone (products of the full H): :func:`hvpfunc.lanczos` (thick restarts,
    and for k ≥ 2 its copy check) on each block's restriction. Where products are
    batched (``chunk_size`` other than 1, "auto" on a GPU) and no copy check follows
    (k = 1, or ``find_copies=False``), the groups' Lanczos runs advance in lockstep
    instead, each step's products, one per group, in one ``vmap`` call; a group whose
    Krylov space closed, or still unconverged after 60 steps, goes on to
    :func:`hvpfunc.lanczos` from its Ritz vectors. Where a
    layer's curvature lives (PyHessian's and hessian-eigenthings' most-asked feature):
    ``shares`` are the blocks' traces over the whole trace.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``params``.
        params: the parameters, a tree whose leaf paths name the groups (a
            ``model_hvp_fn`` parameter dict: ``"0.weight"``, ...).
        groups: ``None`` (default): by module, the path up to its last ``.`` (weight and
            bias of a layer together); a callable ``path -> group name``; or a mapping
            ``group name -> paths``, each a name or a glob pattern (``"layers.*.attn.*"``),
            a list of them or one; together they must cover every leaf once.
        num_probes: Hutchinson probes for the traces (at least 2).
        k: top eigenvalues per block (0 skips the eigenvalues).
        tol: Lanczos's relative residual tolerance for them.
        find_copies: for k ≥ 2, look for further copies of each block's eigenvalues (and
            eigenvalues a single Krylov sequence missed) as :func:`hvpfunc.lanczos` does.
        generator: draws the probes and the Lanczos start vectors; default a CPU
            generator seeded with 0.
        chunk_size: probes per ``vmap`` call, as in :func:`hvpfunc.trace`.
        progress: ``True`` for a progress bar over the probes.

    Returns:
        :class:`~hvpfunc.BlockSpectra`: ``groups`` (names, in first-leaf order), per-group
        ``traces``, ``stderrs``, ``shares``, ``sizes`` (parameters), ``top`` (shape
        ``(groups, k)``) and ``converged``; ``table()`` formats them and ``plot()`` draws
        the shares.

    Raises:
        ValueError: ``num_probes`` < 2, ``k`` < 0, or ``groups`` that name unknown paths
            or do not cover every leaf exactly once.

    Example:
        >>> import torch, hvpfunc as hf
        >>> H = torch.diag(torch.tensor([4.0, 3.0, 1.0], dtype=torch.float64))
        >>> mv = lambda v: {"a.w": H[:2, :2] @ v["a.w"], "b.w": H[2:, 2:] @ v["b.w"]}
        >>> like = {"a.w": torch.zeros(2, dtype=torch.float64), "b.w": torch.zeros(1, dtype=torch.float64)}
        >>> res = hf.block_spectra(mv, like, num_probes=8)
        >>> res.groups, res.traces, res.top[:, 0]
        (('a', 'b'), tensor([7., 1.], dtype=torch.float64), tensor([4., 1.], dtype=torch.float64))
    """
    if check_count(num_probes, "num_probes") < 2:
        raise ValueError(f"block_spectra needs num_probes >= 2 for standard errors, got {num_probes}")
    if k < 0:
        raise ValueError(f"k must be at least 0, got {k}")
    op = Operator(matvec, params, name="params")
    tol = eigen_tol(tol, op, "block_spectra")
    names, members = _groups(op.layout.paths, groups)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # which group each entry of the flat vector belongs to
    owner = torch.cat([torch.full((size,), members[path], dtype=torch.long)
                       for path, size in zip(op.layout.paths, op.layout.sizes)]).to(op.device)
    op.expect(num_probes)
    bar = Progress(progress, total=num_probes, desc="block traces")
    samples: List[Tensor] = []
    magnitudes: List[Tensor] = []  # per group, Σ |z ⊙ Hz|: the rounding scale of its trace
    finite = True
    try:
        for Z, HZ in op.probe_blocks(num_probes, generator, chunk_size):
            forms = op.batch(Z, chunk_size=chunk_size, bar=bar, out=HZ).mul_(Z)
            per_group = torch.zeros(Z.shape[0], len(names), dtype=op.dtype, device=op.device)
            per_group.index_add_(1, owner, forms)
            per_group, finite = finite_rows(op.total(per_group))
            samples.append(per_group)
            magnitude = torch.zeros(Z.shape[0], len(names), dtype=op.dtype, device=op.device)
            magnitudes.append(op.total(magnitude.index_add_(1, owner, forms.abs_()))[: per_group.shape[0]])
            if not finite:
                break
    finally:
        bar.close()
    values = torch.cat(samples)
    count = values.shape[0]
    traces = values.mean(dim=0) if count else torch.full((len(names),), math.nan, dtype=op.dtype)
    stderrs = (_floored(values.std(dim=0) / math.sqrt(count) * _t975(count - 1) / 1.96, op,
                        torch.cat(magnitudes).mean(dim=0)) if count >= 2
               else torch.full((len(names),), math.nan, dtype=op.dtype, device=op.device))
    trace_products = op.num_matvecs
    top, converged, eig_products = _block_eigenvalues(op, owner, params, members, len(names), k, tol, generator,
                                                      chunk_size, find_copies)
    status, message = probes_outcome(finite, count, num_probes)
    if status is Status.CONVERGED and k and not bool(converged.all()):
        status = Status.MAX_ITERS
        missed = [names[i] for i in range(len(names)) if not bool(converged[i].all())]
        message = f"the top eigenvalues of {missed} did not converge to tol={tol}. {status.remedy}"
    elif status is Status.CONVERGED and k > 1 and not find_copies:
        message = ("find_copies=False: eigenvalues a single Krylov sequence misses (copies of a block's "
                   "eigenvalues, or neighbours inside a cluster it had not resolved) were not ruled out")
    sizes = torch.zeros(len(names), dtype=torch.long)
    for path, size in zip(op.layout.paths, op.layout.sizes):
        sizes[members[path]] += size
    result = BlockSpectra(
        groups=tuple(names), traces=traces, stderrs=stderrs, shares=traces / traces.sum(),
        sizes=sizes, top=top, converged=converged, num_matvecs=trace_products + eig_products,
        status=status, message=message,
    )
    return finish(result, "block_spectra")


def _groups(paths: Sequence[str], groups: Groups):
    """(group names in first-leaf order, path -> group index)."""
    if groups is None or callable(groups):
        label = groups if callable(groups) else _module_of
        names: List[str] = []
        members: Dict[str, int] = {}
        for path in paths:
            name = str(label(_plain(path)))
            if name not in names:
                names.append(name)
            members[path] = names.index(name)
        return names, members
    plain = {_plain(p): p for p in paths}
    members = {}
    names = list(groups)
    for i, name in enumerate(names):
        entries = [groups[name]] if isinstance(groups[name], str) else groups[name]
        for entry in entries:
            if any(c in entry for c in "*?["):
                found = fnmatch.filter(plain, entry)
                if not found:
                    raise ValueError(f"groups[{name!r}]'s pattern {entry!r} matches no parameter; "
                                     f"the parameters are {list(plain)}")
            elif entry not in plain:
                raise ValueError(f"groups[{name!r}] names {entry!r}, which is not a parameter; "
                                 f"the parameters are {list(plain)}")
            else:
                found = [entry]
            for member in found:
                if plain[member] in members:
                    raise ValueError(f"{member!r} is in two groups")
                members[plain[member]] = i
    missing = [p for p in plain if plain[p] not in members]
    if missing:
        raise ValueError(f"groups leave out {missing}: every parameter must be in one group")
    return names, members


def _plain(path: str) -> str:
    """A tree path as written in a state dict: ``['0.weight']`` -> ``0.weight``."""
    return path[2:-2] if path.startswith("['") and path.endswith("']") else path


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name


def _block_eigenvalues(op: Operator, owner: Tensor, params: Tree, members: Dict[str, int], count: int, k: int,
                       tol: float, generator: torch.Generator, chunk_size: ChunkSize, find_copies: bool):
    """Top-k eigenvalues of each block: thick-restart Lanczos (with its copy check for
    k ≥ 2) on each block's restriction, or, where products are batched and no check
    follows, lockstep Lanczos first and thick restarts for the blocks it did not settle;
    (values, converged, products)."""
    top = torch.full((count, k), math.nan, dtype=torch.float64)
    converged = torch.zeros(count, k, dtype=torch.bool)
    if not k:
        return top, converged, 0
    before = op.num_matvecs
    index = [torch.nonzero(owner == g).squeeze(1) for g in range(count)]
    # each block's dimension, over every rank's shards of a sharded vector
    sizes = [round(float(n)) for n in op.total(torch.tensor([float(i.numel()) for i in index], dtype=op.dtype,
                                                            device=op.device))]
    if op.resolve_chunk(chunk_size) == 1 or (k > 1 and find_copies):
        # Products one at a time (a CPU): lockstep saves nothing. From the same start
        # thick-restart Lanczos takes the same steps (a block's basis grows rather than
        # restarts; jobs benchmark, k = 3: 123 products on the CNN's blocks either way,
        # 191 on the transformer's). And where the copy check follows (k ≥ 2), it is
        # cheaper straight after Lanczos, which hands it the resolved Ritz vectors to
        # deflate, than after lockstep, which first re-converges the pairs: 150 products
        # against 238 on the CNN, 277 against 368 on the transformer (8 probes each).
        start = op.probes(1, generator)[0]  # one draw gives every block its start
        runs = [(torch.full((1,), math.nan, dtype=torch.float64), torch.zeros(1, dtype=torch.bool), start[idx], False)
                for idx in index]
    else:
        runs = _lockstep(op, index, sizes, k, tol, generator, chunk_size)
    products = op.num_matvecs - before
    leaves, spec = leaves_with_paths(params)
    for g, (values, ok, start, final) in enumerate(runs):
        kk = min(k, sizes[g])
        if not final and kk:  # thick restarts, from the block's best Ritz vectors if lockstep ran
            chosen = [i for i, (path, _) in enumerate(leaves) if members[path] == g]

            def block(v: Dict[str, Tensor], chosen=chosen) -> Dict[str, Tensor]:
                full = [v[str(i)] if i in chosen else torch.zeros_like(leaf) for i, (_, leaf) in enumerate(leaves)]
                out = torch.utils._pytree.tree_leaves(op.matvec(torch.utils._pytree.tree_unflatten(full, spec)))
                return {str(i): out[i] for i in chosen}

            whole = torch.zeros(owner.numel(), dtype=op.dtype, device=op.device)  # this rank's entries
            whole[index[g]] = start
            start_leaves = torch.utils._pytree.tree_leaves(op.layout.unflatten(whole))
            v0 = {str(i): start_leaves[i] for i in chosen}
            with warnings.catch_warnings():  # the result's status reports it
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = lanczos(block, v0, k=kk, tol=tol, generator=generator, find_copies=None if find_copies else False)
            values, ok = res.eigenvalues.double().cpu(), res.converged.cpu()
            products += res.num_matvecs
        top[g, :kk] = values
        converged[g, :kk] = ok
        converged[g, kk:] = True  # a block with fewer parameters than k has all it has
    return top, converged, products


def _lockstep(op: Operator, index: List[Tensor], sizes: List[int], k: int, tol: float,
              generator: torch.Generator, chunk_size: ChunkSize) -> List[tuple]:
    """Plain Lanczos with partial reorthogonalization on every block H_bb at once.

    The blocks advance together: each step's products, one per unfinished block (its
    Lanczos vector, zero outside the block), are one ``op.batch`` call, which ``vmap``s
    them where that is faster than a loop (``chunk_size="auto"`` times both). A block
    stops when its top ``k`` Ritz pairs have residuals at most tol·|θ| (floored at the
    rounding level 100 ε |θ_max|, as in :func:`hvpfunc.lanczos`), when its Krylov space is
    invariant, or after its step budget; the basis is then dropped. Returns per block
    (top values descending, converged flags, the sum of the top Ritz vectors as a warm
    start, whether the values are final). No copy check follows it: a block converged
    here may miss a copy of its eigenvalues. ``sizes``: the blocks' dimensions (over all
    ranks); ``index``: each block's entries of the (this rank's) flat vector. Each block's
    basis is kept semi-orthogonal as in :func:`hvpfunc.spectral_density` (Simon's
    estimate; the whole basis is read only where it nears √ε).
    """
    eps = torch.finfo(op.dtype).eps
    rounding = step_rounding(op)
    local = sum(op.layout.sizes)  # this rank's entries of a sharded vector, else all
    limits = [min(size, max(_LOCKSTEP_STEPS, 4 * k + 20)) for size in sizes]
    start = op.probes(1, generator)[0]
    bases = [empty_basis((limits[g], int(index[g].numel())), op.dtype, op.device)
             for g in range(len(index))]
    alphas: List[List[float]] = [[] for _ in index]
    betas: List[List[float]] = [[] for _ in index]
    # per block: Simon's estimates for its last two vectors, the scale of H_bb seen, and
    # whether the next step is reorthogonalized (the one after a reorthogonalized step is)
    estimates = [(np.zeros(limit + 1), np.zeros(limit + 1)) for limit in limits]
    scales, again = [0.0] * len(index), [False] * len(index)
    q = [start[idx] / op.total(start[idx] @ start[idx]).sqrt() for idx in index]
    # a block of no parameters (zero-size leaves only) has no eigenvalues to find
    results: List[Optional[tuple]] = [
        None if size else (torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool), start[idx], True)
        for size, idx in zip(sizes, index)]
    active = [g for g in range(len(index)) if sizes[g]]
    while active:
        Z = torch.zeros(len(active), local, dtype=op.dtype, device=op.device)
        for row, g in enumerate(active):
            Z[row, index[g]] = q[g]
        W = op.batch(Z, chunk_size=chunk_size)
        still = []
        for row, g in enumerate(active):
            j = len(alphas[g])
            bases[g][j] = q[g]
            V = bases[g][: j + 1]
            w, c = three_term(V[max(j - 1, 0) :], W[row, index[g]], op.allsum)
            beta_t = norm(w, op.allsum)
            host = torch.cat([c, beta_t[None]]).to("cpu", torch.float64).numpy()
            if cancelled(host[:-1], host[-1], eps, math.sqrt(eps)):
                w, again_c = three_term(V[max(j - 1, 0) :], w, op.allsum)
                c, beta_t = c + again_c, norm(w, op.allsum)
                host = torch.cat([c, beta_t[None]]).to("cpu", torch.float64).numpy()
            if j:
                check_symmetric(host[0], np.float64(betas[g][-1]), np.abs(host[-2]) + betas[g][-1],
                                symmetry_slack(eps))
            alphas[g].append(float(host[-2]))
            beta = float(host[-1])
            scales[g] = max(scales[g], float(np.abs(host[:-1]).max()))
            previous, current = estimates[g]
            estimate = orthogonality_estimate(
                np.array([alphas[g] + [0.0]]), np.array([betas[g] + [beta]]), np.array([beta]),
                previous[None], current[None], j, np.array([rounding * scales[g]]))[0]
            lost = j >= 2 and (again[g] or np.abs(estimate[: j - 1]).max() > math.sqrt(eps))
            if lost and beta > 100 * eps * scales[g]:  # (a closed Krylov space stops the block below)
                w, _, beta_t = reorthogonalize(V, w, op.allsum, beta_t)
                beta = float(beta_t)
                estimate[: j + 1] = rounding
                again[g] = not again[g]
            estimates[g] = (current, estimate)
            T = torch.diag(torch.tensor(alphas[g], dtype=torch.float64))
            if j:
                off = torch.tensor(betas[g], dtype=torch.float64)
                T += torch.diag(off, 1) + torch.diag(off, -1)
            theta, S = torch.linalg.eigh(T)
            kk = min(k, sizes[g])
            wanted = slice(max(j + 1 - kk, 0), j + 1)
            values = theta[wanted].flip(0)
            floor = 100 * eps * float(theta.abs().max())
            residuals = beta * S[-1, wanted].abs().flip(0)
            ok = residuals <= torch.clamp(tol * values.abs(), min=floor)
            invariant = beta <= floor
            found = values.numel() == kk and bool(ok.all())
            if found or invariant or j + 1 == limits[g]:
                # A Krylov space that closed before spanning the block saw only part of
                # it (a scalar block closes after one step, with k >= 2 asked for):
                # thick-restart Lanczos goes on from the Ritz vectors with fresh directions.
                spanned = j + 1 == sizes[g]  # T's eigenvalues are the block's
                final = spanned or (found and not invariant)
                padded = torch.full((kk,), math.nan, dtype=torch.float64)
                padded[: values.numel()] = values
                ritz = (S[:, wanted].to(op.dtype).to(op.device).sum(dim=1)) @ V
                # final values have converged (or are exact); the others are replaced
                results[g] = (padded, torch.full((kk,), final), ritz, final)
                continue
            betas[g].append(beta)
            q[g] = w / beta
            still.append(g)
        active = still
    return results
