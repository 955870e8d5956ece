import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import DT, flat, mlp_loss, random_tree, scipy_iterative_cases, spectrum_operator

import hvpfunc as hf
from hvpfunc.testing import dense_hessian


def test_indefinite_system_where_cg_stops():
    matvec, like, H = spectrum_operator([-4.0, -1.0, 0.5, 2.0, 3.0, 8.0])
    b = random_tree(like, 0)
    with pytest.warns(hf.ConvergenceWarning, match="negative_curvature"):
        assert hf.cg(matvec, b).status == "negative_curvature"
    res = hf.minres(matvec, b, tol=1e-12)
    assert res.converged and res.status == "converged"
    assert torch.allclose(flat(res.x), torch.linalg.solve(H, flat(b)), rtol=1e-9)
    assert res.residual_norm == pytest.approx(float((flat(b) - H @ flat(res.x)).norm()), rel=1e-9, abs=1e-15)
    assert res.num_matvecs <= 6 + 2  # n steps at most in exact arithmetic, plus the check


@settings(max_examples=15)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 25), shift=st.floats(-1.0, 1.0))
def test_random_symmetric_systems_match_linalg_solve(seed, n, shift):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=gen, dtype=DT)
    H = (A + A.T) / 2
    M = H + shift * torch.eye(n, dtype=DT)
    if float(torch.linalg.eigvalsh(M).abs().min()) < 1e-2:  # keep the reference well-posed
        return
    b = torch.randn(n, generator=gen, dtype=DT)
    res = hf.minres(lambda v: H @ v, b, damping=shift, tol=1e-11, max_iters=20 * n + 50)
    assert res.converged
    want = torch.linalg.solve(M, b)
    assert float((res.x - want).norm()) <= 1e-7 * float(want.norm()) * max(1.0, float(torch.linalg.cond(M)))


def test_singular_consistent_and_inconsistent_systems():
    D = torch.tensor([2.0, -1.0, 0.0, 3.0], dtype=DT)
    consistent = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=DT)
    res = hf.minres(lambda v: D * v, consistent, tol=1e-12)
    assert res.converged and torch.allclose(res.x, torch.tensor([0.5, -1.0, 0.0, 1 / 3], dtype=DT))
    with pytest.warns(hf.ConvergenceWarning, match="inconsistent|max_iters"):
        res = hf.minres(lambda v: D * v, torch.ones(4, dtype=DT), tol=1e-12)
    assert not res.converged and torch.isfinite(res.x).all()
    # the least-squares part is still solved: residual only in the null space
    assert res.residual_norm == pytest.approx(1.0, rel=1e-8)


def test_preconditioner_and_zero_rhs():
    d = torch.logspace(-3, 3, 40, dtype=DT) * torch.where(torch.arange(40) % 3 == 0, -1.0, 1.0).to(DT)
    b = torch.randn(40, generator=torch.Generator().manual_seed(0), dtype=DT)
    plain = hf.minres(lambda v: d * v, b, tol=1e-10, max_iters=2000)
    pre = hf.minres(lambda v: d * v, b, tol=1e-10, preconditioner=lambda r: r / d.abs())
    assert plain.converged and pre.converged
    assert torch.allclose(pre.x, b / d, rtol=1e-8)
    assert pre.stats["iterations"] < plain.stats["iterations"]
    zero = hf.minres(lambda v: d * v, torch.zeros(40, dtype=DT))
    assert zero.converged and zero.num_matvecs == 0


def test_network_hessian_without_damping():
    f, params, (x, y) = mlp_loss([4, 6, 1])
    H = dense_hessian(f, params, x, y)
    assert float(torch.linalg.eigvalsh(H)[0]) < 0  # indefinite at initialization
    b = random_tree(params, 1)
    res = hf.minres(hf.hvp_fn(f, params, x, y), b, tol=1e-10, max_iters=2000)
    assert res.converged
    assert float((H @ flat(res.x) - flat(b)).norm()) <= 1e-9 * float(flat(b).norm())


