"""mode="gradient-difference": products from two gradients, against exact products and the
dense Hessian, and the module put back bit for bit."""

import pytest
import torch
from references import DT, flat, mlp
from torch import nn

import hvpfunc as hf
from hvpfunc._products import difference
from hvpfunc.testing import dense_hessian

# Stated accuracy of the central difference (relative, on products and eigenvalues)
ACCURACY = {torch.float64: 1e-7, torch.float32: 1e-4}


def _classifier(dtype, *, norm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(5, 12)] + ([nn.BatchNorm1d(12)] if norm else []) + [nn.Tanh(), nn.Linear(12, 3)]
    model = nn.Sequential(*layers).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (48,), generator=gen)
    return model, x, y


def _rel(a, b):
    return float((flat(a) - flat(b)).norm() / flat(b).norm())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_function_products_match_the_dense_hessian(dtype):
    model, x, y = _classifier(dtype)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    H = dense_hessian(lambda p: f({k: t.to(dtype) for k, t in p.items()}), {k: t.double() for k, t in params.items()})
    matvec = hf.hvp_fn(f, params, mode="gradient-difference")
    assert matvec.mode == "gradient-difference"
    for seed in range(3):
        v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(seed))
        want = H @ flat(v).double()
        got = flat(matvec(v)).double()
        assert float((got - want).norm() / want.norm()) < ACCURACY[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_module_eigenvalues_within_the_stated_accuracy(dtype):
    model, x, y = _classifier(dtype, norm=True)
    exact, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode="reverse-over-reverse")
    approx, _ = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode="gradient-difference")
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(2))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    want = hf.lanczos(exact, v0, k=3, tol=tol).eigenvalues.double()
    got = hf.lanczos(approx, v0, k=3, tol=tol).eigenvalues.double()
    assert float(((got - want).abs() / want.abs()).max()) < ACCURACY[dtype]
    assert _rel(approx(v0), exact(v0)) < ACCURACY[dtype]


def test_richardson_step_is_more_accurate_in_float32():
    model, x, y = _classifier(torch.float32)
    params = {k: p.detach() for k, p in model.named_parameters()}

    def f(p):
        return nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y)

    exact = hf.hvp_fn(f, params, mode="reverse-over-reverse")
    errors = {}
    for richardson in (False, True):
        product = difference.functional(f, params, (), {}, richardson=richardson)
        errors[richardson] = max(
            _rel(product(v), exact(v))
            for v in (hf.tree.random_like(params, generator=torch.Generator().manual_seed(s)) for s in range(3))
        )
    assert errors[True] < errors[False] / 2
    assert errors[True] < 1e-5


def test_several_batches_weighted_as_the_other_modes():
    model = mlp([3, 6, 2]).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 3, generator=gen, dtype=DT), torch.randn(30, 2, generator=gen, dtype=DT)
    batches = [(x[:7], y[:7]), (x[7:], y[7:])]
    exact, params = hf.model_hvp_fn(model, nn.MSELoss(), (x, y), mode="reverse-over-reverse")
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(3))
    for data in (batches, iter_again(batches)):
        approx, _ = hf.model_hvp_fn(model, nn.MSELoss(), data, mode="gradient-difference")
        assert _rel(approx(v), exact(v)) < 1e-8


class iter_again:
    """A re-iterable stream (a DataLoader stand-in): streamed through, not held."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_module_restored_bit_for_bit_also_when_the_loss_raises():
    model, x, y = _classifier(DT, norm=True)  # train mode: BatchNorm's running statistics move
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    calls = {"n": 0}

    def loss(out, target):
        calls["n"] += 1
        if calls["n"] == 4:  # the second gradient of the second product
            raise RuntimeError("loss failed")
        return nn.functional.cross_entropy(out, target)

    matvec, params = hf.model_hvp_fn(model, loss, (x, y), mode="gradient-difference")
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    matvec(v)
    with pytest.raises(RuntimeError, match="loss failed"):
        matvec(v)
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k  # bit for bit, buffers included
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0))
    assert model[-1].weight.grad is None


def test_at_a_given_point_and_selected_parameters():
    model, x, y = _classifier(DT)
    at = {k: p.detach() + 0.1 for k, p in model.named_parameters()}
    select = lambda name: name.startswith("2.")  # noqa: E731
    exact, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), at=at, select=select,
                                    mode="reverse-over-reverse")
    approx, _ = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), at=at, select=select,
                                mode="gradient-difference")
    assert sorted(params) == ["2.bias", "2.weight"]
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(5))
    assert _rel(approx(v), exact(v)) < 1e-8
    assert all(not torch.equal(p, at[k]) for k, p in model.named_parameters())  # the module kept its own


def test_solvers_loop_where_vmap_cannot_run_and_vmap_says_why():
    model, x, y = _classifier(DT)
    exact, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode="reverse-over-reverse")
    approx, _ = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y), mode="gradient-difference")
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    want = hf.trace(exact, params, num_probes=8, method="hutchinson", generator=gen())
    got = hf.trace(approx, params, num_probes=8, method="hutchinson", generator=gen())
    assert abs(float(got.estimate) - float(want.estimate)) < 1e-7 * abs(float(want.estimate))
    batch = hf.tree.stack([params, params])
    with pytest.raises(RuntimeError, match="chunk_size=1"):
        torch.func.vmap(approx)(batch)


def test_function_products_under_vmap_equal_the_loop():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=DT)
    params = {"w": torch.randn(6, generator=gen, dtype=DT)}
    matvec = hf.hvp_fn(lambda p: (torch.tanh(A @ p["w"]) ** 2).sum(), params, mode="gradient-difference")
    V = {"w": torch.randn(4, 6, generator=gen, dtype=DT)}
    batched = torch.func.vmap(matvec)(V)["w"]
    looped = torch.stack([matvec({"w": V["w"][i]})["w"] for i in range(4)])
    # the same step per vector; batched kernels round differently, well below the difference error
    assert torch.allclose(batched, looped, rtol=1e-9, atol=1e-12)
