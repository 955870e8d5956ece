import pytest
import torch
from references import DT, flat

import hvpfunc as hf
from hvpfunc.testing import dense_hessian


def _ridge(seed=0):
    gen = torch.Generator().manual_seed(seed)
    X, y = torch.randn(30, 4, generator=gen, dtype=DT), torch.randn(30, generator=gen, dtype=DT)
    Xv, yv = torch.randn(15, 4, generator=gen, dtype=DT), torch.randn(15, generator=gen, dtype=DT)

    def inner(w, lam):
        return 0.5 * ((X @ w["w"] - y) ** 2).sum() + 0.5 * torch.exp(lam["log_l2"]) * (w["w"] ** 2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w["w"] - yv) ** 2).sum()

    def solution(log_l2):
        return torch.linalg.solve(X.T @ X + torch.exp(log_l2) * torch.eye(4, dtype=DT), X.T @ y)

    return inner, outer, solution


@pytest.mark.parametrize(
    "solver,options",
    [("cg", {"tol": 1e-12}), ("minres", {"tol": 1e-12}), ("neumann", {"tol": 1e-12, "num_terms": 5000})],
)
def test_ridge_hypergradient_matches_autograd_through_the_closed_form(solver, options):
    inner, outer, solution = _ridge()
    log_l2 = torch.tensor(0.3, dtype=DT)
    w = {"w": solution(log_l2)}
    g, res = hf.hypergradient(inner, outer, w, {"log_l2": log_l2}, solver=solver, **options)
    assert res.converged
    lam = log_l2.clone().requires_grad_()
    (want,) = torch.autograd.grad(outer({"w": solution(lam)}, None), lam)
    assert float(g["log_l2"]) == pytest.approx(float(want), rel=1e-6)


def test_direct_dependence_of_outer_on_hparams_is_added():
    inner, outer, solution = _ridge(1)
    log_l2 = torch.tensor(-0.5, dtype=DT)
    w = {"w": solution(log_l2)}

    def outer_direct(w_, lam):
        return outer(w_, lam) + 3.0 * lam["log_l2"] ** 2

    g, _ = hf.hypergradient(inner, outer_direct, w, {"log_l2": log_l2}, tol=1e-12)
    lam = log_l2.clone().requires_grad_()
    (want,) = torch.autograd.grad(outer_direct({"w": solution(lam)}, {"log_l2": lam}), lam)
    assert float(g["log_l2"]) == pytest.approx(float(want), rel=1e-6)


def _mlp_problem():
    gen = torch.Generator().manual_seed(0)
    X, Xv = torch.randn(40, 2, generator=gen, dtype=DT), torch.randn(20, 2, generator=gen, dtype=DT)

    def teacher(x):
        return torch.sin(2 * x[:, 0]) + x[:, 1] ** 2

    y = teacher(X) + 0.1 * torch.randn(40, generator=gen, dtype=DT)
    yv = teacher(Xv) + 0.1 * torch.randn(20, generator=gen, dtype=DT)

    def net(w, x):
        return torch.tanh(x @ w["W1"] + w["b1"]) @ w["w2"] + w["b2"]

    def inner(w, hp):  # training loss with per-layer weight decay
        decay = hp["wd"][0] * (w["W1"] ** 2).sum() + hp["wd"][1] * (w["w2"] ** 2).sum()
        return ((net(w, X) - y) ** 2).mean() + 0.5 * decay

    def outer(w, hp):
        return ((net(w, Xv) - yv) ** 2).mean()

    w0 = {
        "W1": 0.5 * torch.randn(2, 4, generator=gen, dtype=DT),
        "b1": torch.zeros(4, dtype=DT),
        "w2": 0.5 * torch.randn(4, generator=gen, dtype=DT),
        "b2": torch.zeros((), dtype=DT),
    }
    return inner, outer, w0


def _train(inner, w, hp):
    """Train to a local minimum: Levenberg–Marquardt on the dense Hessian (17 params),
    which ends in plain Newton steps, so the minimum is found to rounding level."""
    sizes = [t.numel() for t in w.values()]

    def unflat(x):
        return {k: part.reshape(w[k].shape) for k, part in zip(w, torch.split(x, sizes))}

    x, mu = flat(w), 1.0
    loss = float(inner(unflat(x), hp))
    for _ in range(200):
        g = flat(torch.func.grad(inner)(unflat(x), hp))
        if float(g.norm()) < 1e-13:
            break
        H = dense_hessian(inner, unflat(x), hp)
        trial = x - torch.linalg.solve(H + mu * torch.eye(len(x), dtype=DT), g)
        trial_loss = float(inner(unflat(trial), hp))
        if trial_loss <= loss:
            x, loss, mu = trial, trial_loss, mu / 4
        else:
            mu *= 4
    w = unflat(x)
    assert float(flat(torch.func.grad(inner)(w, hp)).norm()) < 1e-11
    return w


