"""Solvers on sharded vectors: two gloo processes, each holding half of every leaf (a
DTensor sharded on dim 0, as fully_shard makes them), against the dense single-process
reference. Every collective has a timeout, so a hang fails the test."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import hvpfunc as hf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from references import DT, DTENSOR_SECOND_DERIVATIVE, NEEDS_EXACT_SHARDED_PRODUCTS, gloo_group

N_A, SHAPE_B = 7, (5, 3)  # 22 parameters; rank 0 holds 4 + 9, rank 1 holds 3 + 6


def _matrix() -> torch.Tensor:
    """A symmetric positive definite 22 x 22 matrix with a known spectrum."""
    n = N_A + SHAPE_B[0] * SHAPE_B[1]
    lam = torch.cat([torch.tensor([9.0, 7.0, 6.5]), torch.linspace(0.5, 3.0, n - 3)]).to(DT)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(0), dtype=DT))
    return (Q * lam) @ Q.T


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        H = _matrix()

        def shard(full):
            return {"a": distribute_tensor(full[:N_A], mesh, [Shard(0)]),
                    "b": distribute_tensor(full[N_A:].reshape(SHAPE_B), mesh, [Shard(0)])}

        def matvec(v):  # the test's operator gathers; the solvers must not
            x = torch.cat([v["a"].full_tensor(), v["b"].full_tensor().reshape(-1)])
            return shard(H @ x)

        like = shard(torch.zeros(H.shape[0], dtype=DT))
        b = shard(torch.arange(1.0, H.shape[0] + 1, dtype=DT))
        v0 = shard(torch.ones(H.shape[0], dtype=DT))
        top = hf.lanczos(matvec, v0, k=3, tol=1e-10)
        gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
        out = {
            "local_sizes": (like["a"].to_local().numel(), like["b"].to_local().numel()),
            "lanczos": top.eigenvalues,
            "lanczos_vector_local": top.eigenvectors["a"].to_local().shape,
            "lanczos_vector": torch.cat([top.eigenvectors["a"].full_tensor()[0],
                                         top.eigenvectors["b"].full_tensor()[0].reshape(-1)]),
            "smallest": hf.lanczos(matvec, v0, k=2, which="SA", tol=1e-10).eigenvalues,
            "power": hf.power_iteration(matvec, v0, tol=1e-10, max_iters=2000).eigenvalues,
            "cg": _gather(hf.cg(matvec, b, tol=1e-12).x),
            "minres": _gather(hf.minres(matvec, b, tol=1e-12).x),
            "neumann": _gather(hf.neumann(matvec, b, tol=1e-8, num_terms=3000).x),
            "auto": hf.trace(matvec, like, num_probes=66, generator=gen(1)).estimate,  # sketch spans all
            "hutchinson": hf.trace(matvec, like, num_probes=200, method="hutchinson", generator=gen(2)),
            "frobenius": hf.squared_frobenius_norm(matvec, like, num_probes=400, generator=gen(3)),
            "diagonal": hf.diagonal(matvec, like, num_probes=400, generator=gen(4)),
            "density": hf.spectral_density(matvec, like, num_probes=2, num_iters=22, generator=gen(5)),
        }
        for key in ("diagonal",):
            result = out[key]
            out[key] = (_gather(result.estimate), _gather(result.stderr))
        # Ranks time their steps apart, and the basis grows on timings: with rank 0 wanting
        # to grow and rank 1 not, they must still agree (else their collectives part ways).
        from hvpfunc._eigen import lanczos as module

        original = module._grown
        module._grown = lambda state: min(2 * (state.V.shape[0] - 1), state.cap) if rank == 0 else state.V.shape[0] - 1
        try:
            out["disagreeing"] = hf.lanczos(matvec, v0, k=2, which="SA", tol=1e-10, max_iters=400).eigenvalues
        finally:
            module._grown = original
        out["xtrace"] = hf.trace(matvec, like, num_probes=20, method="xtrace", generator=gen(6))
        xdiag = hf.diagonal(matvec, like, num_probes=20, method="xdiag", generator=gen(7))
        out["xdiag"] = (_gather(xdiag.estimate), _gather(xdiag.stderr))
        out["blocks"] = hf.block_spectra(matvec, like, num_probes=200, k=1, tol=1e-10, generator=gen(9))
        # two per block: the blocks' Lanczos runs in lockstep on the shards
        out["blocks2"] = hf.block_spectra(matvec, like, num_probes=4, k=2, tol=1e-10, generator=gen(10))
        out["xtrace_full"] = hf.trace(matvec, like, num_probes=44, method="xtrace", generator=gen(8)).estimate
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))


def _gather(tree) -> torch.Tensor:
    return torch.cat([tree["a"].full_tensor(), tree["b"].full_tensor().reshape(-1)])


@pytest.mark.slow
def test_solvers_on_sharded_vectors_match_the_dense_reference(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    H = _matrix()
    ev = torch.linalg.eigvalsh(H)
    b = torch.arange(1.0, H.shape[0] + 1, dtype=DT)
    x = torch.linalg.solve(H, b)
    for rank in range(2):
        r = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert r["local_sizes"] == ((4, 9) if rank == 0 else (3, 6))  # each rank holds its shards only
        assert torch.allclose(r["lanczos"], ev.flip(0)[:3], rtol=1e-10)
        assert torch.allclose(r["disagreeing"], ev[:2], rtol=1e-9)
        assert r["lanczos_vector_local"][0] == 3  # k eigenvectors stacked, sharded after the stack dim
        u = r["lanczos_vector"]
        assert float((H @ u - ev[-1] * u).norm()) < 1e-8
        assert torch.allclose(r["smallest"], ev[:2], rtol=1e-9)
        assert torch.allclose(r["power"], ev[-1:], rtol=1e-9)
        for solver in ("cg", "minres"):
            assert torch.allclose(r[solver], x, rtol=1e-9, atol=1e-10), solver
        assert torch.allclose(r["neumann"], x, rtol=1e-6, atol=1e-7)
        assert abs(float(r["auto"]) - float(H.trace())) < 1e-9
        for key, exact in (("hutchinson", H.trace()), ("frobenius", (H * H).sum())):
            est = r[key]
            assert abs(float(est.estimate) - float(exact)) < 5 * float(est.stderr), key
        mean, stderr = r["diagonal"]
        assert bool(((mean - H.diagonal()).abs() < 5 * stderr + 1e-12).all())
        xtrace = r["xtrace"]  # leave-one-out sketches from Cholesky QR on the shards
        assert abs(float(xtrace.estimate) - float(H.trace())) < 5 * float(xtrace.stderr) + 1e-9
        assert abs(float(r["xtrace_full"]) - float(H.trace())) < 1e-9  # a full sketch is exact
        blocks = r["blocks"]
        for i, idx in enumerate((slice(0, N_A), slice(N_A, None))):
            block = H[idx, idx]
            assert abs(float(blocks.traces[i]) - float(block.trace())) < 5 * float(blocks.stderrs[i])
            assert abs(float(blocks.top[i, 0]) - float(torch.linalg.eigvalsh(block)[-1])) < 1e-8
            assert torch.allclose(r["blocks2"].top[i], torch.linalg.eigvalsh(block).flip(0)[:2], atol=1e-8)
        mean, stderr = r["xdiag"]
        assert bool(((mean - H.diagonal()).abs() < 5 * stderr + 1e-9).all())
        density = r["density"]
        assert abs(float(density.weights.sum()) - 2.0) < 1e-8 or abs(float(density.weights.sum()) - 1.0) < 1e-8
        assert float(density.nodes.min()) > ev[0] - 1e-8 and float(density.nodes.max()) < ev[-1] + 1e-8


def _fsdp_worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        model = _fsdp_model()
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        before = {k: p.to_local().clone() for k, p in model.named_parameters()}
        x, y = _fsdp_data()
        half = slice(0, 20) if rank == 0 else slice(20, 40)  # each rank its own data
        out = {}
        for mode in ("auto", "reverse-over-reverse-recomputed", "gradient-difference"):
            matvec, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x[half], y[half]), mode=mode)
            v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(1))
            out[mode] = hf.lanczos(matvec, v0, k=5, tol=1e-10).eigenvalues
        matvec, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x[half], y[half]))
        b = {k: torch.ones_like(p) for k, p in params.items()}
        out["cg"] = {k: t.full_tensor() for k, t in hf.cg(matvec, b, damping=0.5, tol=1e-12).x.items()}
        out["local"] = sum(p.to_local().numel() for p in params.values())
        out["intact"] = all(torch.equal(p.to_local(), before[k]) for k, p in model.named_parameters())
        loss = nn.functional.cross_entropy(model(x[half]), y[half])
        loss.backward()  # FSDP still trains: its hooks are back
        out["trains"] = all(p.grad is not None for p in model.parameters())
        torch.save(out, os.path.join(out_dir, f"fsdp{rank}.pt"))


def _fsdp_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _fsdp_data():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(40, 4, generator=gen, dtype=DT), torch.randint(0, 3, (40,), generator=gen)


@pytest.mark.slow
@pytest.mark.skipif(not DTENSOR_SECOND_DERIVATIVE, reason=NEEDS_EXACT_SHARDED_PRODUCTS)
def test_fsdp2_model_exact_products_and_gradient_differences(tmp_path):
    # FSDP2's hooks have no double backward (pytorch#172543): the exact modes run the
    # module hook-free with gathered parameters; gradient differences run its hooks.
    mp.spawn(_fsdp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    model = _fsdp_model()
    x, y = _fsdp_data()
    full, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    want = hf.lanczos(full, hf.tree.random_like(params, generator=torch.Generator().manual_seed(1)),
                      k=5, tol=1e-10).eigenvalues
    n = sum(p.numel() for p in params.values())
    b = {k: torch.ones_like(p) for k, p in params.items()}
    x_want = hf.cg(full, b, damping=0.5, tol=1e-12).x
    for rank in range(2):
        r = torch.load(tmp_path / f"fsdp{rank}.pt", weights_only=False)
        for mode in ("auto", "reverse-over-reverse-recomputed"):
            assert torch.allclose(r[mode], want, rtol=1e-8), mode
        assert torch.allclose(r["gradient-difference"], want, rtol=1e-7)
        assert all(torch.allclose(r["cg"][k], x_want[k], rtol=1e-9, atol=1e-11) for k in b)
        assert r["local"] < n  # this rank's shards only
        assert r["intact"] and r["trains"]


@pytest.mark.slow
@pytest.mark.skipif(not DTENSOR_SECOND_DERIVATIVE, reason=NEEDS_EXACT_SHARDED_PRODUCTS)
def test_example_runs_under_torchrun():
    import subprocess

    script = Path(__file__).resolve().parent.parent / "examples" / "sharded_top_eigenvalues.py"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("top-5")]
    exact, approx = ([float(v) for v in line.split("[", 1)[1].split("]")[0].split(",")] for line in lines)
    assert all(abs(a - b) < 1e-7 * abs(a) for a, b in zip(exact, approx))
    assert done.stdout.count("[converged]") == 2


def _ridge():
    gen = torch.Generator().manual_seed(0)
    X, y = torch.randn(30, 6, generator=gen, dtype=DT), torch.randn(30, generator=gen, dtype=DT)
    Xv, yv = torch.randn(20, 6, generator=gen, dtype=DT), torch.randn(20, generator=gen, dtype=DT)
    return X, y, Xv, yv


def _hypergradient_worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (2,))
        X, y, Xv, yv = _ridge()
        lam = 0.5
        w_star = torch.linalg.solve(X.T @ X + lam * torch.eye(6, dtype=DT), X.T @ y)

        def full(w):  # the losses gather the sharded weights they use
            return w.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial("avg")])

        def inner(w, h):
            return 0.5 * ((X @ full(w["w"]) - y) ** 2).sum() + 0.5 * h["lam"] * (full(w["w"]) ** 2).sum()

        def outer(w, h):
            return 0.5 * ((Xv @ full(w["w"]) - yv) ** 2).sum()

        params = {"w": distribute_tensor(w_star, mesh, [Shard(0)])}
        grad, result = hf.hypergradient(inner, outer, params, {"lam": torch.tensor(lam, dtype=DT)})
        torch.save({"grad": grad["lam"], "status": str(result.status), "x_is_sharded": result.x["w"].to_local().numel()},
                   os.path.join(out_dir, f"hyper{rank}.pt"))


@pytest.mark.slow
@pytest.mark.skipif(not DTENSOR_SECOND_DERIVATIVE, reason=NEEDS_EXACT_SHARDED_PRODUCTS)
def test_hypergradient_with_sharded_parameters(tmp_path):
    mp.spawn(_hypergradient_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    X, y, Xv, yv = _ridge()
    A = X.T @ X + 0.5 * torch.eye(6, dtype=DT)
    w_star = torch.linalg.solve(A, X.T @ y)
    # d/dλ of the validation loss at w*(λ) = A⁻¹Xᵀy: dw*/dλ = −A⁻¹w*
    want = -(Xv.T @ (Xv @ w_star - yv)) @ torch.linalg.solve(A, w_star)
    for rank in range(2):
        r = torch.load(tmp_path / f"hyper{rank}.pt", weights_only=False)
        assert r["status"] == "converged" and r["x_is_sharded"] == 3
        assert torch.allclose(r["grad"], want, rtol=1e-9)


def _probe_worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from hvpfunc._products import sharded

        model = _fsdp_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (2,)))
        x, y = _fsdp_data()
        real = sharded.gathered

        class _Cut(torch.autograd.Function):
            # torch 2.11's all-gather: a backward that is not itself differentiable
            @staticmethod
            def forward(ctx, u):
                return u.clone()

            @staticmethod
            def backward(ctx, g):
                return g.detach()

        sharded.gathered = lambda t: _Cut.apply(real(t)) if t is not None and hasattr(t, "device_mesh") else real(t)
        params = {k: p.detach() for k, p in model.named_parameters()}
        refused = {}
        try:
            for how, build in (("model_hvp_fn", lambda: hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))),
                               ("hvp_fn", lambda: hf.hvp_fn(lambda p: sum((t.full_tensor() ** 2).sum()
                                                                          for t in p.values()), params))):
                try:
                    build()
                    refused[how] = ""
                except RuntimeError as err:
                    refused[how] = str(err)
        finally:
            sharded.gathered = real
        hf.hvp_fn(lambda p: sum((t.full_tensor() ** 2).sum() for t in p.values()), params, mode="gradient-difference")
        torch.save(refused, Path(out_dir) / f"probe{rank}.pt")


@pytest.mark.slow
def test_exact_products_are_refused_where_the_all_gather_has_no_second_derivative(tmp_path):
    # torch 2.11: the backward of DTensor's all-gather is not differentiable, and every
    # exact product of an FSDP2 model came back as zeros, marked converged by the solvers
    mp.spawn(_probe_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        refused = torch.load(tmp_path / f"probe{rank}.pt")
        for how in ("model_hvp_fn", "hvp_fn"):
            assert "second derivative of DTensor's all-gather" in refused[how], how
            assert "mode='gradient-difference'" in refused[how], how