def test_max_iters_and_bad_input():
    matvec, like, _ = spectrum_operator(torch.linspace(-1, 1, 30, dtype=DT).add(0.01).tolist())
    b = random_tree(like, 2)
    with pytest.warns(hf.ConvergenceWarning, match="max_iters"):
        res = hf.minres(matvec, b, max_iters=3)
    assert res.status == "max_iters" and res.stats["iterations"] == 3
    with pytest.raises(ValueError, match="b has non-finite"):
        hf.minres(matvec, {"a": b["a"] * float("inf"), "b": b["b"]})
    with pytest.raises(ValueError, match="tol must be positive"):
        hf.minres(matvec, b, tol=-1.0)


def test_singular_inconsistent_softmax_hessian_stops_at_a_least_squares_iterate():
    # Every softmax cross-entropy Hessian is singular; a random b has a null-space part.
    # Plain MINRES ran to max_iters here with ‖x‖ = 1e17 and ‖b − Hx‖ = 7e15 (‖b‖ = 5.6).
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X, Y = torch.randn(40, 4, dtype=DT), torch.randint(0, 3, (40,))
    mv, p = hf.model_hvp_fn(model, nn.functional.cross_entropy, (X, Y))
    b = hf.tree.random_like(p, generator=torch.Generator().manual_seed(2), kind="gaussian")
    H = dense_hessian(lambda q: nn.functional.cross_entropy(torch.func.functional_call(model, q, (X,)), Y), p)
    lam, Q = torch.linalg.eigh(H)
    null = Q[:, lam.abs() <= 1e-10 * lam.abs().max()]
    assert null.shape[1] >= 7  # (last hidden width + 1) zero eigenvalues
    ls_residual = float((null @ (null.T @ flat(b))).norm())  # min ‖b − Hx‖ over x
    with pytest.warns(hf.ConvergenceWarning, match="inconsistent"):
        res = hf.minres(mv, b)
    x = flat(res.x)
    r = flat(b) - H @ x
    assert res.status is hf.Status.INCONSISTENT and res.num_matvecs < 200
    assert torch.isfinite(x).all() and float(x.norm()) < 1e5
    assert float(r.norm()) == pytest.approx(ls_residual, rel=1e-6)
    assert float((H @ r).norm()) <= 1e-5 * float(lam.abs().max()) * float(r.norm())  # normal equations, to tol
    assert res.residual_norm == pytest.approx(float(r.norm()), rel=1e-8)


