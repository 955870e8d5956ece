"""Jobs, end to end: what users run, timed from the model to the answer with
construction included, with the error against a tight reference beside each time.

Every row builds its operator inside the timed call (hvpfunc's matvec, PyHessian's
``hessian`` object, hessian-eigenthings' ``HessianOperator``, curvlinops' operator), so
the tracing, graph building and checks a library does before its first product count.
"""

from __future__ import annotations

import copy
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

import hvpfunc as hf

from . import peers
from .harness import memory_cells, memory_column, peak_during, sync, table, timed_peak_runs, timed_runs

_RUNS = 3  # one warm-up, then the median of two
# hvpfunc against PyHessian, called alternately (one warm-up round): on this shared
# machine, whose speed drifts by ±20% between minutes, the median of the rounds' ratios
# compares like with like; more rounds where a round takes under two seconds
_ROUNDS_SHORT, _ROUNDS_LONG = 8, 4


class _Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                  nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.body(x))


def resnet(width: int = 16, blocks: int = 2) -> nn.Module:
    """A ResNet-style CNN with BatchNorm (about 75k parameters at width 24, PyHessian's
    example scale), in eval mode, as PyHessian's jobs use it."""
    layers: List[nn.Module] = [nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    layers += [_Block(width) for _ in range(blocks)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _models(tiny: bool, device: torch.device):
    from .models import build

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    built = build("tiny" if tiny else "small", device)
    batch = 16 if tiny else 64
    cnn = resnet(8 if tiny else 24, 1 if tiny else 2).to(device)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    with torch.no_grad():  # running statistics that are not the identity
        cnn.train()(x)
    return {"MLP": built["MLP"], "ResNet-style CNN (BatchNorm, eval)": (cnn.eval(), x, y),
            "transformer": built["transformer"]}


def _timed(fn: Callable, device: torch.device):
    return timed_runs(fn, device, runs=_RUNS)


def _timed_peak(fn: Callable, device: torch.device):
    """(result, median seconds, the peak-memory cell of the timed runs: none on CPU)."""
    return timed_peak_runs(fn, device, runs=_RUNS)


def _pyhessian_counted(fn: Callable) -> Callable:
    """Run fn with PyHessian's product counted; returns (result, products per run)."""

    def run(*args):
        ph = sys.modules["pyhessian.hessian"]  # the package's `hessian` class shadows the module
        counter: Dict[str, int] = {}
        original = ph.hessian_vector_product
        ph.hessian_vector_product = peers.counted(original, counter)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return fn(*args), counter.get("n", 0)
        finally:
            ph.hessian_vector_product = original

    return run


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def start(params, seed: int = 0) -> dict:
    """The same start vector for every run of a job (of a round, with its seed)."""
    return hf.tree.random_like(params, generator=seeded(seed))


def top_eigenvalue(mv, params, seed: int = 0, tol: float = 1e-3):
    """hvpfunc's top-eigenvalue job, from its matvec: Lanczos, k = 1, ``tol`` on the
    eigenvalue's error bound."""
    return hf.lanczos(mv, start(params, seed), k=1, tol=tol, stop="eigenvalue")


def pyhessian_top(model: nn.Module, x, y, seed: Optional[int] = None):
    """PyHessian's top-eigenvalue job with its defaults: the eigenvalues' list. Its start
    vector comes from the global generator, seeded with ``seed`` where given."""
    if seed is not None:
        torch.manual_seed(seed)
    return peers.pyhessian(model, (x, y)).eigenvalues(top_n=1)[0]


def _pyhessian_accuracy(model: nn.Module, x, y, top: float, seeds: int) -> Optional[float]:
    """The tolerance that asks hvpfunc for PyHessian's accuracy on the top eigenvalue:
    the smallest relative error its default job reached over ``seeds`` seeded runs,
    rounded down to a power of ten (None where it fails). PyHessian's ``tol`` is a
    relative change between power iterations, which bounds nothing: on the MLP, whose
    two top eigenvalues are close, tol 1e-3 leaves errors of 1e-2 to 3e-2, while
    hvpfunc's ``stop="eigenvalue"`` bounds the error itself. Equal accuracy is then
    hvpfunc's bound at PyHessian's best error, not equal ``tol`` arguments."""
    errors = []
    for seed in range(seeds):
        try:
            values, _ = _pyhessian_counted(lambda: pyhessian_top(model, x, y, seed))()
        except Exception:
            return None
        errors.append(abs(float(values[0]) - top) / abs(top))
    # float32 products resolve no eigenvalue much closer than 1e-6
    return 10.0 ** math.floor(math.log10(max(min(errors), 1e-6)))


def _versus(rows: list, job: str, ours: Callable, how: str, describe_ours: Callable, theirs: Callable,
            their_how: str, describe_theirs: Callable, device: torch.device) -> None:
    """hvpfunc's row and a peer's (``theirs`` returns (result, products)) for one job,
    timed alternately: each round runs both (the peer first in odd rounds), seeded with the round's number
    (``ours(seed)``, ``theirs(seed)``), so that both sample their start vectors or probes
    over the same rounds on every run of the benchmark (PyHessian's come from the global
    generator, whose state otherwise depends on whatever ran before: its top-eigenvalue
    job took 31 to 54 products between rows of one run). The seconds and products are
    medians over the rounds after the first; hvpfunc's row carries the median of the
    rounds' time ratios (its time over the peer's), and of their per-product ratios
    where the counts differ."""
    ours_times: List[float] = []
    their_times: List[float] = []
    ours_counts: List[int] = []
    their_counts: List[int] = []
    peaks: Dict[str, List[Optional[int]]] = {"ours": [], "theirs": []}
    failure = None
    rounds = _ROUNDS_LONG
    round_ = 0
    while round_ <= rounds:
        # odd rounds run the peer first: each job inherits the allocator state the other
        # left (a CNN product faulted in 3k-60k fresh pages depending on what ran before)
        order = ("ours", "theirs") if round_ % 2 == 0 else ("theirs", "ours")
        took = {}
        for who in order:
            sync(device)
            began = time.perf_counter()
            peak = None
            if who == "ours":
                mine, peak = peak_during(lambda: ours(round_), device)
            elif failure is None:
                try:
                    (result, count), peak = peak_during(lambda: theirs(round_), device)
                except Exception as err:
                    failure = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:70]}"
            sync(device)
            took[who] = time.perf_counter() - began
            if round_:
                peaks[who].append(peak)
        if round_ == 0 and sum(took.values()) < 2.0:
            rounds = _ROUNDS_SHORT
        elif round_:
            ours_times.append(took["ours"])
            ours_counts.append(mine.num_matvecs)
            if failure is None:
                their_times.append(took["theirs"])
                their_counts.append(count)
        round_ += 1
    seconds = statistics.median(ours_times)
    products = statistics.median(ours_counts)
    if failure is not None:
        rows.append([job, how, f"{seconds:.3f}", f"{products:g}", describe_ours(mine), "", *memory_cells(peaks["ours"])])
        rows.append([job, their_how, "fails", "", failure, "", *memory_column(device, "—")])
        return
    ratio = statistics.median(a / b for a, b in zip(ours_times, their_times))
    theirs_products = statistics.median(their_counts)
    paired = f"{ratio:.2f}"
    if their_counts != ours_counts and all(their_counts):
        # per round: the counts vary with the seeds, so a ratio of medians would pair
        # one round's time with another's count
        per_product = statistics.median((a / na) / (b / nb) for a, na, b, nb
                                        in zip(ours_times, ours_counts, their_times, their_counts))
        paired += f" ({per_product:.2f} per product)"
    rows.append([job, how, f"{seconds:.3f}", f"{products:g}", describe_ours(mine), paired, *memory_cells(peaks["ours"])])
    rows.append([job, their_how, f"{statistics.median(their_times):.3f}", f"{theirs_products:g}",
                 describe_theirs(result), "1.00", *memory_cells(peaks["theirs"])])


