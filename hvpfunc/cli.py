"""``hvpfunc report``: a second-order report on your model, or on a small built-in demo.

``hvpfunc report --model my_job.py:make`` imports ``make`` (a ``.py`` file, or an
importable ``package.module``), calls it with no arguments, and reports on the Hessian of
the loss it returns: ``make() -> (model, loss_fn, data)``, where ``data`` is one
``(inputs, targets)`` batch or an iterable of batches, exactly as
:func:`hvpfunc.model_hvp_fn` takes them. Without ``--model`` it trains a small MLP on
synthetic data for a few seconds and reports on that.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import traceback
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

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


class UserError(Exception):
    """Something in the user's input the report cannot work with; printed in one line."""


class _Job(NamedTuple):
    """What the report is about: the model, its loss and data, a one-line description,
    and the right-hand side of the inverse-Hessian comparison with its name."""

    model: nn.Module
    loss_fn: Callable[..., Tensor]
    data: Any
    description: str
    rhs: Callable[[Dict[str, Tensor]], Dict[str, Tensor]]
    rhs_name: str


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
        usage="hvpfunc [report] [--model PATH.py:FUNCTION | --model package.module:FUNCTION] [options]",
        description=(
            "A report on a loss Hessian: extreme eigenvalues at both ends (Lanczos), the "
            "trace with its standard error, per-layer traces and top eigenvalues, "
            "the Neumann-vs-CG comparison of the inverse-Hessian user story, and a spectral "
            "density (stochastic Lanczos quadrature). Small models are checked against the "
            "dense Hessian. With --model, on your model: FUNCTION() returns "
            "(model, loss_fn, data), data one (inputs, targets) batch or an iterable of "
            "batches, as hvpfunc.model_hvp_fn takes them. Without it, on a small MLP trained "
            "on synthetic data for a few seconds."
        ),
    )
    p.add_argument("--model", metavar="SPEC",
                   help="PATH.py:FUNCTION or package.module:FUNCTION returning (model, loss_fn, data)")
    p.add_argument("--json", metavar="FILE", help="also write every number, with its convergence status, as JSON")
    p.add_argument("--output", metavar="DIR",
                   help="write the figures and a Markdown report (report.md) that embeds them into DIR")
    p.add_argument("--no-plot", action="store_true", help="no figures in --output DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed of probes (and of the demo's data and model; default 0)")
    p.add_argument("-k", type=_at_least(1), default=5, help="eigenvalues at each end (default 5)")
    p.add_argument("--tol", type=float, default=None,
                   help="Lanczos's relative residual tolerance (default 1e-8 in float64, 1e-4 in lower precision)")
    p.add_argument("--probes", type=_at_least(4), default=60, help="trace probes (default 60)")
    p.add_argument("--density-probes", type=_at_least(1), default=4, help="SLQ probes (default 4)")
    p.add_argument("--density-iters", type=_at_least(1), default=60, help="Lanczos steps per SLQ probe (default 60)")
    p.add_argument("--dense-limit", type=_at_least(0), default=3000,
                   help="check against the dense Hessian up to this many parameters (default 3000)")
    demo = p.add_argument_group("the built-in demo (without --model)")
    demo.add_argument("--hidden", type=_at_least(1), default=32, help="hidden units per layer (default 32)")
    demo.add_argument("--depth", type=_at_least(0), default=2, help="hidden layers (default 2)")
    demo.add_argument("--samples", type=_at_least(8), default=512, help="training examples (default 512)")
    demo.add_argument("--train-steps", type=_at_least(0), default=100,
                      help="Adam steps before the report (default 100)")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    demo.add_argument("--dtype", default="float64", choices=["float32", "float64"], help="(default float64)")
    return p


# --- the built-in demo ---------------------------------------------------------------


def _demo_data(args: argparse.Namespace, dtype: torch.dtype, device: torch.device):
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


