"""Per-layer (block) spectra: the trace and top eigenvalues of each diagonal block of H."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .._eigen.lanczos import lanczos
from .._operator import Operator, block_size
from .._outcome import finish, probes_outcome
from .._progress import Progress
from .._types import ChunkSize, MatvecFn, ProgressArg, Tree
from ..results import BlockSpectra, ConvergenceWarning, Status
from ..tree import leaves_with_paths, random_like
from .trace import _t975

Groups = Union[None, Callable[[str], str], Mapping]


def block_spectra(
    matvec: MatvecFn,
    params: Tree,
    groups: Groups = None,
    *,
    num_probes: int = 60,
    k: int = 1,
    tol: float = 1e-4,
    generator: Optional[torch.Generator] = None,
    chunk_size: ChunkSize = "auto",
    progress: ProgressArg = False,
) -> BlockSpectra:
    """Trace and top eigenvalues of every parameter group's diagonal block H_bb.

    The traces of all blocks come from the same Hutchinson probes: for a Rademacher z
    split into the groups' parts z_b, E[z_bᵀ(Hz)_b] = tr H_bb, so ``num_probes`` products
    give every block's trace, with a standard error each (Student-t widened, as in
    :func:`hvpfunc.trace`), and their sum estimates tr H. Each block's top ``k``
    eigenvalues come from :func:`hvpfunc.lanczos` on v_b ↦ (H [v_b; 0])_b, the Hessian of
    the loss in that group's parameters alone (one Lanczos run per group, products of the
    full H). Where a layer's curvature lives (PyHessian's and hessian-eigenthings'
    most-asked feature): ``shares`` are the blocks' traces over the whole trace.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``params``.
        params: the parameters, a tree whose leaf paths name the groups (a
            ``model_hvp_fn`` parameter dict: ``"0.weight"``, ...).
        groups: ``None`` (default): by module, the path up to its last ``.`` (weight and
            bias of a layer together); a callable ``path -> group name``; or a mapping
            ``group name -> list of paths``, which must cover every leaf once.
        num_probes: Hutchinson probes for the traces (at least 2).
        k: top eigenvalues per block (0 skips the eigenvalues).
        tol: Lanczos's relative residual tolerance for them.
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
    if num_probes < 2:
        raise ValueError(f"block_spectra needs num_probes >= 2 for standard errors, got {num_probes}")
    if k < 0:
        raise ValueError(f"k must be at least 0, got {k}")
    op = Operator(matvec, params, name="params")
    names, members = _groups(op.layout.paths, groups)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    # which group each entry of the flat vector belongs to
    owner = torch.cat([torch.full((size,), members[path], dtype=torch.long)
                       for path, size in zip(op.layout.paths, op.layout.sizes)]).to(op.device)
    op.expect(num_probes)
    bar = Progress(progress, total=num_probes, desc="block traces")
    samples: List[Tensor] = []
    finite = True
    try:
        step = block_size(chunk_size, num_probes, op.device)
        for start in range(0, num_probes, step):
            Z = op.probes(min(step, num_probes - start), generator)
            forms = Z * op.batch(Z, chunk_size=chunk_size, bar=bar)
            per_group = torch.zeros(Z.shape[0], len(names), dtype=op.dtype, device=op.device)
            per_group.index_add_(1, owner, forms)
            per_group = op.total(per_group)
            ok = torch.isfinite(per_group).all(dim=1)
            if not bool(ok.all()):
                samples.append(per_group[: int(ok.to(torch.int8).argmin())])
                finite = False
                break
            samples.append(per_group)
    finally:
        bar.close()
    values = torch.cat(samples)
    count = values.shape[0]
    traces = values.mean(dim=0) if count else torch.full((len(names),), math.nan, dtype=op.dtype)
    stderrs = (values.std(dim=0) / math.sqrt(count) * _t975(count - 1) / 1.96 if count >= 2
               else torch.full((len(names),), math.nan, dtype=op.dtype, device=op.device))
    trace_products = op.num_matvecs
    top, converged, eig_products = _block_eigenvalues(matvec, params, op.layout.paths, members, len(names), k,
                                                      tol, generator)
    status, message = probes_outcome(finite, count, num_probes)
    if status is Status.CONVERGED and k and not bool(converged.all()):
        status = Status.MAX_ITERS
        missed = [names[i] for i in range(len(names)) if not bool(converged[i].all())]
        message = f"the top eigenvalues of {missed} did not converge to tol={tol}. {status.remedy}"
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
        for member in groups[name]:
            if member not in plain:
                raise ValueError(f"groups[{name!r}] names {member!r}, which is not a parameter; "
                                 f"the parameters are {list(plain)}")
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


def _block_eigenvalues(matvec: MatvecFn, params: Tree, paths: Sequence[str], members: Dict[str, int],
                       count: int, k: int, tol: float, generator: torch.Generator):
    """Top-k eigenvalues of each block by Lanczos on its restriction; (values, converged,
    products)."""
    top = torch.full((count, k), math.nan, dtype=torch.float64)
    converged = torch.zeros(count, k, dtype=torch.bool)
    products = 0
    if not k:
        return top, converged, products
    leaves, spec = leaves_with_paths(params)
    for g in range(count):
        chosen = [i for i, (path, _) in enumerate(leaves) if members[path] == g]
        like = {str(i): leaves[i][1] for i in chosen}

        def block(v: Dict[str, Tensor], chosen=chosen) -> Dict[str, Tensor]:
            full = [v[str(i)] if i in chosen else torch.zeros_like(leaf) for i, (_, leaf) in enumerate(leaves)]
            out = torch.utils._pytree.tree_leaves(matvec(torch.utils._pytree.tree_unflatten(full, spec)))
            return {str(i): out[i] for i in chosen}

        size = sum(leaves[i][1].numel() for i in chosen)
        kk = min(k, size)
        with warnings.catch_warnings():  # the result's status reports it
            warnings.simplefilter("ignore", ConvergenceWarning)
            res = lanczos(block, random_like(like, generator=generator, kind="gaussian"), k=kk, tol=tol)
        top[g, :kk] = res.eigenvalues.double().cpu()
        converged[g, :kk] = res.converged.cpu()
        converged[g, kk:] = True  # a block with fewer parameters than k has all it has
        products += res.num_matvecs
    return top, converged, products
