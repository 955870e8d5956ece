"""Solvers against the peers on one small network, with dense references.

The network is small enough (about 3,900 parameters) for its dense Hessian to be the
reference: eigenvalues from ``torch.linalg.eigvalsh`` and the exact trace, both in
float64. Solvers run in float32 like the peers, except the ARPACK comparison.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import Callable, Dict, List

import numpy as np
import torch
from torch import nn

import hvpfunc as hf
from hvpfunc.testing import dense_matrix

from . import peers
from .harness import median_seconds, memory_column, outside_products, table, timed_peak_runs


def _problem(device: torch.device, tiny: bool):
    torch.manual_seed(0)
    widths = (8, 16, 4) if tiny else (32, 64, 24, 10)  # 3,922 parameters at full size
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Tanh())
    model = nn.Sequential(*layers).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, widths[0], generator=gen).to(device)
    y = torch.randint(0, widths[-1], (512,), generator=gen).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(50):  # away from initialization, where spectra are atypical
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


_RUNS = 4  # one warm-up run, then the median of three


_CG_DAMPING = 1.0  # makes the network Hessian positive definite, so CG runs all its iterations


def _timed(fn: Callable, device: torch.device):
    """(result of the last run, median seconds of runs 2–4, the peak-memory cell of
    those runs: none on CPU); product counters wrapped around ``fn`` see ``_RUNS`` runs
    and are divided by it."""
    return timed_peak_runs(fn, device, runs=_RUNS)


def run(device: torch.device, *, tiny: bool = False) -> str:
    model, x, y = _problem(device, tiny)
    model64 = copy.deepcopy(model).double()
    mv64, params64 = hf.model_hvp_fn(model64, nn.functional.cross_entropy, (x.double(), y))
    H = dense_matrix(mv64, params64, chunk_size=256)
    exact = torch.linalg.eigvalsh(H).cpu()
    top5 = exact.flip(0)[:5]
    exact_trace = float(exact.sum())
    n = H.shape[0]
    mv, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    t_product = median_seconds(lambda: mv(params), device)

    def err(values) -> str:
        got = torch.as_tensor(np.sort(np.asarray(values, dtype=np.float64))[::-1].copy())
        return f"{float(((got[:5] - top5).abs() / top5.abs()).max()):.1e}"

    rows = []
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    res, seconds, memory = _timed(lambda: hf.lanczos(mv, v0, k=5, tol=1e-6), device)
    rows.append(["hvpfunc lanczos(k=5, tol=1e-6)", f"{seconds:.3f}", res.num_matvecs, err(res.eigenvalues.cpu()), *memory])

    if peers.installed()["PyHessian"]:
        ph = sys.modules["pyhessian.hessian"]  # the package's `hessian` class shadows the module
        counter: Dict[str, int] = {}
        original = ph.hessian_vector_product
        ph.hessian_vector_product = peers.counted(original, counter)
        try:
            torch.manual_seed(0)
            h = peers.pyhessian(model, (x, y))
            values, seconds, memory = _timed(lambda: h.eigenvalues(top_n=5)[0], device)
        finally:
            ph.hessian_vector_product = original
        rows.append(["PyHessian eigenvalues(top_n=5), defaults (tol 1e-3)", f"{seconds:.3f}", counter["n"] // _RUNS, err(values), *memory])
    if peers.installed()["hessian-eigenthings"]:
        from hessian_eigenthings import lanczos as he_lanczos

        op = peers.eigenthings_operator(copy.deepcopy(model), (x, y))
        counter = {}
        op.matvec = peers.counted(op.matvec, counter)
        result, seconds, memory = _timed(lambda: he_lanczos(op, k=5, which="LA", seed=0), device)
        rows.append(["hessian-eigenthings lanczos(k=5), defaults", f"{seconds:.3f}", counter["n"] // _RUNS,
                     err(result.eigenvalues.cpu()), *memory])
    if peers.installed()["curvlinops"]:
        from scipy.sparse.linalg import LinearOperator, eigsh

        H_op = peers.curvlinops_operator(copy.deepcopy(model), (x, y)).to_scipy()
        counter = {}
        A = LinearOperator(H_op.shape, matvec=peers.counted(H_op.matvec, counter), dtype=H_op.dtype)
        vals, seconds, memory = _timed(lambda: eigsh(A, k=5, which="LA", tol=1e-6)[0], device)
        rows.append(["curvlinops + scipy eigsh(k=5, tol=1e-6)", f"{seconds:.3f}", counter["n"] // _RUNS, err(vals), *memory])

    # ARPACK's product count on the same float64 operator, tolerance 1e-8
    from scipy.sparse.linalg import LinearOperator, eigsh

    v064 = hf.tree.random_like(params64, generator=torch.Generator().manual_seed(0), kind="gaussian")
    res64, seconds, memory = _timed(lambda: hf.lanczos(mv64, v064, k=5, tol=1e-8), device)
    rows.append(["hvpfunc lanczos(k=5, tol=1e-8), float64", f"{seconds:.3f}", res64.num_matvecs, err(res64.eigenvalues.cpu()), *memory])
    A64 = hf.to_scipy(mv64, params64)
    counter = {}
    B = LinearOperator(A64.shape, matvec=peers.counted(A64.matvec, counter), dtype=np.float64)
    vals, seconds, memory = _timed(lambda: eigsh(B, k=5, which="LA", tol=1e-8)[0], device)
    rows.append(["scipy eigsh (ARPACK) on hf.to_scipy, tol=1e-8, float64", f"{seconds:.3f}", counter["n"] // _RUNS, err(vals), *memory])

    out = [f"### Top-5 eigenvalues of an MLP Hessian ({n:,} parameters, batch 512)\n",
           f"Error: max relative error of the 5 eigenvalues against eigvalsh of the dense float64 Hessian. "
           f"One product: {t_product * 1e3:.2f} ms.\n",
           table(["solver", "seconds", "products", "max rel. error", *memory_column(device, "peak MiB")],
                 rows), ""]

    rows = []
    seeds = range(5)
    runs = [(f"hvpfunc trace({m!r}, 100 probes)", {"method": m}) for m in ("hutchinson", "hutch++")]
    # Probes through vmap in chunks against a loop over probes: the same 100 products.
    runs += [(f"hvpfunc trace('hutchinson', 100 probes, chunk_size={c}): {how}", {"method": "hutchinson", "chunk_size": c})
             for c, how in ((1, "a loop over probes"), (16, "vmap over 16 probes at a time"))]
    for label, options in runs:
        errs, times = [], []
        for s in seeds:
            res, seconds, memory = _timed(lambda: hf.trace(mv, params, num_probes=100, generator=torch.Generator().manual_seed(s),
                                                   **options), device)
            errs.append(abs(float(res.estimate) - exact_trace) / abs(exact_trace))
            times.append(seconds)
        rows.append([label, f"{np.mean(times):.3f}", 100, f"{np.mean(errs):.1e}", *memory])
    if peers.installed()["PyHessian"]:
        ph = sys.modules["pyhessian.hessian"]
        original = ph.hessian_vector_product
        for tol, label in ((1e-3, "defaults (tol 1e-3)"), (0.0, "tol=0: the same 100 products")):
            errs, times, counts = [], [], []
            for s in seeds:
                counter = {}
                ph.hessian_vector_product = peers.counted(original, counter)
                try:
                    torch.manual_seed(s)
                    h = peers.pyhessian(model, (x, y))
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        samples, seconds, memory = _timed(lambda h=h, tol=tol: h.trace(maxIter=100, tol=tol), device)
                finally:
                    ph.hessian_vector_product = original
                errs.append(abs(float(np.mean(samples)) - exact_trace) / abs(exact_trace))
                times.append(seconds)
                counts.append(counter["n"] / _RUNS)
            rows.append([f"PyHessian trace(maxIter=100), {label}", f"{np.mean(times):.3f}",
                         f"{np.mean(counts):.0f}", f"{np.mean(errs):.1e}", *memory])
    out += [f"### Trace of the same Hessian (exact {exact_trace:.4g}; mean over {len(seeds)} seeds)\n",
            table(["estimator", "seconds", "products", "mean rel. error", *memory_column(device, "peak MiB (last seed)")],
                  rows), ""]

    # Time outside the products, the products timed inside each solve. CG's recurrence
    # is shared with cg_batched (rows of (K, n) tensors); its cost per iteration is also
    # measured against a dense operator whose product is ~free.
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        # tol at the float32 floor: the runs are timed per iteration, up to 100 of them
        for label, solve, what in (
            ("lanczos(k=5, tol=1e-6)", lambda m: hf.lanczos(m, v0, k=5, tol=1e-6),
             "orthogonalization, small eigenproblems, checks"),
            ("cg (damping 1, up to 100 iterations)",
             lambda m: hf.cg(m, params, damping=_CG_DAMPING, tol=3e-7, max_iters=100), "vector updates, checks"),
            ("minres (damping 1, up to 100 iterations)",
             lambda m: hf.minres(m, params, damping=_CG_DAMPING, tol=3e-7, max_iters=100), "vector updates, checks"),
        ):
            res, seconds, outside = outside_products(solve, mv, device, runs=_RUNS)
            lines.append(f"hvpfunc {label}: {seconds:.3f} s for {res.num_matvecs} products, "
                         f"{100 * outside / seconds:.0f}% of it outside them ({1e6 * outside / res.num_matvecs:.0f} µs "
                         f"per product: {what}).\n")
        diag = torch.linspace(1.0, 1e4, 4096, device=device)
        free, free_seconds, _ = _timed(lambda: hf.cg(lambda v: diag * v, torch.ones_like(diag), tol=3e-7, max_iters=100),
                                    device)
    out += ["### Solver overhead\n", *lines,
            f"hvpfunc cg on an operator whose product is almost free (a diagonal of size 4096): "
            f"{1e6 * free_seconds / max(free.num_matvecs, 1):.0f} µs per iteration.", ""]
    return "\n".join(out)