def test_weight_decay_hypergradient_of_a_small_mlp_matches_finite_differences():
    inner, outer, w0 = _mlp_problem()
    hp = {"wd": torch.tensor([0.01, 0.005], dtype=DT)}
    w = _train(inner, w0, hp)
    assert float(torch.linalg.eigvalsh(dense_hessian(inner, w, hp))[0]) > 0  # a minimum
    g, res = hf.hypergradient(inner, outer, w, hp, tol=1e-12)
    assert res.converged
    eps = 1e-5
    for i in range(2):
        bump = torch.zeros(2, dtype=DT)
        bump[i] = eps
        up = outer(_train(inner, w, {"wd": hp["wd"] + bump}), hp)
        down = outer(_train(inner, w, {"wd": hp["wd"] - bump}), hp)
        fd = float(up - down) / (2 * eps)
        assert float(g["wd"][i]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_an_unconverged_solve_is_reported_and_the_hypergradient_stays_finite():
    inner, outer, w0 = _mlp_problem()
    hp = {"wd": torch.tensor([0.01, 0.005], dtype=DT)}
    w = _train(inner, w0, hp)
    with pytest.warns(hf.ConvergenceWarning):
        g, res = hf.hypergradient(inner, outer, w, hp, solver="neumann", alpha=10.0)
    assert res.status == "diverged" and not res.converged
    assert torch.isfinite(g["wd"]).all()


def test_non_finite_outer_gradient_is_an_error_naming_the_leaf():
    inner, outer, solution = _ridge()
    w = {"w": solution(torch.tensor(0.0, dtype=DT))}

    def bad_outer(w_, lam):
        return torch.sqrt(w_["w"] - 100.0).sum()  # nan at w

    with pytest.raises(ValueError, match=r"d outer_loss / d params is not finite at \['w'\]"):
        hf.hypergradient(inner, bad_outer, w, {"log_l2": torch.tensor(0.0, dtype=DT)})
    with pytest.raises(ValueError, match="solver must be one of"):
        hf.hypergradient(inner, outer, w, {"log_l2": torch.tensor(0.0, dtype=DT)}, solver="lu")


def test_parameters_the_inner_loss_ignores_are_held_fixed_and_the_hypergradient_is_exact():
    # the outer loss has an offset c the inner (ridge) loss never sees; the solve used to
    # meet its zero Hessian block and return 5e154 marked "non_finite"
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(20, 3, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    Xv, yv = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, generator=g, dtype=DT)
    c = torch.tensor(0.3, dtype=DT)

    def inner(w, lam):
        return 0.5 * ((X @ w["w"] - y) ** 2).sum() + 0.5 * lam * (w["w"] ** 2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w["w"] + w["c"] - yv) ** 2).sum()

    def w_star(lam):
        return torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=DT), X.T @ y)

    lam = torch.tensor(1.0, dtype=DT)
    want = torch.func.grad(lambda lam: outer({"w": w_star(lam), "c": c}, lam))(lam)
    got, res = hf.hypergradient(inner, outer, {"w": w_star(lam), "c": c}, lam, tol=1e-12)
    assert res.converged and res.stats["held_fixed"] == ["['c']"]
    assert torch.allclose(got, want, rtol=1e-9)


def test_a_singular_inner_hessian_is_flagged_with_advice():
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(20, 2, generator=g, dtype=DT), torch.randn(20, generator=g, dtype=DT)
    X = torch.cat([X, X[:, :1]], dim=1)  # collinear: the unregularized optimum is not unique
    Xv, yv = torch.randn(10, 3, generator=g, dtype=DT), torch.randn(10, generator=g, dtype=DT)

    def inner(w, lam):
        return 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()

    def outer(w, lam):
        return 0.5 * ((Xv @ w - yv) ** 2).sum()

    # gelsd (SVD): the CPU default, gelsy, returns a non-stationary w about one call in
    # 200 on this rank-deficient X (pytorch/pytorch#71222), which failed CI once
    w = torch.linalg.lstsq(X, y, driver="gelsd").solution
    with pytest.warns(hf.ConvergenceWarning, match="inconsistent.*not unique"):
        got, res = hf.hypergradient(inner, outer, w, torch.tensor(0.0, dtype=DT))
    assert res.status is hf.Status.INCONSISTENT and "damping" in res.message
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("inside", [False, True])
def test_inner_optimum_from_inference_mode_gives_the_same_hypergradient(inside):
    # a hypergradient at an optimum computed under torch.inference_mode() came out -0.571
    # against -0.422, marked converged (inference tensors were treated as constants)
    inner, outer, solution = _ridge(0)
    log_l2 = torch.tensor(0.5, dtype=DT)
    exact = torch.func.grad(lambda h: outer({"w": solution(h)}, {"log_l2": h}))(log_l2)
    with torch.inference_mode():
        wi, lami = {"w": solution(log_l2)}, {"log_l2": log_l2.clone()}
    context = torch.inference_mode() if inside else torch.no_grad()
    with context:
        got, res = hf.hypergradient(inner, outer, wi, lami, tol=1e-12)
    assert res.converged and torch.allclose(got["log_l2"], exact, rtol=1e-8)


def test_a_point_that_is_not_an_inner_optimum_is_flagged():
    # at w = 0 and at w*/2 the hypergradient came out 0.0 and -0.0041 against -0.0216,
    # converged, without a word (‖∇_w inner‖ = 0.41 there)
    inner, outer, solution = _ridge(1)
    lam = {"log_l2": torch.tensor(0.0, dtype=DT)}
    w_star = {"w": solution(lam["log_l2"])}
    _, res = hf.hypergradient(inner, outer, w_star, lam, tol=1e-12)
    assert res.stats["distance_to_stationary"] < 1e-10
    for w in ({"w": torch.zeros(4, dtype=DT)}, {"w": w_star["w"] / 2}):
        with pytest.warns(hf.ConvergenceWarning, match="not a stationary point") as caught:
            _, res = hf.hypergradient(inner, outer, w, lam, tol=1e-12)
        assert caught[0].filename == __file__
        assert res.stats["inner_gradient_norm"] > 0.01
        assert res.message.startswith("params is not a stationary point")  # the result says it too
