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
    (1, {}, 1e-5, 0.7),  # the defaults (measured: 53 products against 93, errors 2e-6)
    (2, {"tol": 1e-6}, 1e-8, 0.9),  # with the copy check (199 against 233)
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
