"""Peak memory per rank of an FSDP2 model's Hessian products against its gradient step.

Two gloo processes on CPU; each measurement runs in fresh processes, and a rank's cost is
the growth of its peak resident memory (``ru_maxrss``) over what it held after building
the sharded model and its batch. Rows: one training gradient (FSDP's own forward and
backward), the exact product (hook-free, parameters gathered; construction and one
product), one gradient-difference product (FSDP's hooks), and a 20-vector Lanczos basis
(its shards), the last as arithmetic from the local sizes.

    python -m benchmarks --only sharded
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from datetime import timedelta
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import hvpfunc as hf

SIZES = {"small": (1024, 4, 256), "tiny": (64, 2, 32)}  # width, depth, batch per rank


def _model(size: str) -> nn.Module:
    width, depth, _ = SIZES[size]
    torch.manual_seed(0)
    layers: List[nn.Module] = [nn.Linear(256, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _worker(rank: int, init_file: str, what: str, out_dir: str, size: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=300))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        model = _model(size)
        batch = SIZES[size][2]
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gen = torch.Generator().manual_seed(rank)
        x, y = torch.randn(batch, 256, generator=gen), torch.randint(0, 10, (batch,), generator=gen)
        loss = nn.CrossEntropyLoss()
        base = _peak_kib()
        if what == "gradient":
            loss(model(x), y).backward()
        else:
            mode = "gradient-difference" if what == "gradient-difference" else "auto"
            matvec, params = hf.model_hvp_fn(model, loss, (x, y), mode=mode)
            matvec(hf.tree.random_like(params, generator=torch.Generator().manual_seed(0)))
        local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        with open(os.path.join(out_dir, f"{what}{rank}"), "w") as f:
            f.write(f"{_peak_kib() - base} {local}")
        # torch 2.13's gloo threads release the collectives' tensors after the caller
        # moves on; at interpreter exit that aborts the process: every rank waits, then
        # the GIL is free for a moment so that they let go first
        dist.barrier()
        time.sleep(0.1)
    finally:
        dist.destroy_process_group()


def _measure(what: str, size: str) -> Dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(os.path.join(d, "init"), what, d, size), nprocs=2, join=True)
        values = [open(os.path.join(d, f"{what}{r}")).read().split() for r in range(2)]
    return {"peak_mib": max(int(v[0]) for v in values) / 1024, "local_mib": max(int(v[1]) for v in values) / 2**20}


def run(*, tiny: bool = False) -> str:
    size = "tiny" if tiny else "small"
    n = sum(p.numel() for p in _model(size).parameters())
    gradient = _measure("gradient", size)
    rows = [("training gradient (FSDP forward + backward)", gradient["peak_mib"])]
    for what, how in (("exact", "exact product (hook-free, gathered; build + 1 product)"),
                      ("gradient-difference", "gradient-difference product (FSDP hooks, 4 gradients)")):
        rows.append((how, _measure(what, size)["peak_mib"]))
    basis = 21 * gradient["local_mib"]
    out = [f"MLP {n:,} parameters (float32, {n * 4 / 2**20:.1f} MiB whole), batch {SIZES[size][2]} per rank, 2 ranks, "
           f"torch {torch.__version__}, CPU (gloo); peak resident memory growth per rank",
           "", "| what | MiB per rank | × gradient |", "|---|---|---|"]
    for how, mib in rows:
        out.append(f"| {how} | {mib:.1f} | {mib / max(gradient['peak_mib'], 1e-9):.2f} |")
    out.append(f"| 20-vector Lanczos basis (+1), this rank's shards | {basis:.1f} (= 21 × {gradient['local_mib']:.1f}) "
               f"| {basis / max(gradient['peak_mib'], 1e-9):.2f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(run())
