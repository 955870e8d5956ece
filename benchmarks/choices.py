"""The choices hvpfunc makes by device, each measured against its alternatives.

Every default below was set from CPU measurements or from plain ``torch.func`` calls on a
GPU; this section measures hvpfunc's own code on whatever device it is run on, so that a
GPU run settles them (issue 16):

- ``mode="auto"``: jobs of a few and of many products, construction included, against
  every fixed mode (auto's pick should be within a small factor of the fastest), with
  each mode's peak memory (where ``"compiled"`` should be chosen for memory);
- ``chunk_size``: seconds per probe and peak memory of a Hutchinson trace at chunk sizes
  1 to 64 (``"auto"`` is 16 on a GPU, 1 on a CPU);
- block Lanczos: wall-clock of ``lanczos(k=8)`` at block sizes 1, 4 and 8;
- SLQ grouping: ``spectral_density`` with its probes one at a time or together;
- recurrent layers: a product of an LSTM's Hessian (routed off cuDNN, which has no
  double backward) against its gradient with cuDNN and without;
- mixed precision: products of a bfloat16 copy of the model inside a float32 Lanczos,
  time per product and the top eigenvalue's error against float64.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor, nn

import hvpfunc as hf

from .harness import median_seconds, mib, peak_bytes, table, timed_runs
from .products import MODES, _loss

_JOB_LENGTHS = (10, 200)
_TINY_JOB_LENGTHS = (2, 10)
_CHUNKS = (1, 4, 16, 64)


def _job(f: Callable, tree: dict, v: dict, mode: str, products: int) -> Callable[[], int]:
    """A job of ``products`` products, its matvec built inside it; returns the mode it
    ends in."""

    def job() -> str:
        mv = hf.hvp_fn(f, tree, mode=mode)
        for _ in range(products):
            out = mv(v)
        del out
        return mv.mode if mode == "auto" else mode

    return job


def modes(models: Dict[str, tuple], device: torch.device, *, lengths: Tuple[int, ...] = _JOB_LENGTHS) -> Iterator[str]:
    """Seconds of jobs of ``lengths`` products, construction included, per mode and for
    ``auto``, each as a multiple of the fastest mode's; peak memory of building and one
    product (MiB, GPU only). Each job runs twice and the second is timed: a process's
    first trace pays imports and compilation once, and ``auto`` remembers the outcome
    of its first run's experiment for the same function."""
    for name, (model, x, y) in models.items():
        tree = {k: p.detach() for k, p in model.named_parameters()}
        v = hf.tree.random_like(tree, generator=torch.Generator().manual_seed(0), kind="gaussian")

        def f(p):
            return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

        params = list(model.parameters())
        gradient = median_seconds(lambda: torch.autograd.grad(_loss(model, x, y), params), device)
        gradient_mib = peak_bytes(lambda: torch.autograd.grad(_loss(model, x, y), params), device)
        seconds: Dict[str, List[float]] = {}
        notes: Dict[str, str] = {}
        memory: Dict[str, str] = {}
        for mode in ["auto", *MODES]:
            try:
                times = []
                for products in lengths:
                    chose, took = timed_runs(_job(f, tree, v, mode, products), device, runs=2)
                    times.append(took)
                memory[mode] = mib(peak_bytes(lambda mode=mode: hf.hvp_fn(f, tree, mode=mode)(v), device))
            except Exception as err:  # a mode that cannot run f says so in its row
                notes[mode] = f"fails: {type(err).__name__}: {str(err).splitlines()[0][:50]}"
                continue
            seconds[mode] = times
            notes[mode] = f"ends in {chose}" if mode == "auto" else ""
        best = [min(t[i] for t in seconds.values()) for i in range(len(lengths))]
        rows = []
        for mode in ["auto", *MODES]:
            if mode not in seconds:
                rows.append([mode, *([""] * 2 * len(lengths)), "", notes[mode]])
                continue
            cells = [c for t, b in zip(seconds[mode], best) for c in (f"{t:.3f}", f"{t / b:.2f}×")]
            rows.append([mode, *cells, memory[mode], notes[mode]])
        n = sum(p.numel() for p in params)
        headers = [h for p in lengths for h in (f"{p} products (s)", "× fastest")]
        yield "\n".join([f"#### {name} ({n:,} parameters): one gradient {gradient * 1e3:.2f} ms, {mib(gradient_mib)} MiB\n",
                          table(["mode", *headers, "peak MiB (build + 1 product)", "note"], rows), ""])


