"""A user's matvec seen by the solvers: flat storage, tree interface, counted calls.

Solvers keep their Krylov bases and iterates as rows of one ``(.., n)`` tensor, so that
orthogonalizing against a basis is one matrix product rather than one per leaf. The
matvec never sees that layout: it receives trees whose leaves are views into those
rows (zero-copy when the tree has one dtype), and only its output is copied into a row.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from ._precision import deterministic, user_stacklevel
from ._sharding import Sharding, is_dtensor, local, rank_generator
from ._types import ChunkSize, MatvecFn, Tree
from .tree import check_like, check_tree, leaves_with_paths

# On GPUs vmap over many tangents costs far less per vector than a loop, so "auto"
# batches there. On CPUs vmap only amortizes per-operator overhead, which dominates small
# products alone (DESIGN.md and benchmarks/ have the figures): "auto" times 16 looped
# products and, if one takes under _VMAP_TRIAL_SECONDS (too short to touch much memory, so
# 16 at once stay small), one vmapped chunk, and keeps the faster. Every product of the
# trial is used.
_AUTO_CHUNK = 16
_VMAP_TRIAL_SECONDS = 5e-3


class Layout:
    """Offsets of a tree's leaves inside a flat vector of length ``n``."""

    def __init__(self, like: Tree, *, name: str):
        check_tree(like, name=name)
        named, self.spec = leaves_with_paths(like)
        self.paths = [p for p, _ in named]
        leaves = [leaf for _, leaf in named]
        # DTensor leaves: the flat vector holds this rank's shards (see _sharding)
        self.sharding = Sharding(leaves, self.paths, name) if any(map(is_dtensor, leaves)) else None
        pieces = [local(leaf) for leaf in leaves]
        self.shapes = [tuple(piece.shape) for piece in pieces]
        self.dtypes = [leaf.dtype for leaf in leaves]
        self.sizes = [piece.numel() for piece in pieces]
        self.n = sum(leaf.numel() for leaf in leaves)  # the dimension; this rank holds sum(sizes)
        self.device = leaves[0].device
        for path, leaf in named:
            if leaf.device != self.device:
                raise ValueError(
                    f"{name}{path} is on {leaf.device} but {name}{self.paths[0]} is on "
                    f"{self.device}; solvers need every leaf on one device"
                )
        # Solvers compute in the widest leaf dtype and at least float32: a bfloat16 or
        # float16 Krylov basis loses orthogonality at once, and its rounding level
        # (ε ≈ 1e-2) would pass any residual test.
        self.dtype = torch.float32
        for dt in self.dtypes:
            self.dtype = torch.promote_types(self.dtype, dt)
        # rounding level of the products themselves: that of the least precise leaf
        self.product_eps = max(torch.finfo(dt).eps for dt in self.dtypes)

    def flatten(self, tree: Tree, batch_dims: int = 0, out: Optional[Tensor] = None) -> Tensor:
        """Copy a tree (with ``batch_dims`` leading dims per leaf) into ``(*batch, n)``
        (into ``out`` if given), detached: solvers do not differentiate through their
        vectors (a start vector that requires grad must not make the basis a graph)."""
        leaves = pytree.tree_leaves(tree)
        lead = tuple(leaves[0].shape[:batch_dims])
        parts = [local(leaf).detach().reshape(*lead, -1).to(self.dtype) for leaf in leaves]
        return torch.cat(parts, dim=-1) if out is None else torch.cat(parts, dim=-1, out=out)

    def unflatten(self, vec: Tensor) -> Tree:
        """Views of ``vec`` (shape ``(*batch, n)``) as a tree with leading dims ``batch``."""
        lead = tuple(vec.shape[:-1])
        parts = torch.split(vec, self.sizes, dim=-1)
        leaves = [
            part.reshape(lead + shape).to(dtype)
            for part, shape, dtype in zip(parts, self.shapes, self.dtypes)
        ]
        if self.sharding is not None:
            leaves = self.sharding.rebuild(leaves, lead)
        return pytree.tree_unflatten(leaves, self.spec)


