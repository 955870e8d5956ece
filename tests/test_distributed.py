"""Two gloo processes on CPU, each with an uneven shard of the data, must reproduce the
single-process full-data products and Lanczos eigenvalues."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hvpfunc as hf
from hvpfunc.distributed import data_parallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from references import DT, flat, gloo_group, mlp

SPLIT = 13  # rank 0 holds 13 examples, rank 1 holds 17


def _data():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(30, 3, generator=gen, dtype=DT), torch.randn(30, 1, generator=gen, dtype=DT)


def _v(params):
    return hf.tree.random_like(params, generator=torch.Generator().manual_seed(1), kind="gaussian")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        x, y = _data()
        shard = (x[:SPLIT], y[:SPLIT]) if rank == 0 else (x[SPLIT:], y[SPLIT:])
        local, params = hf.model_hvp_fn(mlp([3, 5, 1]), nn.functional.mse_loss, shard)
        matvec = data_parallel(local, weight=len(shard[1]))
        product = flat(matvec(_v(params)))
        v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(2), kind="gaussian")
        top = hf.lanczos(matvec, v0, k=2, tol=1e-10)
        summed = flat(data_parallel(local, reduce="sum")(_v(params)))
        batched = _batched_jobs(matvec, params)
        torch.save({"product": product, "top": top.eigenvalues, "summed": summed, "local": flat(local(_v(params))),
                    **batched}, os.path.join(out_dir, f"rank{rank}.pt"))


def _batched_jobs(matvec, params) -> dict:
    """Trace, diagonal and SLQ with their default chunk_size, and the collectives each
    made (counted on dist.all_reduce)."""
    calls = {"n": 0}
    original = dist.all_reduce

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted
    try:
        out = {}
        for name, job in (
            ("trace", lambda: hf.trace(matvec, params, num_probes=32, method="hutchinson",
                                       generator=torch.Generator().manual_seed(3)).estimate),
            ("diagonal", lambda: flat(hf.diagonal(matvec, params, num_probes=32,
                                                  generator=torch.Generator().manual_seed(4)).estimate)),
            ("density", lambda: hf.spectral_density(matvec, params, num_probes=4, num_iters=10,
                                                    generator=torch.Generator().manual_seed(5)).nodes),
        ):
            calls["n"] = 0
            out[name] = job()
            out[name + "_collectives"] = calls["n"]
        return out
    finally:
        dist.all_reduce = original


@pytest.mark.slow
def test_two_processes_reproduce_the_full_data_hessian(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x, y = _data()
    full, params = hf.model_hvp_fn(mlp([3, 5, 1]), nn.functional.mse_loss, (x, y))
    want = flat(full(_v(params)))
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(2), kind="gaussian")
    want_top = hf.lanczos(full, v0, k=2, tol=1e-10).eigenvalues
    batched = _batched_jobs(full, params)
    for r in results:
        assert torch.allclose(r["product"], want, rtol=1e-10, atol=1e-12)
        assert torch.allclose(r["top"], want_top, rtol=1e-9)
        # batched probes under data parallelism: one collective per 16 stacked vectors
        assert torch.allclose(r["trace"], batched["trace"], rtol=1e-10)
        assert torch.allclose(r["diagonal"], batched["diagonal"], rtol=1e-9, atol=1e-12)
        assert torch.allclose(r["density"], batched["density"], rtol=1e-8, atol=1e-10)
        assert r["trace_collectives"] == 2 and r["diagonal_collectives"] == 2
        assert r["density_collectives"] == 10  # one per Lanczos step for the 4 probes together
        assert torch.allclose(r["summed"], results[0]["local"] + results[1]["local"], rtol=1e-12)


def test_errors_without_a_process_group_and_for_bad_options():
    with pytest.raises(RuntimeError, match="init_process_group"):
        data_parallel(lambda v: v)
    with pytest.raises(ValueError, match="reduce must be one of"):
        data_parallel(lambda v: v, reduce="max")
    with pytest.raises(ValueError, match="weight applies to reduce='mean' only"):
        data_parallel(lambda v: v, reduce="sum", weight=3.0)


def test_vmap_over_a_reduced_matvec_is_a_clear_error(tmp_path):
    with gloo_group(0, str(tmp_path / "init1"), world_size=1):
        matvec = data_parallel(lambda v: {"w": 2.0 * v["w"]})
        assert torch.equal(matvec({"w": torch.ones(3)})["w"], 2.0 * torch.ones(3))
        with pytest.raises(RuntimeError, match="chunk_size=1"):
            torch.func.vmap(matvec)({"w": torch.ones(2, 3)})


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    with gloo_group(rank, init_file):
        x, y = _data()
        half = slice(0, 15) if rank == 0 else slice(15, 30)  # DDP averages the ranks' gradients equally
        model = nn.parallel.DistributedDataParallel(mlp([3, 5, 1]))
        matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x[half], y[half]), mode="gradient-difference")
        v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(1), kind="gaussian")
        v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(2), kind="gaussian")
        top = hf.lanczos(matvec, v0, k=2, tol=1e-9)
        torch.save({"product": flat(matvec(v)), "top": top.eigenvalues,
                    "intact": all(torch.equal(p, q) for p, q in zip(model.module.parameters(), mlp([3, 5, 1]).parameters()))},
                   os.path.join(out_dir, f"ddp{rank}.pt"))


@pytest.mark.slow
def test_gradient_differences_through_ddp_own_backward(tmp_path):
    # DDP has no double backward (pytorch#63812); gradient differences need only its own
    # backward, whose all-reduce makes every rank's product the full-data one.
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    x, y = _data()
    full, params = hf.model_hvp_fn(mlp([3, 5, 1]), nn.functional.mse_loss, (x, y))
    want = flat(full(_v(params)))
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(2), kind="gaussian")
    want_top = hf.lanczos(full, v0, k=2, tol=1e-10).eigenvalues
    for r in range(2):
        got = torch.load(tmp_path / f"ddp{r}.pt")
        assert float((got["product"] - want).norm() / want.norm()) < 1e-8
        assert torch.allclose(got["top"], want_top, rtol=1e-7)
        assert got["intact"]