def chunks(models: Dict[str, tuple], device: torch.device, *, probes: int = 64) -> Iterator[str]:
    """A Hutchinson trace of ``probes`` probes at each chunk size: milliseconds per
    probe, peak memory above the operator's."""
    for name, (model, x, y) in models.items():
        mv, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
        mv(params)  # the graph and auto's first decisions are not the chunk's cost
        rows = []
        for chunk in (*_CHUNKS, "auto"):
            def job(chunk=chunk):
                return hf.trace(mv, params, num_probes=probes, method="hutchinson", chunk_size=chunk,
                                generator=torch.Generator().manual_seed(0))

            try:
                seconds = median_seconds(job, device, warmup=1, repeats=3)
                memory = peak_bytes(job, device)
            except Exception as err:
                rows.append([str(chunk), "fails", "", f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"])
                continue
            rows.append([str(chunk), f"{1e3 * seconds / probes:.2f}", mib(memory), ""])
        yield "\n".join([f"#### {name}: trace, {probes} Hutchinson probes\n",
                          table(["chunk_size", "ms per probe", "peak MiB", "note"], rows), ""])


def blocks(models: Dict[str, tuple], device: torch.device, *, k: int = 8) -> Iterator[str]:
    """``lanczos(k)`` at block sizes 1, 4 and 8: seconds, products, the top eigenvalue."""
    for name, (model, x, y) in models.items():
        mv, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
        v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
        rows = []
        for b in (1, 4, 8):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hf.ConvergenceWarning)
                res, seconds = timed_runs(lambda b=b: hf.lanczos(mv, v0, k=k, tol=1e-3, block_size=b), device, runs=3)
            rows.append([str(b), f"{seconds:.3f}", res.num_matvecs, res.status.name, f"{float(res.eigenvalues.max()):.6g}"])
        yield "\n".join([f"#### {name}: lanczos(k={k}, tol=1e-3)\n",
                          table(["block_size", "seconds", "products", "status", "top eigenvalue"], rows), ""])


def grouping(models: Dict[str, tuple], device: torch.device, *, probes: int = 8, steps: int = 30) -> Iterator[str]:
    """``spectral_density`` with its probes one at a time, in groups of 4, all together."""
    for name, (model, x, y) in models.items():
        mv, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
        mv(params)
        rows = []
        for chunk in (*sorted({1, 4, probes}), "auto"):
            def job(chunk=chunk):
                return hf.spectral_density(mv, params, num_probes=probes, num_iters=steps, chunk_size=chunk,
                                           generator=torch.Generator().manual_seed(0))

            try:
                res, seconds = timed_runs(job, device, runs=3)
                memory = peak_bytes(job, device)
            except Exception as err:
                rows.append([str(chunk), "fails", "", "", f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"])
                continue
            rows.append([str(chunk), f"{seconds:.3f}", res.num_matvecs, mib(memory), ""])
        yield "\n".join([f"#### {name}: spectral_density({probes} probes, {steps} steps)\n",
                          table(["chunk_size", "seconds", "products", "peak MiB", "note"], rows), ""])


class _Recurrent(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.lstm(x)[0][:, -1])


def recurrent(device: torch.device, *, tiny: bool = False) -> str:
    """An LSTM's product (its recurrent layer off cuDNN) against its gradient with cuDNN
    (training mode: cuDNN's RNN backward refuses eval mode) and without."""
    features, hidden, batch, seq = (8, 16, 8, 5) if tiny else (64, 256, 128, 32)
    torch.manual_seed(0)
    model = _Recurrent(features, hidden).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, seq, features, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    params = list(model.parameters())
    rows = []

    def gradient(cudnn: bool) -> Callable[[], object]:
        def run():
            with torch.backends.cudnn.flags(enabled=cudnn):
                model.train(cudnn)
                try:
                    return torch.autograd.grad(_loss(model, x, y), params)
                finally:
                    model.eval()

        return run

    for label, fn in (("gradient, cuDNN (training mode)", gradient(True)),
                      ("gradient, PyTorch's kernels", gradient(False))):
        rows.append([label, f"{1e3 * median_seconds(fn, device):.2f}", mib(peak_bytes(fn, device)), ""])
    for mode in ("auto", "reverse-over-reverse", "forward-over-reverse", "gradient-difference"):
        mv, tree = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode=mode)
        v = hf.tree.random_like(tree, generator=torch.Generator().manual_seed(1), kind="gaussian")
        try:
            rows.append([f"product, mode={mode!r}", f"{1e3 * median_seconds(lambda mv=mv, v=v: mv(v), device):.2f}",
                         mib(peak_bytes(lambda mv=mv, v=v: mv(v), device)), ""])
        except Exception as err:
            rows.append([f"product, mode={mode!r}", "fails", "", f"{type(err).__name__}: {str(err).splitlines()[0][:60]}"])
    n = sum(p.numel() for p in params)
    cudnn = "available" if torch.backends.cudnn.is_available() and device.type == "cuda" else "not used on this device"
    return "\n".join([f"#### LSTM ({n:,} parameters, batch {batch}, {seq} steps), cuDNN {cudnn}\n",
                      table(["call", "ms", "peak MiB", "note"], rows), ""])


def mixed(models: Dict[str, tuple], device: torch.device) -> str:
    """Products of a bfloat16 copy of the model inside a float32 Lanczos (k=1, residual
    tol 3e-2: bfloat16 resolves no less than 1.6e-2), against float32 products: ms per
    product and the top eigenvalue's relative error against a float64 Lanczos (tol 1e-8)
    on the float64 model, which includes the bfloat16 model's own difference (its weights
    and activations rounded), not only the solver's."""
    rows = []
    for name, (model, x, y) in models.items():
        loss = nn.CrossEntropyLoss()
        mv32, p32 = hf.model_hvp_fn(model, loss, (x, y))
        mv64, p64 = hf.model_hvp_fn(copy.deepcopy(model).double(), loss, (x.double(), y))
        top = float(hf.lanczos(mv64, hf.tree.random_like(p64, generator=torch.Generator().manual_seed(9)),
                               tol=1e-8).eigenvalues[0])
        mv16, _ = hf.model_hvp_fn(copy.deepcopy(model).to(torch.bfloat16), loss, (x.to(torch.bfloat16), y))

        def bf16(v, mv16=mv16):
            return {k: t.float() for k, t in mv16({k: t.to(torch.bfloat16) for k, t in v.items()}).items()}

        v0 = hf.tree.random_like(p32, generator=torch.Generator().manual_seed(0))
        v16 = {k: t.to(torch.bfloat16) for k, t in v0.items()}
        for label, mv, start in (
            ("float32", mv32, v0),
            # hvpfunc sees a float32 operator: its symmetry check is float32's
            ("bfloat16 products cast to float32", bf16, v0),
            # hvpfunc sees the bfloat16 operator: checks at its rounding, solver in float32
            ("bfloat16 products and vectors", mv16, v16),
        ):
            per = median_seconds(lambda mv=mv, start=start: mv(start), device)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", hf.ConvergenceWarning)
                    res = hf.lanczos(mv, start, tol=3e-2)
            except ValueError as err:
                rows.append([name, label, f"{1e3 * per:.2f}", "", "refused", str(err).split(":")[0][:40]])
                continue
            rows.append([name, label, f"{1e3 * per:.2f}", res.num_matvecs, res.status.name,
                         f"{abs(float(res.eigenvalues[0]) - top) / abs(top):.1e}"])
    return table(["model", "products", "ms per product", "Lanczos products", "status", "top eigenvalue error"], rows)


def run(models: Dict[str, tuple], device: torch.device, *, tiny: bool = False) -> str:
    return "\n".join(tables(models, device, tiny=tiny))


def tables(models: Dict[str, tuple], device: torch.device, *, tiny: bool = False) -> Iterator[str]:
    """Each model's table as soon as it is measured (a run cut short keeps them)."""
    for title, make in (
        ("mode='auto' against the fixed modes, jobs end to end",
         lambda: modes(models, device, lengths=_TINY_JOB_LENGTHS if tiny else _JOB_LENGTHS)),
        ("chunk_size: probes per vmap call", lambda: chunks(models, device, probes=8 if tiny else 64)),
        ("Block Lanczos", lambda: blocks(models, device, k=2 if tiny else 8)),
        ("SLQ grouping", lambda: grouping(models, device, probes=4 if tiny else 8, steps=5 if tiny else 30)),
        ("Recurrent layers", lambda: [recurrent(device, tiny=tiny)]),
        ("Mixed precision", lambda: [mixed(models, device), ""]),
    ):
        yield f"### {title}\n"
        yield from make()