def _demo(args: argparse.Namespace) -> _Job:
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    (x, y), (xv, yv) = _demo_data(args, dtype, device)
    torch.manual_seed(args.seed)
    layers: List[nn.Module] = []
    width = 10
    for _ in range(args.depth):
        layers += [nn.Linear(width, args.hidden), nn.Tanh()]
        width = args.hidden
    layers.append(nn.Linear(width, 4))
    model = nn.Sequential(*layers).to(device, dtype)
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.train_steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        train_loss, val_loss = float(loss_fn(model(x), y)), float(loss_fn(model(xv), yv))
    description = (f"MLP 10-{'-'.join([str(args.hidden)] * args.depth)}-4 on synthetic data; "
                   f"{args.train_steps} Adam steps: train loss {train_loss:.4f}, validation loss {val_loss:.4f}")

    def rhs(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return torch.func.grad(lambda p: loss_fn(torch.func.functional_call(model, p, (xv,)), yv))(params)

    return _Job(model, loss_fn, (x, y), description, rhs, "∇(validation loss)")


# --- the user's model ----------------------------------------------------------------


def _where(err: BaseException) -> str:
    """' (at file:line)' of the innermost frame of the user's code (not torch's, not
    hvpfunc's) that raised; '' when there is none."""
    libraries = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith(libraries)]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _load(spec: str) -> Callable[[], Any]:
    """The function ``spec`` names: ``PATH.py:FUNCTION`` or ``package.module:FUNCTION``."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise UserError(f"--model expects PATH.py:FUNCTION or package.module:FUNCTION, got {spec!r}")
    try:
        if target.endswith(".py") or os.sep in target or "/" in target:
            if not os.path.isfile(target):
                raise UserError(f"--model {spec}: no file {target!r}")
            folder = os.path.dirname(os.path.abspath(target))
            if folder not in sys.path:
                sys.path.insert(0, folder)  # so the file's own imports of its neighbours work
            loader_spec = importlib.util.spec_from_file_location("_hvpfunc_user_model", target)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"--model {spec}: importing {target!r} raised {type(err).__name__}: "
                        f"{err}{_where(err)}") from err
    fn = getattr(module, name, None)
    if fn is None:
        raise UserError(f"--model {spec}: {target!r} has no {name!r}")
    if not callable(fn):
        raise UserError(f"--model {spec}: {name!r} is a {type(fn).__name__}, not a function")
    return fn


def _is_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` pair, as model_hvp_fn tells a batch from many."""
    return isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], Tensor)


def _first_batch(data: Any) -> Tuple[Any, Tensor]:
    if _is_batch(data):
        return data[0], data[1]
    try:
        batch = next(iter(data))
    except StopIteration:
        raise UserError("data holds no batches") from None
    except TypeError:
        raise UserError(f"data must be an (inputs, targets) batch or an iterable of them, got a "
                        f"{type(data).__name__}") from None
    if not _is_batch(batch):
        raise UserError(f"the first batch of data is a {type(batch).__name__}, not an (inputs, targets) pair "
                        "with a tensor of targets")
    return batch[0], batch[1]


def _call(model: nn.Module, x: Any, params: Optional[Dict[str, Tensor]] = None) -> Any:
    """model(x) the way model_hvp_fn calls it (tuples unpacked, mappings as keywords), at
    ``params`` (default: the module's own)."""
    params = {} if params is None else params
    if isinstance(x, Mapping):
        return torch.func.functional_call(model, params, (), dict(x))
    if type(x) in (tuple, list):
        return torch.func.functional_call(model, params, tuple(x))
    return torch.func.functional_call(model, params, (x,))


