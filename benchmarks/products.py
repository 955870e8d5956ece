"""Cost of one Hessian-vector product, and of 16, as multiples of one gradient."""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

import hvpfunc as hf

from . import peers
from .harness import median_seconds, paired_medians, peak_bytes, table

MODES = ["forward-over-reverse", "reverse-over-reverse", "reverse-over-reverse-recomputed", "linearize", "compiled"]


@contextlib.contextmanager
def _math_attention():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _recomputed_double_backward(model, x, y, params):
    """Double backward recomputed every call (hessian-eigenthings' way, written out)."""

    def matvec(v: List[Tensor]):
        g = torch.autograd.grad(_loss(model, x, y), params, create_graph=True)
        return torch.autograd.grad(g, params, v)

    return matvec


def _autograd_functional(model, x, y, params, names):
    def f(*ps):
        return nn.functional.cross_entropy(torch.func.functional_call(model, dict(zip(names, ps)), (x,)), y)

    return lambda v: torch.autograd.functional.hvp(f, tuple(p.detach() for p in params), tuple(v))[1]


def _measure(build: Callable[[], Callable], arg, device, gradient: Callable[[], object]
             ) -> Tuple[Optional[float], Optional[int], str]:
    """(seconds per call as a multiple of one gradient, timed alternately with it; peak
    bytes incl. what the build keeps alive; note). A builder that fails with the default
    attention kernels is retried with the math kernel."""
    note = ""
    try:
        fn = build()
        fn(arg)
    except (RuntimeError, NotImplementedError) as err:
        if "attention" not in str(err) and "scaled_dot_product" not in str(err):
            return None, None, f"fails: {str(err).splitlines()[0][:60]}"
        note = "fails with default attention; timed with math kernel forced"
        with _math_attention():
            return (*_measure(build, arg, device, gradient)[:2], note)
    seconds, grad_seconds = paired_medians(functools.partial(fn, arg), gradient, device)
    del fn  # free what the build holds before measuring a fresh build's memory
    memory = peak_bytes(lambda: build()(arg), device)
    return seconds / grad_seconds, memory, note


def run(models: Dict[str, tuple], device: torch.device, *, vectors: int = 16) -> str:
    return "\n".join(tables(models, device, vectors=vectors))


def tables(models: Dict[str, tuple], device: torch.device, *, vectors: int = 16) -> Iterator[str]:
    """Each model's table as soon as it is measured (a run cut short keeps them)."""
    for name, (model, x, y) in models.items():
        params = [p for p in model.parameters()]
        names = [k for k, _ in model.named_parameters()]
        tree = {k: p.detach() for k, p in model.named_parameters()}
        gen = torch.Generator().manual_seed(0)
        v_tree = hf.tree.random_like(tree, generator=gen, kind="gaussian")
        v_list = [v_tree[k] for k in names]
        v_flat = torch.cat([t.reshape(-1) for t in v_list])
        V_tree = hf.tree.random_like(tree, generator=gen, kind="gaussian", batch=vectors)

        def grad_call(_):
            return torch.autograd.grad(_loss(model, x, y), params)

        t_grad = median_seconds(lambda: grad_call(None), device)
        m_grad = peak_bytes(lambda: grad_call(None), device)

        def f(p):
            return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

        auto = hf.hvp_fn(f, tree)
        rows: List[list] = []

        def add(label: str, build: Callable[[], Callable], arg, per: int = 1) -> None:
            # Each row's calls alternate with gradients: a shared machine drifts over a
            # run, and a ratio to a gradient measured minutes earlier would carry that drift.
            ratio, memory, note = _measure(build, arg, device, lambda: grad_call(None))
            ratio = "—" if ratio is None else f"{ratio / per:.2f}×"
            mem = "n/a" if memory is None or m_grad is None else f"{memory / m_grad:.1f}×"
            rows.append([label, ratio, mem, note])

        add(f"hvpfunc auto (chose {auto.mode})", lambda: hf.hvp_fn(f, tree), v_tree)
        # what a job pays before its first product: checks, recorded operations, the graph
        add("construction: hvpfunc hvp_fn(f, params), auto", lambda: lambda _: hf.hvp_fn(f, tree), None)
        for mode in MODES:
            add(f"hvpfunc {mode}", lambda mode=mode: hf.hvp_fn(f, tree, mode=mode), v_tree)
        add("double backward, recomputed (inline)", lambda: _recomputed_double_backward(model, x, y, params), v_list)
        add("torch.autograd.functional.hvp", lambda: _autograd_functional(model, x, y, params, names), v_list)
        if peers.installed()["PyHessian"]:
            add("PyHessian (graph reused)", lambda: peers.pyhessian_matvec(peers.pyhessian(model, (x, y))), v_list)
        if peers.installed()["hessian-eigenthings"]:
            add("hessian-eigenthings HessianOperator", lambda: peers.eigenthings_operator(model, (x, y)).matvec, v_flat)
        if peers.installed()["curvlinops"]:
            add("curvlinops HessianLinearOperator", lambda: peers.curvlinops_operator(model, (x, y)).__matmul__, v_flat)
        loop_v = hf.tree.unstack(V_tree)
        add(f"{vectors} vectors: hvpfunc vmap(auto), per vector", lambda: torch.func.vmap(hf.hvp_fn(f, tree)), V_tree, vectors)
        add(f"{vectors} vectors: hvpfunc vmap(forward-over-reverse), per vector",
            lambda: torch.func.vmap(hf.hvp_fn(f, tree, mode="forward-over-reverse")), V_tree, vectors)
        add(f"{vectors} vectors: loop of hvpfunc auto, per vector",
            lambda: (lambda mv: (lambda vs: [mv(v) for v in vs]))(hf.hvp_fn(f, tree)), loop_v, vectors)
        if peers.installed()["PyHessian"]:
            add(f"{vectors} vectors: PyHessian loop, per vector",
                lambda: (lambda mv: (lambda vs: [mv([v[k] for k in names]) for v in vs]))(
                    peers.pyhessian_matvec(peers.pyhessian(model, (x, y)))), loop_v, vectors)
        if peers.installed()["curvlinops"]:
            V_flat = torch.cat([V_tree[k].reshape(vectors, -1) for k in names], dim=1).T.contiguous()
            add(f"{vectors} vectors: curvlinops H @ V, per vector",
                lambda: peers.curvlinops_operator(model, (x, y)).__matmul__, V_flat, vectors)
        n = sum(p.numel() for p in params)
        yield "\n".join([f"### {name} ({n:,} parameters, batch {x.shape[0]}): one gradient = {t_grad * 1e3:.2f} ms\n",
                         table(["way to compute H·v", "time / gradient", "peak memory / gradient", "note"], rows), ""])
