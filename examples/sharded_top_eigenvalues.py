"""Top eigenvalues and trace of a model sharded with FSDP2 (``fully_shard``), on 2+ processes.

Every rank holds half of each parameter and its own data; hvpfunc's solvers keep their
Krylov basis as each rank's shards (1/world of the memory) and complete every inner
product with one all-reduce. The exact product runs the module hook-free with each
layer's parameters gathered for the product; ``mode="gradient-difference"`` runs FSDP's
own forward and backward instead.

Run (CPU, gloo):   torchrun --nproc-per-node 2 examples/sharded_top_eigenvalues.py
On GPUs (NCCL), the same script picks a CUDA device per rank.
"""

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import hvpfunc as hf


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))

    torch.manual_seed(0)  # the same initial model on every rank before sharding
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 5))
    model = model.to(device, torch.float64)
    for layer in (model[0], model[2], model[4]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    x = torch.randn(256, 20, generator=gen, dtype=torch.float64).to(device)
    y = torch.randint(0, 5, (256,), generator=gen).to(device)

    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    top = hf.lanczos(matvec, v0, k=5, tol=1e-8)
    trace = hf.trace(matvec, params, num_probes=60, generator=torch.Generator().manual_seed(1))
    approx, _ = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode="gradient-difference")
    top_fd = hf.lanczos(approx, v0, k=5, tol=1e-8)

    held = sum(p.to_local().numel() for p in params.values())
    total = sum(p.numel() for p in params.values())
    if rank == 0:
        print(f"{world} ranks; this rank holds {held} of {total} parameters (and of every basis vector)")
        print(f"top-5 eigenvalues (exact products):        {top.eigenvalues.tolist()} [{top.status}]")
        print(f"top-5 eigenvalues (gradient differences):  {top_fd.eigenvalues.tolist()} [{top_fd.status}]")
        print(f"trace (Hutch++, 60 products): {float(trace.estimate):.5g} ± {float(trace.stderr):.2g}")
    # torch 2.13's gloo threads may still hold the last collectives' buffers: released
    # after the interpreter has begun to exit, they abort the process. The barrier ends
    # every rank's collectives; the pause lets the threads take the GIL to release them.
    dist.barrier()
    time.sleep(0.1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