def _user(spec: str) -> _Job:
    fn = _load(spec)
    name = getattr(fn, "__name__", "FUNCTION")
    try:
        made = fn()
    except Exception as err:
        raise UserError(f"{name}() raised {type(err).__name__}: {err}{_where(err)}") from err
    if not isinstance(made, (tuple, list)) or len(made) != 3:
        got = f"a {type(made).__name__}" + (f" of {len(made)}" if isinstance(made, (tuple, list)) else "")
        raise UserError(f"{name}() must return (model, loss_fn, data), it returned {got}")
    model, loss_fn, data = made
    if not isinstance(model, nn.Module):
        raise UserError(f"{name}() returned a {type(model).__name__} as the model, not a torch.nn.Module")
    if not callable(loss_fn):
        raise UserError(f"{name}() returned a {type(loss_fn).__name__} as loss_fn, which is not callable")
    x, y = _first_batch(data)
    try:
        with torch.no_grad():
            loss = loss_fn(_call(model, x), y)
    except Exception as err:
        raise UserError(f"loss_fn(model(inputs), targets) on the first batch raised {type(err).__name__}: "
                        f"{err}{_where(err)}") from err
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = (f"shape {tuple(loss.shape)}, dtype {loss.dtype}" if isinstance(loss, Tensor)
               else f"a {type(loss).__name__}")
        raise UserError(f"loss_fn(model(inputs), targets) must be a floating-point scalar, it gave {got}: "
                        "reduce it (reduction='mean' or 'sum')")
    if not math.isfinite(float(loss)):
        raise UserError(f"the loss on the first batch is {float(loss)}: no Hessian to report on")
    batches = ("one batch" if _is_batch(data)
               else f"{len(data)} batches" if isinstance(data, (tuple, list)) else "streamed batches")
    description = (f"{spec}: {type(model).__name__} ({'training' if model.training else 'eval'} mode), {batches}; "
                   f"loss on the first batch {float(loss):.6g}")

    def rhs(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return torch.func.grad(lambda p: loss_fn(_call(model, x, p), y))(params)

    return _Job(model, loss_fn, data, description, rhs, "∇(loss on the first batch), the Newton step")


# --- the report ----------------------------------------------------------------------


def _floats(t: Tensor) -> List[Optional[float]]:
    """A tensor's values for JSON: nan (a block smaller than k) becomes null."""
    return [None if math.isnan(v) else v for v in t.detach().double().cpu().reshape(-1).tolist()]


class _Report:
    """Sections of text printed as they are computed, kept for the Markdown report, and
    a dict of results for the JSON."""

    def __init__(self) -> None:
        self.sections: List[Tuple[str, List[str]]] = []
        self.results: Dict[str, Any] = {}
        self.figures: List[Tuple[str, str, str]] = []  # (section key, caption, file)

    def section(self, title: str, lines: List[str]) -> None:
        self.sections.append((title, lines))
        print(f"\n{title}:" if self.sections[1:] else f"{title}")
        for line in lines:
            print(f"  {line}")

    def markdown(self) -> str:
        """The sections as Markdown (the first one's title as the heading), each figure
        under the section whose title starts with its key."""
        out: List[str] = []
        for i, (title, lines) in enumerate(self.sections):
            out += [f"{'#' if i == 0 else '##'} {title}", ""]
            table = any(line.startswith("|") for line in lines)
            out += lines if table else ["```", *lines, "```"]
            out.append("")
            out += [f"![{caption}]({path})\n" for key, caption, path in self.figures if title.startswith(key)]
        return "\n".join(out)



def _num(x: Any) -> Optional[float]:
    """A number for JSON (which has no nan or inf): those become null."""
    x = float(x)
    return x if math.isfinite(x) else None


def _eig_json(res: Any, tol: float) -> Dict[str, Any]:
    return {"values": _floats(res.eigenvalues), "converged": [bool(c) for c in res.converged],
            "residuals": _floats(res.residuals), "status": str(res.status.value), "tol": tol,
            "num_matvecs": res.num_matvecs, "message": res.message}


def _run(job: _Job, args: argparse.Namespace, report: _Report) -> None:
    """Compute every section of the report, printing each as it is done."""
    from . import __version__

    progress = not args.no_progress
    try:
        matvec, params = model_hvp_fn(job.model, job.loss_fn, job.data)
    except (ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"hvpfunc.model_hvp_fn refused the model: {str(err).splitlines()[0]}") from err
    leaves = list(params.values())
    n = sum(p.numel() for p in leaves)
    dtype, device = leaves[0].dtype, leaves[0].device
    tol = args.tol if args.tol is not None else (1e-8 if dtype == torch.float64 else 1e-4)
    k = min(args.k, n)
    if args.k > n:
        print(f"hvpfunc: -k {args.k} is more than the model's {n} parameters: reporting all {n} eigenvalues",
              file=sys.stderr)
    timing = ", ".join(f"{m} {t * 1e3:.2f} ms" for m, t in matvec.timings.items())
    report.results.update({
        "hvpfunc": __version__, "torch": torch.__version__, "device": str(device), "dtype": str(dtype),
        "model": {"description": job.description, "parameters": n},
        "product": {"mode": matvec.mode, "timings_s": dict(matvec.timings)},
    })
    report.section(f"hvpfunc report — torch {torch.__version__}, device {device}, {str(dtype).replace('torch.', '')}", [
        f"model: {job.description}",
        f"{n} parameters; Hessian-vector product: mode {matvec.mode!r}" + (f" (timed: {timing})" if timing else ""),
    ])

    gen = torch.Generator().manual_seed(args.seed)
    v0 = random_like(params, generator=gen, kind="gaussian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the report prints convergence
        top = lanczos(matvec, v0, k=k, which="LA", tol=tol, progress=progress)
        bottom = lanczos(matvec, v0, k=k, which="SA", tol=tol, progress=progress)
    lines = [f"{name} {k}:{' ' * (4 if name == 'top' else 1)}" + "  ".join(f"{float(e):+.6g}" for e in res.eigenvalues)
             + f"   converged {int(res.converged.sum())}/{k}, {res.num_matvecs} products"
             for name, res in (("top", top), ("bottom", bottom))]
    report.results["eigenvalues"] = {"top": _eig_json(top, tol), "bottom": _eig_json(bottom, tol)}
    exact = None
    if n <= args.dense_limit:
        H = dense_matrix(matvec, params, chunk_size=64)
        exact = torch.linalg.eigvalsh(H.double()).cpu()
        want = torch.cat([exact.flip(0)[:k], exact[:k]])
        got = torch.cat([top.eigenvalues, bottom.eigenvalues]).double().cpu()
        err = float(((got - want).abs() / exact.abs().max()).max())
        lines.append(f"dense check: max |error| / ‖H‖ = {err:.2e} (eigvalsh of the {n}×{n} Hessian)")
        report.results["dense_check"] = {"max_relative_error": err, "trace": float(exact.sum()),
                                         "top": _floats(exact.flip(0)[:k]), "bottom": _floats(exact[:k])}
    report.section(f"extreme eigenvalues (Lanczos, relative residual tolerance {tol:g})", lines)

    est = trace(matvec, params, num_probes=args.probes, generator=gen, progress=progress)
    line = f"{float(est.estimate):.6g} ± {float(est.stderr):.2g} (stderr), {est.status.value}"
    if exact is not None:
        line += f"; exact {float(exact.sum()):.6g}"
    report.results["trace"] = {"estimate": _num(est.estimate), "stderr": _num(est.stderr), "method": "auto",
                               "status": str(est.status.value), "num_matvecs": est.num_matvecs}
    report.section(f"trace ({args.probes} products: Hutch++ and Hutchinson, weighted by their variances)", [line])

    blocks = block_spectra(matvec, params, num_probes=args.probes, k=1, tol=1e-6, generator=gen)
    report.results["layers"] = {
        "status": str(blocks.status.value), "num_matvecs": blocks.num_matvecs,
        "groups": [{"group": g, "parameters": int(blocks.sizes[i]), "trace": _num(blocks.traces[i]),
                    "stderr": _num(blocks.stderrs[i]), "share": _num(blocks.shares[i]),
                    "top": _floats(blocks.top[i]), "converged": [bool(c) for c in blocks.converged[i]]}
                   for i, g in enumerate(blocks.groups)],
    }
    report.section(f"per layer (traces from {args.probes} shared probes, top eigenvalue of each diagonal block)",
                   blocks.table().replace("\n\n", "\n").splitlines())

    lam_min, lam_max = float(bottom.eigenvalues[0]), float(top.eigenvalues[0])
    damping = max(0.0, -lam_min) + 1e-3 * abs(lam_max)
    b = job.rhs(params)
    b_norm = float(norm(b)) or 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        runs = [
            ("Neumann, α = 1 (v <- v - Hv)", neumann(matvec, b, alpha=1.0, damping=damping, num_terms=200)),
            ("Neumann, α = 1/λ̂_max", neumann(matvec, b, damping=damping, num_terms=200)),
            ("CG", cg(matvec, b, damping=damping, tol=max(1e-8, 100 * torch.finfo(dtype).eps), max_iters=500)),
        ]
    lines = []
    for name, res in runs:
        lines.append(f"{name:<30} {res.status.value:<12} relative residual {res.residual_norm / b_norm:.2e}, "
                     f"{res.num_matvecs} products")
        if res.status == "diverged":
            lines.append(f"  {res.message.split('. ')[0]}.")
    report.results["inverse"] = {
        "rhs": job.rhs_name, "damping": damping,
        "runs": [{"method": name, "status": str(res.status.value), "converged": bool(res.converged),
                  "relative_residual": _num(res.residual_norm / b_norm), "num_matvecs": res.num_matvecs}
                 for name, res in runs],
    }
    report.section(f"H⁻¹·{job.rhs_name}, damping δ = {damping:.3g} (makes H + δI positive definite)", lines)

    iters = min(args.density_iters, n)
    sd = spectral_density(matvec, params, num_probes=args.density_probes, num_iters=iters, generator=gen,
                          progress=progress)
    report.results["density"] = {"status": str(sd.status.value), "sigma": sd.sigma, "num_matvecs": sd.num_matvecs,
                                 "grid": _floats(sd.grid), "density": _floats(sd.density),
                                 "ritz_values": _floats(sd.nodes), "weights": _floats(sd.weights)}
    report.section(f"spectral density (SLQ, {args.density_probes} probes × {iters} steps, σ = {sd.sigma:.2g})",
                   [f"Ritz values in [{float(sd.nodes.min()):.4g}, {float(sd.nodes.max()):.4g}]"])
    if args.output is not None and not args.no_plot:
        _figures(args.output, sd, blocks, n, report)


def _figures(folder: str, sd: Any, blocks: Any, n: int, report: _Report) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  figures skipped: matplotlib is not installed (pip install 'hvpfunc[plot]')")
        return
    for key, name, fig, caption in (
        ("per layer", "layers.png", blocks.plot(), "trace of each layer's diagonal block (95% intervals)"),
        ("spectral density", "density.png", sd.plot(), f"Hessian spectral density, {n} parameters"),
    ):
        fig.axes[0].set_title(caption)
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=120)
        plt.close(fig)
        report.figures.append((key, caption, name))
    print(f"  figures written to {folder}")


def main(argv: Optional[List[str]] = None) -> int:
    """``hvpfunc [report] [options]``; returns the exit status (2 for a usage error or an
    error in the user's model, printed as one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["report"]:
        argv = argv[1:]
    parser = _parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    report = _Report()
    try:
        if args.model is not None:
            demo_only = [name for name in ("hidden", "depth", "samples", "train_steps", "device", "dtype")
                         if getattr(args, name) != parser.get_default(name)]
            if demo_only:
                raise UserError(f"--{demo_only[0].replace('_', '-')} is an option of the built-in demo; with --model "
                                "your function decides the model, its data, dtype and device")
            job = _user(args.model)
        else:
            job = _demo(args)
        if args.output is not None:
            try:
                os.makedirs(args.output, exist_ok=True)
            except OSError as err:
                raise UserError(f"--output {args.output}: {err.strerror}") from err
        _run(job, args, report)
    except UserError as err:
        print(f"hvpfunc: error: {err}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    report.results["seconds"] = seconds
    if args.output is not None:
        with open(os.path.join(args.output, "report.md"), "w", encoding="utf-8") as f:
            f.write(report.markdown())
        print(f"\nreport written to {os.path.join(args.output, 'report.md')}")
    if args.json is not None:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.results, f, indent=1)
        print(f"results written to {args.json}")
    print(f"\ndone in {seconds:.1f} s")
    return 0
