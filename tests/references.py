"""Independent references shared by the tests: operators with known spectra and small
float64 networks whose dense Hessians torch.func.hessian can form."""

from __future__ import annotations

import contextlib
import math
import time
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, Tuple

import torch
from torch import Tensor, nn

DT = torch.float64


def flat(tree: Any) -> Tensor:
    """Concatenate a tree's leaves (tree order), for comparisons with dense references."""
    return torch.cat([leaf.reshape(-1) for leaf in torch.utils._pytree.tree_leaves(tree)])


def spectrum_operator(
    eigenvalues: Sequence[float], *, seed: int = 0
) -> Tuple[Callable[[Any], Any], Any, Tensor]:
    """A symmetric operator on the tree {"a": (n1,), "b": [(n2, 1)]} with the given
    eigenvalues in a random orthonormal basis. Returns (matvec, like, dense matrix)."""
    lam = torch.as_tensor(eigenvalues, dtype=DT)
    n = lam.numel()
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    n1 = max(1, n // 3)
    like = {"a": torch.zeros(n1, dtype=DT), "b": [torch.zeros(n - n1, 1, dtype=DT)]}

    def matvec(v: Any) -> Any:
        x = torch.cat([v["a"], v["b"][0].reshape(-1)])
        y = H @ x
        return {"a": y[:n1], "b": [y[n1:].reshape(-1, 1)]}

    return matvec, like, H


def random_tree(like: Any, seed: int) -> Any:
    gen = torch.Generator().manual_seed(seed)
    return torch.utils._pytree.tree_map(
        lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), like
    )


def mlp(sizes: Sequence[int], *, seed: int = 0, act: type = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def mlp_loss(sizes: Sequence[int], *, batch: int = 32, seed: int = 0):
    """(f, params, (x, y)) for a float64 tanh MLP regression loss at its initialization."""
    model = mlp(sizes, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, sizes[0], generator=gen, dtype=DT)
    y = torch.randn(batch, sizes[-1], generator=gen, dtype=DT)
    params = {k: p.detach().clone() for k, p in model.named_parameters()}

    def f(p: Any, x: Tensor, y: Tensor) -> Tensor:
        return ((torch.func.functional_call(model, p, (x,)) - y) ** 2).mean()

    return f, params, (x, y)


def solve_ill_conditioned_float32(solver: Callable[..., Any], kappa: float, *, tol: float, n: int = 200, seed: int = 0):
    """``solver(matvec, b, tol=tol)`` on a float32 SPD system with eigenvalues log-spaced
    in [1, κ] in a random basis, ConvergenceWarnings silenced: (result, its true relative
    residual ‖b − Hx‖/‖b‖ in float64)."""
    import warnings

    import hvpfunc as hf

    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    H = (Q * torch.logspace(0, math.log10(kappa), n, dtype=DT)) @ Q.T
    b = torch.randn(n, generator=gen, dtype=DT)
    H32 = H.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        res = solver(lambda v: H32 @ v, b.float(), tol=tol)
    return res, float((b - H @ res.x.double()).norm() / b.norm())


# A hung collective raises after this instead of hanging the test.
def scipy_iterative_cases() -> dict:
    """The symmetric real systems of scipy's iterative-solver tests
    (scipy/sparse/linalg/_isolve/tests/test_iterative.py, IterativeParams), as data:
    name -> (A, b, definite), float64; b = arange(n) unless the case gives one."""
    import numpy as np

    n = 40
    poisson1d = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    poisson2d = np.kron(poisson1d, np.eye(n)) + np.kron(np.eye(n), poisson1d)
    symmetric = np.random.RandomState(1234).rand(4, 4)
    pd = np.random.RandomState(1234).rand(9, 9)  # the file seeds numpy's global state alike
    saddle = np.zeros((11, 11))
    saddle[5, :5] = saddle[:5, 5] = [1, 2, 2, 2, 1]
    saddle[6:, :5] = saddle[:5, 6:] = -np.eye(5)
    saddle[6:, 6:] = -np.eye(5)
    cases = {
        "poisson1d": (poisson1d, None, True),
        "neg-poisson1d": (-poisson1d, None, False),
        "poisson2d": (poisson2d, None, True),
        "rand-diag": (np.diag([6.0, -5, 2, 7, -1, 10, 4, -3, -8, 9]), None, False),
        "rand-sym": (symmetric + symmetric.T, None, False),
        "rand-sym-pd": (pd @ pd.T, None, True),
        "sym-nonpd": (saddle, np.eye(11)[5], False),
    }
    return {name: (torch.as_tensor(A), torch.arange(A.shape[0], dtype=DT) if b is None else torch.as_tensor(b), pos)
            for name, (A, b, pos) in cases.items()}


COLLECTIVE_TIMEOUT = timedelta(seconds=60)

# torch 2.11's DTensor all-gather has no second derivative, and hvpfunc refuses exact
# products of sharded parameters there (tests/test_sharding.py emulates it on any torch)
DTENSOR_SECOND_DERIVATIVE = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 13)
NEEDS_EXACT_SHARDED_PRODUCTS = ("exact sharded products need a second derivative of DTensor's all-gather: torch 2.13 "
                                "has one, 2.11 has none (2.12 untried)")


@contextlib.contextmanager
def gloo_group(rank: int, init_file: str, world_size: int = 2) -> Iterator[None]:
    """A spawned test process's gloo process group (file store on ``init_file``, the
    collective timeout above), destroyed on the way out, also when the body raises.

    torch 2.13's gloo worker threads drop their reference to a finished collective's
    tensors after the caller has moved on; where that comes after the interpreter began
    to exit, taking the GIL ends the thread inside a destructor and the process aborts
    ("terminate called without an active exception", a third to a half of these tests'
    runs). A body that returns waits for every rank (barrier) and releases the GIL for a
    moment so that the threads let go first."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        yield
        dist.barrier()
        time.sleep(0.1)
    finally:
        dist.destroy_process_group()
