"""EigenTracker: sharpness along a training run, warm-started, against cold Lanczos runs."""

import pytest
import torch
from references import DT, mlp
from torch import nn

import hvpfunc as hf


def _training_run(track, steps: int = 30, every: int = 3, lr: float = 0.05):
    model = mlp([5, 16, 3])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=gen, dtype=DT), torch.randint(0, 3, (64,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        if step % every == 0:
            matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
            track(matvec, params, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("k, options, rtol, saving", [
    (1, {"find_copies": False}, 1e-5, 0.7),  # warm and unchecked (measured: 53 products against 93, errors 2e-6)
    (2, {"tol": 1e-6}, 1e-8, 0.9),  # the defaults: warm, with the copy check (199 against 227)
])
def test_warm_starts_follow_the_top_eigenvalues_with_fewer_products(k, options, rtol, saving):
    warm = hf.EigenTracker(k=k, **options)
    cold, reference = [], []
    tol = options.get("tol", 1e-3)

    def track(matvec, params, step):
        warm.update(matvec, params, step=step)
        start = hf.tree.random_like(params, generator=torch.Generator().manual_seed(step), kind="gaussian")
        cold.append(hf.lanczos(matvec, start, k=k, tol=tol).num_matvecs)
        reference.append(hf.lanczos(matvec, start, k=k, tol=1e-12).eigenvalues)

    _training_run(track)
    assert warm.steps == list(range(0, 30, 3)) and all(warm.converged)
    for got, want in zip(warm.eigenvalues, reference):
        assert torch.allclose(got, want, rtol=rtol)
    # the first call is a cold start too; the later ones reuse the previous eigenvectors
    assert sum(warm.num_matvecs[1:]) < saving * sum(cold[1:])


def _crossing(step: int, n: int = 500):
    """A Hessian whose 4th eigenvalue overtakes the top (10) at step 2, by 1%: 10.1."""
    Q, _ = torch.linalg.qr(torch.randn(n, 60, generator=torch.Generator().manual_seed(0), dtype=DT))
    lam = torch.cat([torch.tensor([10.0, 9.5, 9.0], dtype=DT),
                     torch.rand(57, generator=torch.Generator().manual_seed(1), dtype=DT) * 9 - 1])
    if step >= 2:
        lam[3] = 10.0 + 0.05 * step
    return (lambda v: Q @ (lam * (Q.T @ v))), torch.zeros(n, dtype=DT), float(lam.max())


@pytest.mark.parametrize("k, options", [(1, {}), (1, {"find_copies": True}), (2, {})])
def test_an_eigenvalue_overtaking_the_tracked_ones_is_found(k, options):
    # A warm start is not random: with k = 1 every warm update returned the old top (10)
    # as converged after the crossing. Now k = 1 starts cold, and a warm start (k >= 2,
    # or find_copies=True) is checked from a fresh vector.
    tracker = hf.EigenTracker(k=k, **options)
    for step in range(4):
        matvec, like, top = _crossing(step)
        res = tracker.update(matvec, like, step=step)
        assert res.status == "converged"
        assert abs(float(res.eigenvalues[0]) - top) <= 1e-3 * top, (step, res.eigenvalues, top)


def test_warm_starts_without_the_check_say_what_they_may_miss():
    tracker = hf.EigenTracker(k=1, find_copies=False)
    first = tracker.update(*_crossing(0)[:2])
    later = tracker.update(*_crossing(2)[:2])
    assert "overtook" not in first.message  # the first call starts cold
    assert "warm-started with find_copies=False" in later.message
