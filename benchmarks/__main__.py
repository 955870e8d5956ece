"""Run hvpfunc's benchmarks and print markdown tables.

    python -m benchmarks                      # CPU, small models
    python -m benchmarks --device cuda --size large
    python -m benchmarks --only jobs          # or: products, solvers, choices, estimators, sharded

Peers (PyHessian, hessian-eigenthings, curvlinops) are compared where installed:
pip install -e ".[bench]".
"""

from __future__ import annotations

import argparse
from typing import Iterator

import torch

from . import choices, estimators, jobs, peers, products, sharded, solvers
from .harness import describe
from .models import build


def _stream(parts: Iterator[str]) -> None:
    for part in parts:
        print(part, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default=None, choices=["tiny", "small", "large"],
                        help="model sizes (default: small on CPU, large on CUDA)")
    parser.add_argument("--only", choices=["jobs", "products", "solvers", "choices", "estimators", "sharded"], default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    size = args.size or ("large" if device.type == "cuda" else "small")
    print(f"# hvpfunc benchmarks — {describe(device)}, float32, model size {size!r}\n")
    found = peers.installed()
    print("peers: " + ", ".join(f"{k} {'installed' if v else 'not installed (skipped)'}" for k, v in found.items()))
    print("Times are medians of 10 calls after 3 warm-up calls, as multiples of one gradient of the same loss "
          "(torch.autograd.grad, called alternately with each row's calls, so that drift cancels); memory is the peak GPU allocation of building "
          "the operator and one product, as a multiple of a gradient's.\n")
    if args.only in (None, "jobs"):
        print("## Jobs, end to end (construction included)\n")
        _stream(jobs.tables(device, tiny=size == "tiny"))
    if args.only in (None, "products"):
        print("## Hessian-vector products\n")
        _stream(products.tables(build(size, device), device))
    if args.only in (None, "solvers"):
        print("## Solvers\n")
        print(solvers.run(device, tiny=size == "tiny"))
    if args.only in (None, "choices"):
        print("## Choices by device: each default against its alternatives\n")
        _stream(choices.tables(build(size, device), device, tiny=size == "tiny"))
    if args.only in (None, "estimators"):
        print("## Products per answer (dense operators, float64)\n")
        print(estimators.run(tiny=size == "tiny"))
    if args.only in (None, "sharded"):
        print("## Sharded model (FSDP2, 2 processes): memory per rank\n")
        print(sharded.run(tiny=size == "tiny"))


if __name__ == "__main__":
    main()