def _attempt(rows: list, job: str, how: str, device: torch.device, fn: Callable, describe: Callable) -> None:
    """A peer's row: time ``fn`` (returning (result, products)); a peer that fails on the
    model (PyHessian on default attention kernels, or its density's removed torch.eig)
    gets a row that says so."""
    try:
        (result, count), seconds, memory = _timed_peak(fn, device)
    except Exception as err:
        rows.append([job, how, "fails", "", f"{type(err).__name__}: {str(err).strip().splitlines()[0][:70]}", "",
                     *memory_column(device, "—")])
        return
    rows.append([job, how, f"{seconds:.3f}", count, describe(result), "", *memory])


# One job in a fresh interpreter: the model and data are built and the library imported
# before the clock starts; what the process does for the first time inside the job (lazy
# imports, first kernels, the allocator's first pages) is counted, as a script pays it.
_FIRST_ANSWER = """
import sys, time
import torch
from torch import nn
from benchmarks import jobs
from benchmarks.harness import sync
import hvpfunc as hf
name, lib, tiny, device, seed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", torch.device(sys.argv[4]), int(sys.argv[5])
model, x, y = jobs._models(tiny, device)[name]
if lib == "PyHessian":
    import pyhessian  # noqa: F401  (its import is not the job)
    torch.manual_seed(seed)  # its random vectors come from the global generator
sync(device)
began = time.perf_counter()
if lib == "hvpfunc":
    res = jobs.top_eigenvalue(*hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y)), seed)
    value, count = float(res.eigenvalues[0]), res.num_matvecs
else:
    values, count = jobs._pyhessian_counted(lambda: jobs.pyhessian_top(model, x, y))()
    value = float(values[0])
sync(device)
print(time.perf_counter() - began, value, count)
"""
_FIRST_ROUNDS = 3


