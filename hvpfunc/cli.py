"""``python -m hvpfunc``: a second-order report on a small network trained on synthetic data."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from typing import List, Optional

import torch
from torch import nn

from ._eigen.lanczos import lanczos
from ._products.model import model_hvp_fn
from ._solve.cg import cg
from ._solve.neumann import neumann
from ._stochastic.blocks import block_spectra
from ._stochastic.density import spectral_density
from ._stochastic.trace import trace
from .results import ConvergenceWarning
from .testing import dense_matrix
from .tree import norm, random_like


def _at_least(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (a usage error otherwise, before
    any training)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from err
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hvpfunc",
        description=(
            "Train a small MLP classifier on synthetic data for a few seconds, then report "
            "its loss Hessian: extreme eigenvalues (Lanczos), trace (Hutch++), per-layer "
            "traces and top eigenvalues, the "
            "Neumann-vs-CG comparison of the hyperparameter user story, and a spectral "
            "density plot (stochastic Lanczos quadrature). Small models are checked "
            "against the dense Hessian."
        ),
    )
    p.add_argument("--hidden", type=_at_least(1), default=32, help="hidden units per layer (default 32)")
    p.add_argument("--depth", type=_at_least(0), default=2, help="hidden layers (default 2)")
    p.add_argument("--samples", type=_at_least(8), default=512, help="training examples (default 512)")
    p.add_argument("--train-steps", type=_at_least(0), default=100, help="Adam steps before the report (default 100)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="(default float64)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and probes (default 0)")
    p.add_argument("-k", type=_at_least(1), default=5, help="eigenvalues at each end (default 5)")
    p.add_argument("--probes", type=_at_least(4), default=60, help="trace probes (default 60)")
    p.add_argument("--density-probes", type=_at_least(1), default=4, help="SLQ probes (default 4)")
    p.add_argument("--density-iters", type=_at_least(1), default=60, help="Lanczos steps per SLQ probe (default 60)")
    p.add_argument("--dense-limit", type=_at_least(0), default=3000,
                   help="check against the dense Hessian up to this many parameters (default 3000)")
    p.add_argument("--output", default="hessian_density.png",
                   help="where to write the density plot (default hessian_density.png)")
    p.add_argument("--no-plot", action="store_true", help="skip the plot")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _data(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
    """Four overlapping Gaussian blobs in 10 dimensions with 20% of the labels flipped,
    so the loss stays away from zero; a quarter of the points held out."""
    gen = torch.Generator().manual_seed(args.seed)
    centers = torch.randn(4, 10, generator=gen)
    labels = torch.randint(0, 4, (args.samples,), generator=gen)
    x = 2.0 * (centers[labels] + torch.randn(args.samples, 10, generator=gen))
    flip = torch.rand(args.samples, generator=gen) < 0.2
    labels = torch.where(flip, torch.randint(0, 4, (args.samples,), generator=gen), labels)
    x, labels = x.to(device, dtype), labels.to(device)
    cut = (3 * args.samples) // 4
    return (x[:cut], labels[:cut]), (x[cut:], labels[cut:])


def _model(args: argparse.Namespace, dtype: torch.dtype, device: torch.device) -> nn.Module:
    torch.manual_seed(args.seed)
    layers: List[nn.Module] = []
    width = 10
    for _ in range(args.depth):
        layers += [nn.Linear(width, args.hidden), nn.Tanh()]
        width = args.hidden
    layers.append(nn.Linear(width, 4))
    return nn.Sequential(*layers).to(device, dtype)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("hvpfunc: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return 2
    progress = not args.no_progress
    start = time.perf_counter()
    (x, y), (xv, yv) = _data(args, dtype, device)
    model = _model(args, dtype, device)
    n = sum(p.numel() for p in model.parameters())
    if args.k > n:
        print(f"hvpfunc: -k {args.k} is more than the model's {n} parameters: reporting all {n} eigenvalues",
              file=sys.stderr)
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.train_steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        train_loss, val_loss = float(loss_fn(model(x), y)), float(loss_fn(model(xv), yv))
    matvec, params = model_hvp_fn(model, loss_fn, (x, y))
    print(f"hvpfunc report — torch {torch.__version__}, device {device}, {args.dtype}")
    print(f"model: MLP 10-{'-'.join([str(args.hidden)] * args.depth)}-4, {n} parameters; "
          f"{args.train_steps} Adam steps: train loss {train_loss:.4f}, validation loss {val_loss:.4f}")
    timing = ", ".join(f"{m} {t * 1e3:.2f} ms" for m, t in matvec.timings.items())
    print(f"Hessian-vector product: mode {matvec.mode!r}" + (f" (auto timed: {timing})" if timing else ""))

    gen = torch.Generator().manual_seed(args.seed)
    v0 = random_like(params, generator=gen, kind="gaussian")
    k = min(args.k, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the report prints convergence
        top = lanczos(matvec, v0, k=k, which="LA", tol=1e-8, progress=progress)
        bottom = lanczos(matvec, v0, k=k, which="SA", tol=1e-8, progress=progress)
    print("\nextreme eigenvalues (Lanczos, tol 1e-8):")
    print(f"  top {k}:    " + "  ".join(f"{float(e):+.6g}" for e in top.eigenvalues)
          + f"   converged {int(top.converged.sum())}/{k}, {top.num_matvecs} products")
    print(f"  bottom {k}: " + "  ".join(f"{float(e):+.6g}" for e in bottom.eigenvalues)
          + f"   converged {int(bottom.converged.sum())}/{k}, {bottom.num_matvecs} products")
    exact = None
    if n <= args.dense_limit:
        H = dense_matrix(matvec, params, chunk_size=64)
        exact = torch.linalg.eigvalsh(H.double())
        want = torch.cat([exact.flip(0)[:k], exact[:k]])
        got = torch.cat([top.eigenvalues, bottom.eigenvalues]).double().cpu()
        scale = float(exact.abs().max())
        err = float(((got - want.cpu()).abs() / scale).max())
        print(f"  dense check: max |error| / ‖H‖ = {err:.2e} (eigvalsh of the {n}×{n} Hessian)")

    est = trace(matvec, params, num_probes=args.probes, generator=gen, progress=progress)
    line = f"\ntrace (Hutch++, {args.probes} products): {float(est.estimate):.6g} ± {float(est.stderr):.2g} (stderr)"
    if exact is not None:
        line += f"; exact {float(exact.sum()):.6g}"
    print(line)

    blocks = block_spectra(matvec, params, num_probes=args.probes, k=1, tol=1e-6, generator=gen)
    print(f"\nper layer (traces from {args.probes} shared probes, top eigenvalue of each diagonal block):")
    print("  " + blocks.table().replace("\n", "\n  "))

    lam_min = float(bottom.eigenvalues[0])
    lam_max = float(top.eigenvalues[0])
    damping = max(0.0, -lam_min) + 1e-3 * abs(lam_max)
    b = torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (xv,)), yv))(params)
    b_norm = float(norm(b))
    print(f"\nH⁻¹·∇(validation loss), damping δ = {damping:.3g} (makes H + δI positive definite):")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        runs = [
            ("Neumann, α = 1 (v <- v - Hv)", neumann(matvec, b, alpha=1.0, damping=damping, num_terms=200)),
            ("Neumann, α = 1/λ̂_max", neumann(matvec, b, damping=damping, num_terms=200)),
            ("CG", cg(matvec, b, damping=damping, tol=max(1e-8, 4 * torch.finfo(dtype).eps), max_iters=500)),
        ]
    for name, res in runs:
        print(f"  {name:<30} {res.status:<12} relative residual {res.residual_norm / b_norm:.2e}, "
              f"{res.num_matvecs} products")
        if res.status == "diverged":
            print(f"    {res.message.split('. ')[0]}.")

    sd = spectral_density(matvec, params, num_probes=args.density_probes, num_iters=min(args.density_iters, n),
                          generator=gen, progress=progress)
    print(f"\nspectral density (SLQ, {args.density_probes} probes × {min(args.density_iters, n)} steps, "
          f"σ = {sd.sigma:.2g}): Ritz values in [{float(sd.nodes.min()):.4g}, {float(sd.nodes.max()):.4g}]")
    if not args.no_plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            fig = sd.plot()
            fig.axes[0].set_title(f"Hessian spectral density, MLP with {n} parameters")
            fig.tight_layout()
            fig.savefig(args.output, dpi=120)
            print(f"  plot written to {args.output}")
        except ImportError:
            print("  plot skipped: matplotlib is not installed (pip install 'hvpfunc[plot]')")
    print(f"\ndone in {time.perf_counter() - start:.1f} s")
    return 0