def test_non_finite_damping_is_refused():
    matvec, like, _ = spectrum_operator([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="damping must be finite"):
        hf.minres(matvec, random_tree(like, 0), damping=float("nan"))


def test_float32_at_kappa_1000_converges_or_says_it_stalls():
    from references import solve_ill_conditioned_float32

    res, true = solve_ill_conditioned_float32(hf.minres, 1e3, tol=1e-5)
    assert res.num_matvecs < 400  # a stall is reported, not run to max_iters
    assert true < 1e-4  # about ε·κ
    assert res.converged or "stalls" in res.message


def test_in_place_updates_leave_the_callers_tensors_alone():
    # MINRES updates its vectors in place and writes products into reused buffers: b,
    # the matvec's outputs and the preconditioner's must come through unchanged
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(12, 12, generator=gen, dtype=DT)
    H = (A + A.T) / 2
    b = {"a": torch.randn(5, generator=gen, dtype=DT), "b": torch.randn(7, generator=gen, dtype=DT)}
    before = {k: v.clone() for k, v in b.items()}
    outputs = []

    def matvec(v):
        y = H @ torch.cat([v["a"], v["b"]])
        out = {"a": y[:5].clone(), "b": y[5:].clone()}
        outputs.append((out, {k: t.clone() for k, t in out.items()}))
        return out

    # x0 too, and a single-leaf x0 (updated in place, it must be a copy)
    x0 = {"a": torch.ones(5, dtype=DT), "b": torch.ones(7, dtype=DT)}
    for options in ({"damping": 0.5}, {"preconditioner": lambda r: r}, {"x0": x0}):
        res = hf.minres(matvec, b, tol=1e-10, **options)
        assert res.converged
        want = torch.linalg.solve(H + options.get("damping", 0.0) * torch.eye(12, dtype=DT),
                                  torch.cat([b["a"], b["b"]]))
        torch.testing.assert_close(torch.cat([res.x["a"], res.x["b"]]), want, rtol=1e-8, atol=1e-10)
    assert all(torch.equal(b[k], before[k]) for k in b)
    assert all(torch.equal(leaf, torch.ones_like(leaf)) for leaf in x0.values())
    single = torch.ones(12, dtype=DT)
    assert hf.minres(lambda v: H @ v, torch.arange(12.0, dtype=DT), tol=1e-10, x0=single).converged
    assert torch.equal(single, torch.ones(12, dtype=DT))
    assert all(torch.equal(out[k], copy[k]) for out, copy in outputs for k in out)


# scipy's tolerances for its iterative tests: 1e-8 in float64, 1e-2 in float32
_SCIPY_TOL = {torch.float64: 1e-8, torch.float32: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(scipy_iterative_cases()))
def test_scipy_iterative_cases(name, dtype):
    # scipy skips MINRES in float32 ("minres fails for single precision"): at tol 1e-2
    # its least-squares test passes where κ > 100, and MINRES here called the Poisson
    # systems (κ = 660) inconsistent after two products
    A, b, _ = scipy_iterative_cases()[name]
    A, b, tol = A.to(dtype), b.to(dtype), _SCIPY_TOL[dtype]
    res = hf.minres(lambda v: A @ v, b, tol=tol)
    assert res.status is hf.Status.CONVERGED, res.message
    assert float((A.double() @ res.x.double() - b.double()).norm()) <= 1.01 * tol * float(b.double().norm())


def test_x0_is_used_and_an_exact_one_costs_one_product():
    # scipy's test_x0_is_used_by, test_minres_non_default_x0 and test_minres_precond_exact_x0
    import numpy as np

    rng = np.random.RandomState(1234)
    a = torch.as_tensor(rng.randn(5, 5))
    A, b, c = a @ a.T, torch.as_tensor(rng.randn(5)), torch.as_tensor(rng.randn(5))
    seen = []

    def matvec(v):
        seen.append(v.clone())
        return A @ v

    res = hf.minres(matvec, b, tol=1e-6, x0=c)
    assert res.converged and float((A @ res.x - b).norm()) <= 1e-6 * float(b.norm())
    assert torch.equal(seen[0], c)  # the first product forms b − A x0
    exact = torch.linalg.solve(A, b)
    again = hf.minres(lambda v: A @ v, b, tol=1e-6, x0=exact)
    assert again.converged and again.num_matvecs == 1 and torch.equal(again.x, exact)
    M = torch.as_tensor(rng.randn(5, 5))
    M = M @ M.T
    pre = hf.minres(lambda v: A @ v, b, tol=1e-6, x0=c, preconditioner=lambda r: torch.linalg.solve(M, r))
    assert pre.converged and float((A @ pre.x - b).norm()) <= 1e-6 * float(b.norm())
    with pytest.raises(ValueError, match="x0 has non-finite"):
        hf.minres(lambda v: A @ v, b, x0=torch.full((5,), float("nan"), dtype=DT))


def test_shift_is_negative_damping():
    # scipy's test_shift: minres(A, b, shift=s) solves (A − sI)x = b
    import numpy as np

    rng = np.random.RandomState(1234)
    A = torch.as_tensor(rng.rand(10, 10))
    A, b = A + A.T, torch.as_tensor(rng.rand(10))
    res = hf.minres(lambda v: A @ v, b, damping=-0.5, tol=1e-10)
    torch.testing.assert_close(res.x, torch.linalg.solve(A - 0.5 * torch.eye(10, dtype=DT), b), rtol=1e-7, atol=1e-9)