def _first_answer(name: str, lib: str, tiny: bool, device: torch.device, seed: int) -> Tuple[float, float, int]:
    """(seconds, top eigenvalue, products) of one fresh process's job."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _FIRST_ANSWER, name, lib, "1" if tiny else "0", str(device), str(seed)],
                          capture_output=True, text=True, cwd=root, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed")
    seconds, value, count = done.stdout.split()[-3:]
    return float(seconds), float(value), int(count)


def _first_answers(device: torch.device, tiny: bool, tops: Dict[str, float], peer: bool) -> List[str]:
    """The top eigenvalue as a script's first job, each run in a fresh process, hvpfunc
    and PyHessian (where ``peer``) alternately with the round's seed for their random
    start vectors: medians over the rounds (time, products, error) and of the rounds'
    time ratios. One round at the tiny size (the tests' smoke run)."""
    rows = []
    rounds = 1 if tiny else _FIRST_ROUNDS

    def cells(results: List[Tuple[float, float, int]], top: float) -> List[str]:
        return [f"{statistics.median(r[0] for r in results):.3f}", str(int(statistics.median(r[2] for r in results))),
                f"{statistics.median(abs(r[1] - top) / abs(top) for r in results):.1e}"]

    for name, top in tops.items():
        ours: List[Tuple[float, float, int]] = []
        theirs: List[Tuple[float, float, int]] = []
        failure = None if peer else "not installed"
        for seed in range(rounds):
            ours.append(_first_answer(name, "hvpfunc", tiny, device, seed))
            if failure is None:
                try:
                    theirs.append(_first_answer(name, "PyHessian", tiny, device, seed))
                except RuntimeError as err:
                    failure = str(err)[:70]
        if failure is not None:
            rows.append([name, *cells(ours, top), "fails", "", failure, ""])
            continue
        ratio = statistics.median(a[0] / b[0] for a, b in zip(ours, theirs))
        rows.append([name, *cells(ours, top), *cells(theirs, top), f"{ratio:.2f}"])
    return ["### First answer: the top eigenvalue as a script's first job (fresh process, tol 1e-3)\n",
            table(["model", "hvpfunc lanczos (s)", "products", "error", "PyHessian eigenvalues (s)", "products", "error",
                   "× PyHessian (paired)"], rows), ""]


def run(device: torch.device, *, tiny: bool = False) -> str:
    return "\n".join(tables(device, tiny=tiny))


def tables(device: torch.device, *, tiny: bool = False) -> Iterator[str]:
    """Each model's table as soon as it is measured (a run cut short keeps them), then
    the first answers and the hypergradient."""
    found = peers.installed()
    tops: Dict[str, float] = {}
    for name, (model, x, y) in _models(tiny, device).items():
        n = sum(p.numel() for p in model.parameters())
        loss = nn.CrossEntropyLoss()
        # reference: the top five eigenvalues to 1e-9 (float64 copy, residual tolerance)
        m64 = copy.deepcopy(model).double()
        mv64, p64 = hf.model_hvp_fn(m64, loss, (x.double(), y))
        ref = hf.lanczos(mv64, hf.tree.random_like(p64, generator=torch.Generator().manual_seed(9)), k=5, tol=1e-9)
        top5 = np.sort(ref.eigenvalues.cpu().numpy())[::-1]
        top = float(top5[0])
        tops[name] = top

        def rel(value: float) -> str:
            return f"{abs(value - top) / abs(top):.1e}"

        def rel5(values) -> str:
            # every one of the five counts: a top-5 job is as accurate as its worst value
            got = np.sort(np.asarray(values, dtype=np.float64))[::-1][:5]
            worst = float(np.max(np.abs(got - top5) / np.abs(top5)))
            return f"{rel(float(got[0]))} (top), {worst:.1e} (max of 5)"

        rows = []

        def from_model(solve: Callable) -> Callable:
            """A job from the model: hvpfunc's matvec is built inside the timed call."""
            def job(seed: int = 0):
                mv, params = hf.model_hvp_fn(model, loss, (x, y))
                return solve(mv, params, seed)

            return job

        def against(peer: str, job: str, ours: Callable, how: str, describe_ours: Callable, theirs: Callable,
                    their_how: str, describe_theirs: Callable) -> None:
            """hvpfunc's row paired with ``peer``'s where it is installed, else alone."""
            if found[peer]:
                _versus(rows, job, ours, how, describe_ours, theirs, their_how, describe_theirs, device)
            else:
                res, seconds, memory = _timed_peak(ours, device)
                rows.append([job, how, f"{seconds:.3f}", res.num_matvecs, describe_ours(res), "", *memory])

        def against_pyhessian(job: str, ours: Callable, how: str, describe_ours: Callable, theirs: Callable,
                              their_how: str, describe_theirs: Callable) -> None:
            against("PyHessian", job, ours, how, describe_ours, _pyhessian_counted(theirs), their_how,
                    describe_theirs)

        # at PyHessian's tol, then (where it differs) at the accuracy PyHessian reached
        tolerances = [(1e-3, "")]
        if found["PyHessian"]:
            matched = _pyhessian_accuracy(model, x, y, top, seeds=2 if tiny else 6)
            if matched is not None and matched != 1e-3:
                tolerances.append((matched, ": PyHessian's accuracy"))
        for tol, why in tolerances:
            against_pyhessian(
                "top eigenvalue", from_model(lambda mv, params, seed, tol=tol: top_eigenvalue(mv, params, seed, tol=tol)),
                f"hvpfunc lanczos(k=1, tol={tol:.0e}, stop='eigenvalue'){why}".replace("e-0", "e-"),
                lambda res: rel(float(res.eigenvalues[0])), lambda seed: pyhessian_top(model, x, y, seed),
                "PyHessian eigenvalues(top_n=1), defaults (tol 1e-3)", lambda values: rel(float(values[0])))

        def pyhessian_trace(seed: int):
            # its probes come from the global generator and it stops on their running mean
            torch.manual_seed(seed)
            return peers.pyhessian(model, (x, y)).trace(maxIter=100, tol=1e-3)

        against_pyhessian(
            "trace", from_model(lambda mv, params, seed: hf.trace(mv, params, num_probes=100, generator=seeded(seed))),
            "hvpfunc trace(100 probes), defaults",
            lambda res: f"±{float(res.stderr) / abs(float(res.estimate)):.1e} (stderr)",
            pyhessian_trace, "PyHessian trace(maxIter=100), defaults (tol 1e-3)",
            lambda samples: f"±{np.std(samples, ddof=1) / np.sqrt(len(samples)) / abs(np.mean(samples)):.1e} (stderr)")

        def cl_top5(seed: int):
            from scipy.sparse.linalg import LinearOperator, eigsh

            H_op = peers.curvlinops_operator(copy.deepcopy(model), (x, y)).to_scipy()
            counter: Dict[str, int] = {}
            A = LinearOperator(H_op.shape, matvec=peers.counted(H_op.matvec, counter), dtype=H_op.dtype)
            # seeded: ARPACK's own start vector changes from call to call
            v0 = np.random.default_rng(seed).standard_normal(H_op.shape[0])
            return eigsh(A, k=5, which="LA", tol=1e-3, v0=v0)[0], counter["n"]

        # paired with the peer that matches its accuracy (hessian-eigenthings' does not)
        against(
            "curvlinops", "top-5",
            from_model(lambda mv, params, seed: hf.lanczos(mv, start(params, seed), k=5, tol=1e-3, stop="eigenvalue")),
            "hvpfunc lanczos(k=5, tol=1e-3, stop='eigenvalue')", lambda res: rel5(res.eigenvalues.cpu().numpy()),
            cl_top5, "curvlinops + scipy eigsh(k=5, tol=1e-3)", rel5)
        if found["hessian-eigenthings"]:
            from hessian_eigenthings import lanczos as he_lanczos

            def he_top5():
                op = peers.eigenthings_operator(copy.deepcopy(model), (x, y))
                counter: Dict[str, int] = {}
                op.matvec = peers.counted(op.matvec, counter)
                return he_lanczos(op, k=5, which="LA", seed=0), counter["n"]

            _attempt(rows, "top-5", "hessian-eigenthings lanczos(k=5), defaults (tol 1e-4)", device, he_top5,
                     lambda result: rel5(np.asarray(result.eigenvalues)))

        res, seconds, memory = _timed_peak(from_model(lambda mv, params, seed: hf.spectral_density(mv, params, num_probes=1, num_iters=90, generator=seeded(seed))), device)
        rows.append(["SLQ density", "hvpfunc spectral_density(1 probe, 90 steps)", f"{seconds:.3f}", res.num_matvecs,
                     f"{rel(float(res.nodes.max()))} (top node)", "", *memory])
        if found["PyHessian"]:
            torch.manual_seed(0)
            _attempt(rows, "SLQ density", "PyHessian density(iter=90, n_v=1)", device,
                     _pyhessian_counted(lambda: peers.pyhessian(model, (x, y)).density(iter=90, n_v=1)),
                     lambda out: f"{rel(float(np.max(out[0][0])))} (top node)")
        yield "\n".join([f"### {name} ({n:,} parameters, batch {x.shape[0]}; top eigenvalue {top:.6g})\n",
                table(["job", "how", "seconds", "products", "error", "× peer (paired)",
                       *memory_column(device, "peak MiB")], rows), ""])
    yield "\n".join(_first_answers(device, tiny, tops, found["PyHessian"]))
    yield "\n".join(_hypergradient_job(device, tiny))


def _hypergradient_job(device: torch.device, tiny: bool) -> List[str]:
    """d validation loss / d log weight decay of a small MLP at its inner optimum (trained
    in float64 to a gradient norm near rounding), against the same computed with CG to
    1e-12; beside the hand-written truncated Neumann series people use (Lorraine et al.:
    H⁻¹v ≈ α Σ (I − αH)ʲ v with α the learning rate and a few terms)."""
    torch.manual_seed(0)
    widths = (4, 8, 3) if tiny else (16, 32, 4)
    model = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.Tanh(), nn.Linear(widths[1], widths[2])).double().to(device)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(256, widths[0], generator=gen, dtype=torch.float64), torch.randint(0, widths[2], (256,), generator=gen)
    xv, yv = torch.randn(128, widths[0], generator=gen, dtype=torch.float64), torch.randint(0, widths[2], (128,), generator=gen)
    x, y, xv, yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
    hp = {"log_wd": torch.tensor(-3.0, dtype=torch.float64, device=device)}

    def inner(w, h):
        out = torch.func.functional_call(model, w, (x,))
        return nn.functional.cross_entropy(out, y) + 0.5 * torch.exp(h["log_wd"]) * sum((p**2).sum() for p in w.values())

    def outer(w, h):
        return nn.functional.cross_entropy(torch.func.functional_call(model, w, (xv,)), yv)

    w = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    opt = torch.optim.LBFGS(list(w.values()), lr=1, max_iter=200 if tiny else 500, tolerance_grad=1e-10,
                            tolerance_change=0,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = inner(w, hp)
        value.backward()
        return value

    for _ in range(2 if tiny else 5):
        opt.step(closure)
    w = {k: p.detach() for k, p in w.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = hf.hypergradient(inner, outer, w, hp, tol=1e-12, stationarity_tol=1.0)
    ref = float(ref["log_wd"])
    rows = []

    def rel(value: float) -> str:
        return f"{abs(value - ref) / abs(ref):.1e}"

    for label, options in (("hvpfunc hypergradient(solver='cg'), defaults", {}),
                           ("hvpfunc hypergradient(solver='neumann'), defaults", {"solver": "neumann"})):
        def job(options=options):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return hf.hypergradient(inner, outer, w, hp, **options)

        (g, res), seconds = _timed(job, device)
        rows.append(["hypergradient", f"{label} ({res.status})", f"{seconds:.3f}", res.num_matvecs, rel(float(g["log_wd"]))])

    def handwritten(terms: int = 10, lr: float = 0.1):
        params = list(w.values())
        ws = [p.detach().requires_grad_(True) for p in params]
        names = list(w)
        wt = dict(zip(names, ws))
        g_in = torch.autograd.grad(inner(wt, hp), ws, create_graph=True)
        v = list(torch.autograd.grad(outer(wt, hp), ws))
        p_, acc = [t.clone() for t in v], [t.clone() for t in v]
        for _ in range(terms):
            hv = torch.autograd.grad(g_in, ws, p_, retain_graph=True)
            p_ = [a - lr * b for a, b in zip(p_, hv)]
            acc = [a + b for a, b in zip(acc, p_)]
        h = {"log_wd": hp["log_wd"].clone().requires_grad_(True)}
        g2 = torch.autograd.grad(inner(wt, h), ws, create_graph=True)
        mixed = torch.autograd.grad(g2, h["log_wd"], [lr * a for a in acc])[0]
        return -mixed, terms + 1

    (g, count), seconds = _timed(handwritten, device)
    rows.append(["hypergradient", "hand-written Neumann (10 terms, α = lr = 0.1, Lorraine et al.)", f"{seconds:.3f}",
                 count, rel(float(g))])
    n = sum(p.numel() for p in w.values())
    return [f"### Hypergradient: d validation loss / d log weight decay ({n:,} parameters, inner optimum by LBFGS)\n",
            table(["job", "how", "seconds", "products", "error"], rows), ""]