class Operator:
    """Wraps ``matvec`` (tree -> tree) as a counted map on flat vectors.

    The output of the first call is checked against ``like`` (structure, shapes, dtypes),
    so a matvec that returns something else fails with a message naming the leaf.
    """

    def __init__(self, matvec: MatvecFn, like: Tree, *, name: str = "v0"):
        if not callable(matvec):
            raise TypeError(f"matvec must be callable, got {type(matvec).__name__}")
        self.matvec = matvec
        self.like = like
        self.layout = Layout(like, name=name)
        self.n = self.layout.n
        # completes a sum over the vector dimension: an all-reduce for sharded vectors,
        # None (nothing to do) otherwise
        self.allsum: Optional[Callable[[Tensor], Tensor]] = (
            self.layout.sharding.allsum if self.layout.sharding is not None else None)
        self.dtype = self.layout.dtype
        self.device = self.layout.device
        self.num_matvecs = 0
        self._checked = False
        # chunk_size="auto"'s trials on CPUs: the matvec's record where it keeps one (a
        # Matvec of mode "auto", shared per f and input signature), else this operator's
        remembered = getattr(matvec, "chunk_trials", None)
        self._seconds_per_row: Dict[int, float] = remembered if isinstance(remembered, dict) else {}
        self._vmap_error: Optional[BaseException] = None  # why "auto" stopped using vmap
        # A matvec may bring its own product of a stacked batch (data_parallel: vmap of
        # the local matvec, then one collective). "auto" then batches by a fixed rule,
        # never by timing: every rank must make the same calls.
        self._batched: Optional[Callable[[Tree], Tree]] = getattr(matvec, "batched_matvec", None)
        # On a CPU the last product's tree stays referenced until the next product returns:
        # freed as soon as it was copied out, a small CNN's Hessian trace took 40k-57k
        # page faults and 12% more time per product than PyHessian's (whose loop holds
        # its last product), 9k-21k and the same time with this one tree held. Likely
        # its leaves, allocated at the end of the backward pass, sit above the memory of
        # the product's temporaries in glibc's heap: freed, they let that memory join
        # the heap's top, which glibc gives back to the system at once.
        self._held: Any = None

    def resolve_chunk(self, chunk_size: ChunkSize) -> int | None:
        """:func:`resolve_chunk` for this operator: ``"auto"`` is 16 also on a CPU for a
        matvec with its own batched product."""
        if self.layout.sharding is not None:
            return 1  # sharded vectors do not stack under vmap
        if chunk_size == "auto" and self._batched is not None:
            return _AUTO_CHUNK
        return resolve_chunk(chunk_size, self.device)

    def total(self, t: Tensor) -> Tensor:
        """:func:`total` with this operator's ``allsum``."""
        return total(t, self.allsum)

    def expect(self, count: int) -> None:
        """Tell the matvec (a :class:`~hvpfunc.Matvec` in ``"auto"`` mode) that ``count``
        products will follow; other callables are not told."""
        hint = getattr(self.matvec, "expect_products", None)
        if callable(hint):
            hint(count)

    def probes(self, count: int, generator: Optional[torch.Generator], out: Optional[Tensor] = None) -> Tensor:
        """``count`` Rademacher rows (entries ±1), drawn one row at a time on the
        generator's device, so that the numbers depend on the generator alone, not on
        how the rows are chunked or on the operator's device.

        Each row draws one random byte per 8 entries and looks up its 8 signs (a
        256 × 8 table): a draw per entry (``randint(0, 2)``) took 2.5 ms for a
        400k-parameter row on a CPU, a third of the product it feeds; this takes 0.5 ms.
        The rows are written into ``out`` (``(count, n)``, on the operator's device) if
        given.
        """
        device = generator.device if generator is not None else torch.device("cpu")
        size = sum(self.layout.sizes)
        if self.layout.sharding is not None and count:
            generator = rank_generator(generator)  # this rank's part
        rows = torch.empty(count, size, dtype=self.dtype, device=device) if out is None or out.device != device else out
        if count:
            bits = (torch.arange(256, device=device)[:, None] >> torch.arange(8, device=device)) & 1
            signs = bits.to(self.dtype).mul_(2).sub_(1)  # row b: the signs of byte b's bits
            whole = size // 8
            for row in rows:
                draw = torch.randint(0, 256, ((size + 7) // 8,), generator=generator, device=device)
                # the whole bytes' signs go straight into the row, without a temporary
                torch.index_select(signs, 0, draw[:whole], out=row[: 8 * whole].view(whole, 8))
                if size > 8 * whole:
                    row[8 * whole :] = signs[draw[whole], : size - 8 * whole]
        if out is not None and rows is not out:
            return out.copy_(rows)
        return rows.to(self.device)

    def probe_blocks(
        self, count: int, generator: Optional[torch.Generator], chunk_size: ChunkSize
    ) -> Iterator[Tuple[Tensor, Tensor]]:
        """``count`` Rademacher probes (:meth:`probes`) a block at a time (the block
        :func:`block_size` gives for ``chunk_size``), each with a buffer of its shape for
        the products (``batch(Z, ..., out=buffer)``). Both are allocated once and reused:
        memory holds one block, and nothing is mapped afresh per block (fresh blocks of a
        400k-parameter model were memory the allocator faulted in every time). A block is
        overwritten by the next, so use it before asking for that one."""
        step = block_size(chunk_size, count, self.device)
        probes = torch.empty(min(step, count), sum(self.layout.sizes), dtype=self.dtype, device=self.device)
        products = torch.empty_like(probes)
        for start in range(0, count, step):
            size = min(step, count - start)
            yield self.probes(size, generator, out=probes[:size]), products[:size]

    def flatten_input(self, tree: Tree, *, name: str) -> Tensor:
        """Check a user vector against ``like`` and return it flat (a copy)."""
        check_like(tree, self.like, name=name, like_name="the operator's vectors")
        return self.layout.flatten(tree)

    def _check_output(self, out: Tree, batch_dims: int) -> None:
        if not self._checked:
            check_like(out, self.like, name="matvec(v)", like_name="v", batch_dims=batch_dims)
            self._checked = True

    def __call__(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """H x, flat (written into ``out`` if given)."""
        product = self.matvec(self.layout.unflatten(x))
        self._check_output(product, 0)
        self.num_matvecs += 1
        flat = self.layout.flatten(product, out=out)
        if self.device.type == "cpu":
            self._held = product
        return flat

    def batch(self, X: Tensor, *, chunk_size: ChunkSize, bar: Any = None, out: Optional[Tensor] = None) -> Tensor:
        """Apply the matvec to every row of ``X`` (``(b, n)``) through ``torch.func.vmap``.

        ``chunk_size`` rows go through one ``vmap`` call (memory grows with it);
        ``chunk_size=1`` calls the matvec row by row without ``vmap``, for matvecs that
        do not support it; ``None`` puts all rows through one call; ``"auto"`` is 16 on
        a GPU and, on a CPU, whichever of a loop and chunks of 16 its trial found faster
        (see ``_VMAP_TRIAL_SECONDS``). ``bar`` (a ``Progress``) advances by the rows
        done after each chunk. The products are written into ``out`` (shaped like X) if
        given, which a loop over blocks of probes reuses.
        """
        b = X.shape[0]
        auto = chunk_size == "auto"
        fixed = None if auto else resolve_chunk(chunk_size, self.device)
        # every product is written into its row of one result: per-chunk outputs joined by
        # torch.cat copied each product once more (53 MB for a 33-probe sketch of a
        # 400k-parameter model, in memory the allocator maps afresh)
        result = torch.empty(b, X.shape[-1], dtype=self.dtype, device=self.device) if out is None else out
        start = 0
        while start < b:
            step = self._auto_chunk() if auto else max(b if fixed is None else fixed, 1)
            rows = X[start : start + (_AUTO_CHUNK if auto else step)]
            trial = (auto and self._batched is None and self.device.type != "cuda" and not deterministic()
                     and step not in self._seconds_per_row)
            if trial and step == 1 and self.num_matvecs == 0 and rows.shape[0] > 1:
                self._rows(rows[:1], 1, result[start : start + 1])  # the first product pays one-off costs
                done, rows = 1, rows[1:]
            else:
                done = 0
            into = result[start + done : start + done + rows.shape[0]]
            began = time.perf_counter()
            try:
                self._rows(rows, step, into)
            except Exception as err:
                if not auto or step == 1:
                    raise
                # A matvec that cannot run under vmap (NumPy inside, .item(), collectives):
                # "auto" loops from now on; a real error in the matvec raises in the loop.
                self._vmap_error = err
                self._rows(rows, 1, into)
            if trial:  # a failed vmap is remembered as infinitely slow: later calls loop at once
                seconds = (time.perf_counter() - began) / rows.shape[0]
                self._seconds_per_row[step] = math.inf if self._vmap_error is not None else seconds
            start += done + rows.shape[0]
            if bar is not None:
                bar.update(steps=done + rows.shape[0])
        return result

    def _auto_chunk(self) -> int:
        if self._vmap_error is not None or self.layout.sharding is not None:
            return 1
        if self.device.type == "cuda" or self._batched is not None:
            return _AUTO_CHUNK
        if deterministic():  # no trial: its timing would pick the products' kernels
            return 1
        loop = self._seconds_per_row.get(1)
        if loop is None or loop >= _VMAP_TRIAL_SECONDS:
            return 1
        batched = self._seconds_per_row.get(_AUTO_CHUNK)
        return _AUTO_CHUNK if batched is None or batched < loop else 1

    def _rows(self, rows: Tensor, step: int, out: Tensor) -> None:
        """The products of ``rows`` into ``out``: one matvec call per row for
        ``step == 1``, else ``vmap`` calls of ``step`` rows."""
        if step == 1 or self.layout.sharding is not None:  # sharded vectors do not stack under vmap
            for row, into in zip(rows, out):
                self(row, out=into)
            return
        for start in range(0, rows.shape[0], step):
            batched = self._batched or torch.func.vmap(self.matvec)
            product = batched(self.layout.unflatten(rows[start : start + step]))
            self._check_output(product, 1)
            self.num_matvecs += min(step, rows.shape[0] - start)
            self.layout.flatten(product, batch_dims=1, out=out[start : start + step])


def resolve_chunk(chunk_size: ChunkSize, device: torch.device) -> int | None:
    """``"auto"`` -> 16 on a GPU, 1 elsewhere (for grouping decisions made before any
    product, such as SLQ's probes per group); validates the rest."""
    if chunk_size == "auto":
        return _AUTO_CHUNK if device.type == "cuda" else 1
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, None or 'auto', got {chunk_size!r}")
    return chunk_size


def block_size(chunk_size: ChunkSize, count: int, device: torch.device) -> int:
    """How many probes to draw and hold at once for ``op.batch(block, chunk_size=...)``:
    one chunk, or 16 for ``"auto"`` (the largest chunk it uses)."""
    if chunk_size == "auto":
        return _AUTO_CHUNK
    resolved = resolve_chunk(chunk_size, device)
    return max(count if resolved is None else resolved, 1)


def check_count(value: Any, name: str) -> int:
    """A count (products, probes, steps, terms) as an int: an integer (numpy's too), not
    a bool or a float, whose fractional part no solver could honour; a float reached
    numpy and torch as "empty() takes 1 positional argument but 2 were given"."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_start(x: Tensor, *, name: str, allsum: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """A start vector must be finite and nonzero (on every rank's shards together)."""
    counts = total(torch.stack([(~torch.isfinite(x)).sum(), (x != 0).sum()]), allsum)
    if int(counts[0]):
        raise ValueError(f"{name} has non-finite entries (nan or inf); pass a finite start vector")
    if not int(counts[1]):
        raise ValueError(f"{name} is the zero vector; pass a nonzero start vector")


def total(t: Tensor, allsum: Optional[Callable[[Tensor], Tensor]]) -> Tensor:
    """Sums over the vector dimension (this rank's part), completed over the ranks by
    ``allsum`` for sharded vectors; t itself otherwise."""
    return t if allsum is None else allsum(t)


def finite_rows(samples: Tensor) -> Tuple[Tensor, bool]:
    """The rows of ``samples`` (per-probe values, one row each) before the first with a
    non-finite entry, and whether there was none: an estimator keeps the probes before
    the first non-finite product and spends no more."""
    ok = torch.isfinite(samples) if samples.dim() == 1 else torch.isfinite(samples).all(dim=1)
    if bool(ok.all()):
        return samples, True
    return samples[: int(ok.to(torch.int8).argmin())], False


def rowdot(A: Tensor, B: Tensor) -> Tensor:
    """⟨A_i, B_i⟩ for every row of two ``(b, n)`` tensors (this rank's part for sharded
    vectors: complete it with :func:`total`). On a CPU one dot product per row:
    ``(A * B).sum(1)`` and ``vecdot`` build a temporary as large as the block (which the
    allocator maps afresh for large blocks; for one 400k row, twice a dot's time), and
    batched matrix products were 12x slower."""
    if A.device.type != "cpu" or A.shape[0] == 0:
        return (A * B).sum(dim=1)
    if A.shape[0] == 1:
        return torch.dot(A[0], B[0])[None]
    return torch.stack([torch.dot(a, b) for a, b in zip(A, B)])


def norm(x: Tensor, allsum: Optional[Callable[[Tensor], Tensor]], dim: int = -1, keepdim: bool = False) -> Tensor:
    """‖x‖ along ``dim``, over every rank's shards when ``allsum`` completes sums."""
    if allsum is None:
        return torch.linalg.vector_norm(x, dim=dim, keepdim=keepdim)
    return allsum(x.square().sum(dim=dim, keepdim=keepdim)).sqrt()


def isfinite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


# A relative residual below this many rounding units of the products' precision is out
# of reach: rounding H·v alone leaves about ε·‖b‖ at the solution, and the iterates'
# rounding adds up to ε·κ·‖b‖ (the solvers then say that they stall).
_TOL_FLOOR = 2.0


def attainable_tol(tol: float, eps: float, solver: str) -> float:
    """``tol``, or ``2 ε`` with a warning when ``tol`` is below it (ε the unit roundoff
    of the products): a solver asked for more than the precision holds would iterate to
    its budget, or worse, chase rounding noise; an eigensolver's residual estimates would
    fall below the products' own rounding and pass. Warns at the public function's caller."""
    floor = _TOL_FLOOR * eps
    if tol >= floor:
        return tol
    warnings.warn(
        f"{solver}: tol={tol:.3g} is below what products with unit roundoff {eps:.3g} can resolve; "
        f"solving to tol={floor:.3g} ({_TOL_FLOOR:g} ε) instead. Give float64 vectors (and a float64 matvec) "
        "for a tighter solve.",
        UserWarning,
        stacklevel=user_stacklevel(),
    )
    return floor


def eigen_tol(tol: float, op: Operator, solver: str) -> float:
    """An eigensolver's ``tol``, raised by :func:`attainable_tol` where the products are
    less precise than the solver's arithmetic (half-precision parameters; the solver
    computes in float32 at least). Its residuals then come from a recurrence that
    assumes exact products: with bfloat16 products, Lanczos at tol 1e-6 reported
    residuals of 3e-6·|θ| for eigenvalues 2e-4 off, marked converged. In float32 and
    float64 the rounding floor of the residual test covers this."""
    if op.layout.product_eps > torch.finfo(op.dtype).eps:
        return attainable_tol(tol, op.layout.product_eps, solver)
    return tol
