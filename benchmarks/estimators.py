"""Products per answer: Lanczos against ARPACK on clustered and easy spectra, and the
trace and diagonal estimators at equal products, against curvlinops' where installed.

Products are what these tables count (a network's Hessian product costs a gradient or
more), so the operators are dense matrices with known spectra, float64, and a network
Hessian small enough to form; Lanczos' products are priced at 2 ms (a sleep), as a small
network's, because its default basis grows only where products cost more than the
orthogonalization. Errors are means over seeds; coverage is how often
estimate ± 1.96·stderr held the true value.
"""

from __future__ import annotations

import time
import warnings
from typing import Dict, List

import numpy as np
import torch
from torch import nn

import hvpfunc as hf
from hvpfunc.testing import dense_matrix

from . import peers
from .harness import table

DT = torch.float64


def _rotated(lam: torch.Tensor, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen, dtype=DT))
    return (Q * lam) @ Q.T


def _network_hessian() -> torch.Tensor:
    """The Hessian of a small tanh MLP's cross-entropy (16-24-10, 658 parameters)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 10)).double()
    x, y = torch.randn(256, 16, generator=gen, dtype=DT), torch.randint(0, 10, (256,), generator=gen)
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
    return dense_matrix(matvec, params, chunk_size=64)


def _lanczos_rows(seeds) -> List[list]:
    import scipy.sparse.linalg as sla

    spectra = {
        "clustered": torch.cat([torch.tensor([9.0, 8.5, 8.0, 7.0, 6.5, -9.5, -8.7], dtype=DT),
                                torch.linspace(-2.0, 2.0, 293, dtype=DT)]),
        "easy": 10.0 * 0.8 ** torch.arange(300, dtype=DT),
    }
    rows = []
    for name, lam in spectra.items():
        for which in ("SA", "LA") if name == "clustered" else ("LA",):
            d = lam.clone()

            def network_priced(v):
                # a product priced as a small network's (2 ms), so that the default basis
                # grows as it would on one; the counts do not depend on it otherwise
                time.sleep(2e-3)
                return d * v

            runs: Dict[str, list] = {}
            for seed in seeds:
                v0 = torch.randn(len(d), generator=torch.Generator().manual_seed(seed), dtype=DT)
                for label, options in (("hvpfunc lanczos, defaults", {}),
                                       ("hvpfunc lanczos, find_copies=False", {"find_copies": False}),
                                       ("hvpfunc lanczos, find_copies=False, max_basis=20",
                                        {"find_copies": False, "max_basis": 20}),
                                       ("hvpfunc lanczos, block_size=4", {"block_size": 4})):
                    res = hf.lanczos(network_priced, v0, k=5, which=which, tol=1e-10, **options)
                    runs.setdefault(label, []).append((res.num_matvecs, res.basis_size))
                calls = {"n": 0}

                def counted(x):
                    calls["n"] += 1
                    return d.numpy() * x

                A = sla.LinearOperator((len(d), len(d)), matvec=counted, dtype=np.float64)
                sla.eigsh(A, k=5, which=which, tol=1e-10, v0=v0.numpy())
                runs.setdefault("scipy eigsh (ARPACK), ncv=20", []).append((calls["n"], 21))
            arpack = np.median([c for c, _ in runs["scipy eigsh (ARPACK), ncv=20"]])
            for label, got in runs.items():
                counts = [c for c, _ in got]
                rows.append([f"{name} ({which})", label, f"{np.median(counts):.0f} ({min(counts)}–{max(counts)})",
                             f"{np.median(counts) / arpack:.2f}", f"{np.median([b for _, b in got]):.0f}"])
    return rows


def _trace_rows(seeds, budgets) -> List[list]:
    gen = torch.Generator().manual_seed(1)
    matrices = {
        "flat bulk (4 outliers, 296 N(0, 0.5²))": _rotated(torch.cat([torch.tensor([50.0, 30.0, 20.0, -10.0], dtype=DT),
                                                                       0.5 * torch.randn(296, generator=gen, dtype=DT)])),
        "decaying (100·0.9^i, 300)": _rotated(100.0 * 0.9 ** torch.arange(300, dtype=DT)),
        "slowly decaying (i^-0.6, 300)": _rotated(torch.arange(1, 301, dtype=DT) ** -0.6),
        "MLP Hessian (658 parameters)": _network_hessian(),
    }
    found = peers.installed()
    rows = []
    for name, H in matrices.items():
        true = float(torch.trace(H))
        for budget in budgets:
            for method in ("auto", "hutchinson", "hutch++", "xtrace"):
                errors, covered = [], []
                for seed in seeds:
                    res = hf.trace(lambda v: H @ v, torch.zeros(H.shape[0], dtype=DT), num_probes=budget,
                                   method=method, generator=torch.Generator().manual_seed(seed), chunk_size=None)
                    errors.append(abs(float(res.estimate) - true) / abs(true))
                    covered.append(abs(float(res.estimate) - true) <= 1.96 * float(res.stderr))
                rows.append([name, budget, f"hvpfunc trace('{method}')", f"{np.mean(errors):.2e}",
                             f"{np.mean(covered):.0%}"])
            if found["curvlinops"]:
                import curvlinops

                for label, fn in (("curvlinops hutchpp_trace", curvlinops.hutchpp_trace),
                                  ("curvlinops xtrace", curvlinops.xtrace)):
                    errors = []
                    for seed in seeds:
                        torch.manual_seed(seed)
                        errors.append(abs(float(fn(H, budget - budget % (3 if "hutchpp" in label else 2))) - true)
                                      / abs(true))
                    rows.append([name, budget, label, f"{np.mean(errors):.2e}", "no error bar"])
    return rows


def _diagonal_rows(seeds) -> List[list]:
    H = _network_hessian()
    d = torch.diagonal(H)
    rows = []
    for budget in (40, 100):
        for method in ("hutchinson", "xdiag"):
            errors = []
            for seed in seeds:
                res = hf.diagonal(lambda v: H @ v, torch.zeros(H.shape[0], dtype=DT), num_probes=budget, method=method,
                                  generator=torch.Generator().manual_seed(seed), chunk_size=None)
                errors.append(float((res.estimate - d).norm() / d.norm()))
            rows.append([budget, f"hvpfunc diagonal('{method}')", f"{np.mean(errors):.2e}"])
    return rows


def run(*, tiny: bool = False) -> str:
    seeds = range(3) if tiny else range(20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        lanczos = _lanczos_rows(range(3) if tiny else range(10))
        # 100 seeds: at 20 the trace methods' means differ by less than their noise
        traces = _trace_rows(range(3) if tiny else range(100), (20,) if tiny else (20, 60, 100))
        diagonals = _diagonal_rows(seeds)
    return "\n".join([
        "### Lanczos: products for k = 5 at tol 1e-10 (median over seeds, range), float64\n",
        table(["spectrum", "solver", "products", "× ARPACK", "basis held"], lanczos), "",
        "### Trace at equal products (mean relative error; coverage of ±1.96·stderr)\n",
        table(["matrix", "products", "estimator", "mean rel. error", "coverage"], traces), "",
        "### Diagonal of the MLP Hessian at equal products (mean relative error, 2-norm)\n",
        table(["products", "estimator", "mean rel. error"], diagonals), "",
    ])
