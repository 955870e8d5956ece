"""The contract every solver and estimator keeps, checked over one table of them all:
a non-finite product is reported (status, warning, finite iterate), never raised or
returned as converged; a matvec whose output does not match names the leaf;
half-precision vectors are computed in float32; the same generator gives the same
result; every status is a ``hf.Status``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from references import DT, flat
from torch import nn

import hvpfunc as hf

LAM = [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]


def _operator(dtype=DT):
    """diag(LAM) on the tree {"a": (3,), "b": [(5, 1)]}, products computed in float64 and
    returned in ``dtype`` (so a bfloat16 operator rounds its products as bfloat16 would)."""
    lam = torch.tensor(LAM, dtype=DT)

    def matvec(v):
        x = torch.cat([v["a"].to(DT), v["b"][0].reshape(-1).to(DT)])
        y = (lam * x).to(dtype)
        return {"a": y[:3], "b": [y[3:].reshape(5, 1)]}

    like = {"a": torch.zeros(3, dtype=dtype), "b": [torch.zeros(5, 1, dtype=dtype)]}
    return matvec, like


def _ones(like):
    return hf.tree.random_like(like, generator=torch.Generator().manual_seed(1), kind="rademacher")


def _stack2(tree):
    return torch.utils._pytree.tree_map(lambda t: torch.stack([t, 2 * t]), tree)


# name -> (run(matvec, like, generator, tol), value(result), reference value)
_B = torch.ones(8, dtype=DT)
_SOLUTION = _B / torch.tensor(LAM, dtype=DT)
SOLVERS = {
    "power_iteration": (
        lambda mv, like, g, tol: hf.power_iteration(mv, _ones(like), tol=tol),
        lambda r: r.eigenvalues, torch.tensor([6.0])),
    "lanczos": (
        lambda mv, like, g, tol: hf.lanczos(mv, _ones(like), k=2, tol=tol, generator=g),
        lambda r: r.eigenvalues, torch.tensor([6.0, 5.0])),
    "trace/hutchinson": (
        lambda mv, like, g, tol: hf.trace(mv, like, num_probes=10, method="hutchinson", generator=g, chunk_size=1),
        lambda r: r.estimate, torch.tensor(sum(LAM))),
    "trace/hutch++": (
        lambda mv, like, g, tol: hf.trace(mv, like, num_probes=30, generator=g, chunk_size=1),
        lambda r: r.estimate, torch.tensor(sum(LAM))),
    "trace/xtrace": (
        lambda mv, like, g, tol: hf.trace(mv, like, num_probes=30, method="xtrace", generator=g, chunk_size=1),
        lambda r: r.estimate, torch.tensor(sum(LAM))),
    "diagonal": (
        lambda mv, like, g, tol: hf.diagonal(mv, like, num_probes=6, generator=g, chunk_size=1),
        lambda r: flat(r.estimate), torch.tensor(LAM)),
    "diagonal/xdiag": (
        lambda mv, like, g, tol: hf.diagonal(mv, like, num_probes=16, method="xdiag", generator=g, chunk_size=1),
        lambda r: flat(r.estimate), torch.tensor(LAM)),
    "squared_frobenius_norm": (
        lambda mv, like, g, tol: hf.squared_frobenius_norm(mv, like, num_probes=6, generator=g, chunk_size=1),
        lambda r: r.estimate, torch.tensor(sum(x * x for x in LAM))),
    "block_spectra": (
        lambda mv, like, g, tol: hf.block_spectra(mv, like, num_probes=6, k=1, tol=1e-8, generator=g, chunk_size=1),
        lambda r: r.traces.sum(), torch.tensor(sum(LAM))),
    "spectral_density": (
        lambda mv, like, g, tol: hf.spectral_density(mv, like, num_probes=3, num_iters=4, generator=g, chunk_size=1),
        lambda r: (r.nodes * r.weights).sum(dim=1).mean(), torch.tensor(sum(LAM) / 8)),
    "cg": (
        lambda mv, like, g, tol: hf.cg(mv, _ones(like), tol=tol),
        lambda r: flat(r.x).abs(), _SOLUTION),
    "cg_batched": (
        lambda mv, like, g, tol: hf.cg_batched(mv, _stack2(_ones(like)), tol=tol, chunk_size=1),
        lambda r: flat(r[0].x).abs(), _SOLUTION),
    "minres": (
        lambda mv, like, g, tol: hf.minres(mv, _ones(like), tol=tol),
        lambda r: flat(r.x).abs(), _SOLUTION),
    "neumann": (
        lambda mv, like, g, tol: hf.neumann(mv, _ones(like), tol=tol, num_terms=1000),
        lambda r: flat(r.x).abs(), _SOLUTION),
    "lissa": (
        lambda mv, like, g, tol: hf.lissa(mv, _ones(like), scale=6.0, tol=tol),
        lambda r: flat(r.x).abs(), _SOLUTION),
}


def _results(result):
    return result if isinstance(result, list) else [result]


def _nan_from_call(matvec, first_bad: int):
    calls = {"n": 0}

    def flaky(v):
        calls["n"] += 1
        out = matvec(v)
        if calls["n"] >= first_bad:
            out = {"a": out["a"] * math.nan, "b": out["b"]}
        return out

    return flaky


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("first_bad", [1, 3])
def test_a_non_finite_product_is_a_status_and_a_warning(name, first_bad):
    run, _, _ = SOLVERS[name]
    matvec, like = _operator()
    with pytest.warns(hf.ConvergenceWarning, match="non_finite") as caught:
        result = run(_nan_from_call(matvec, first_bad), like, torch.Generator().manual_seed(0), 1e-8)
    assert [w.filename for w in caught] == [__file__]  # one warning, at the caller's line
    for res in _results(result):
        assert res.status is hf.Status.NON_FINITE
        assert res.status == "non_finite" and "not finite" in res.message
        if isinstance(res, hf.SolveResult):
            assert torch.isfinite(flat(res.x)).all() and not res.converged
        if isinstance(res, hf.EigResult):
            assert not bool(res.converged.all())
            if first_bad > 1:  # a finite basis came before the bad product: its pairs are returned
                assert torch.isfinite(res.eigenvalues).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_a_matvec_output_that_does_not_match_names_the_leaf(name):
    run, _, _ = SOLVERS[name]
    matvec, like = _operator()

    def wrong(v):
        return {"a": torch.zeros(2, dtype=DT), "b": matvec(v)["b"]}

    with pytest.raises(ValueError, match=r"matvec\(v\)\['a'\] has shape \(2,\)"):
        run(wrong, like, torch.Generator().manual_seed(0), 1e-8)


@pytest.mark.parametrize("name", SOLVERS)
def test_half_precision_vectors_are_computed_in_float32(name):
    run, value, reference = SOLVERS[name]
    matvec, like = _operator(torch.bfloat16)
    seen = []

    def spy(v):
        seen.append({leaf.dtype for leaf in torch.utils._pytree.tree_leaves(v)})
        return matvec(v)

    result = run(spy, like, torch.Generator().manual_seed(0), 3e-2)
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)  # the matvec sees its own dtype
    for res in _results(result):
        assert res.status is hf.Status.CONVERGED, res.message
    got = value(result)
    if isinstance(result, (hf.EigResult, hf.TraceResult)):
        assert got.dtype == torch.float32  # computed in float32, not bfloat16
    torch.testing.assert_close(got.double(), reference.double(), rtol=4e-2, atol=4e-2)


@pytest.mark.parametrize("name", SOLVERS)
def test_same_generator_same_result_and_status_is_a_status(name):
    run, value, reference = SOLVERS[name]
    matvec, like = _operator()
    first = run(matvec, like, torch.Generator().manual_seed(5), 1e-10)
    second = run(matvec, like, torch.Generator().manual_seed(5), 1e-10)
    torch.testing.assert_close(value(first), value(second), rtol=1e-12, atol=0)
    for res in _results(first):
        assert isinstance(res.status, hf.Status) and res.status is hf.Status.CONVERGED
        assert str(res.status) == "converged" and f"{res.status}" == "converged"
    torch.testing.assert_close(value(first).double(), reference.double(), rtol=1e-6, atol=1e-6)


def test_a_failed_solve_inside_hypergradient_warns_at_the_callers_line_with_its_status():
    X = torch.eye(3, dtype=DT)
    inner = lambda w, lam: 0.5 * ((X @ w) ** 2).sum() + 0.5 * lam * (w**2).sum()  # noqa: E731
    outer = lambda w, lam: w.sum()  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, res = hf.hypergradient(inner, outer, torch.zeros(3, dtype=DT), torch.tensor(-2.0, dtype=DT))  # stationary
    assert res.status is hf.Status.NEGATIVE_CURVATURE  # H = I − 2I
    assert [w.filename for w in caught if w.category is hf.ConvergenceWarning] == [__file__]


def test_every_status_carries_a_remedy():
    for status in hf.Status:
        assert isinstance(status, str) and hf.Status(status.value) is status
        assert (status.remedy == "") == (status is hf.Status.CONVERGED)


@pytest.mark.parametrize("name", ["cg", "cg_batched", "minres", "neumann"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-12), (torch.bfloat16, 1e-6), (torch.float16, 1e-6)])
def test_a_tolerance_below_the_precision_is_raised_with_a_warning_and_then_met(name, dtype, tol):
    # Asked for more than the dtype holds, the solvers used to iterate to their budget or
    # return a far-off x; now tol becomes 10 ε, said at the caller's line, and is met.
    run, _, _ = SOLVERS[name]
    matvec, like = _operator(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(matvec, like, torch.Generator().manual_seed(0), tol)
    raised = [w for w in caught if "below what products" in str(w.message)]
    assert len(raised) == 1 and raised[0].filename == __file__
    assert not [w for w in caught if w.category is hf.ConvergenceWarning]
    eps = torch.finfo(dtype).eps
    for res in _results(result):
        assert res.status is hf.Status.CONVERGED, res.message
    res = _results(result)[0]
    b = flat(_ones(like)).double()
    residual = b - torch.tensor(LAM, dtype=DT) * flat(res.x).double()
    assert float(residual.norm() / b.norm()) <= 12 * eps


def test_hypergradient_raises_a_tolerance_below_the_precision_at_the_callers_line():
    X = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([1.0, 2.0, 3.0])
    inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w**2).sum()  # noqa: E731
    outer = lambda w, lam: w.sum()  # noqa: E731
    lam = torch.tensor(0.5)
    A = X.T @ X + lam * torch.eye(2)
    w_star = torch.linalg.solve(A, X.T @ y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        grad, res = hf.hypergradient(inner, outer, w_star, lam, tol=1e-12)
    raised = [w for w in caught if "below what products" in str(w.message)]
    assert len(raised) == 1 and raised[0].filename == __file__
    assert res.status is hf.Status.CONVERGED
    # d/dλ Σ w*(λ) = −1ᵀ A⁻¹ w*, in float64
    A64, w64 = A.double(), torch.linalg.solve(A.double(), (X.T @ y).double())
    exact = -torch.linalg.solve(A64, w64).sum()
    assert float(grad) == pytest.approx(float(exact), rel=1e-5)


@pytest.mark.parametrize("call, name", [
    (lambda mv, v: hf.power_iteration(mv, v, max_iters=1.5), "max_iters"),
    (lambda mv, v: hf.lanczos(mv, v, max_iters=30.5), "max_iters"),
    (lambda mv, v: hf.lanczos(mv, v, max_basis=4.5), "max_basis"),
    (lambda mv, v: hf.cg(mv, v, max_iters=2.5), "max_iters"),
    (lambda mv, v: hf.minres(mv, v, max_iters=2.5), "max_iters"),
    (lambda mv, v: hf.neumann(mv, v, num_terms=2.5), "num_terms"),
    (lambda mv, v: hf.lissa(mv, v, scale=10.0, num_terms=2.5), "num_terms"),
    (lambda mv, v: hf.trace(mv, v, num_probes=10.5), "num_probes"),
    (lambda mv, v: hf.trace(mv, v, num_probes=True), "num_probes"),
    (lambda mv, v: hf.diagonal(mv, v, num_probes=10.5), "num_probes"),
    (lambda mv, v: hf.squared_frobenius_norm(mv, v, num_probes=10.5), "num_probes"),
    (lambda mv, v: hf.spectral_density(mv, v, num_iters=5.5), "num_iters"),
    (lambda mv, v: hf.block_spectra(mv, v, num_probes=10.5), "num_probes"),
])
def test_a_count_that_is_not_an_integer_is_a_clear_error(call, name):
    # floats reached torch as "empty() takes 1 positional argument but 2 were given", or
    # ran with their fractional part dropped
    matvec, like = _operator()
    with pytest.raises(ValueError, match=f"{name} must be an integer"):
        call(matvec, _ones(like))
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        res = hf.power_iteration(matvec, _ones(like), max_iters=np.int64(3))  # numpy's integers are integers
    assert res.num_matvecs <= 6


def test_under_autocast_products_and_solvers_keep_the_parameters_precision():
    # In a mixed-precision training loop: under CPU bfloat16 autocast the stored graph
    # and every product were bfloat16 (Lanczos at tol 1e-6: eigenvalues 7e-4 off), and
    # with the products fixed the solver's own orthogonalization was (1e-4 off), both
    # marked converged.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.Tanh(), nn.Linear(30, 5))
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    want = hf.lanczos(matvec, v, k=3, tol=1e-6)
    want_x = hf.cg(matvec, v, damping=1.0, tol=1e-6).x
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
        product = inside(v)
        got = hf.lanczos(inside, v, k=3, tol=1e-6)
        got_x = hf.cg(inside, v, damping=1.0, tol=1e-6).x
    assert all(t.dtype == torch.float32 for t in product.values())
    # (the basis grows by measured step costs, so the counts may differ by a product or two; bfloat16 took 199-364)
    assert got.status == "converged" and got.num_matvecs <= want.num_matvecs + 10
    torch.testing.assert_close(got.eigenvalues, want.eigenvalues, rtol=1e-6, atol=0)
    for name in want_x:
        torch.testing.assert_close(got_x[name], want_x[name], rtol=1e-5, atol=1e-6)


def test_a_solver_called_by_another_warns_at_the_users_line():
    # EigenTracker.update calls lanczos: with a fixed stacklevel the warning pointed into
    # hvpfunc's tracking.py; it now points at the first frame outside hvpfunc
    lam = torch.linspace(0.0, 1.0, 50, dtype=DT)
    tracker = hf.EigenTracker(k=2, tol=1e-12, max_iters=3)
    with pytest.warns(hf.ConvergenceWarning) as caught:
        tracker.update(lambda v: lam * v, torch.zeros(50, dtype=DT))
    assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("name", ["lanczos", "power_iteration", "block_spectra"])
def test_eigensolvers_raise_a_tolerance_below_half_precision_products_with_a_warning(name):
    # Their residuals come from a recurrence that assumes exact products: with bfloat16
    # products Lanczos at tol 1e-6 reported residuals of 3e-6·|θ| for eigenvalues 2e-4
    # off, marked converged. In float32 the residual test's rounding floor covers it.
    lam = torch.linspace(0.1, 1.0, 40)
    lam[-1] = 2.0
    for dtype, warned in ((torch.bfloat16, True), (torch.float32, False)):
        d = lam.to(dtype)
        like = {"a": torch.zeros(20, dtype=dtype), "b": torch.zeros(20, dtype=dtype)}
        v0 = {"a": torch.ones(20, dtype=dtype), "b": torch.ones(20, dtype=dtype)}

        def matvec(v, d=d):
            return {"a": d[:20] * v["a"], "b": d[20:] * v["b"]}

        run = {"lanczos": lambda: hf.lanczos(matvec, v0, k=1, tol=1e-6),
               "power_iteration": lambda: hf.power_iteration(matvec, v0, which="LA", tol=1e-6),
               "block_spectra": lambda: hf.block_spectra(matvec, like, {"all": "*"}, num_probes=2, k=1, tol=1e-6)}[name]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = run()
        raised = [w for w in caught if "below what products" in str(w.message)]
        assert len(raised) == int(warned) and all(w.filename == __file__ for w in raised), dtype
        top = float(res.top[0, 0]) if name == "block_spectra" else float(res.eigenvalues[0])
        eps = torch.finfo(dtype).eps
        assert abs(top - 2.0) <= 2 * eps * 2.0 * (10 if warned else 100), (dtype, top)


@pytest.mark.parametrize("solve", [
    lambda mv, like: hf.trace(mv, like, num_probes=6, method="hutchinson", chunk_size=1,
                              generator=torch.Generator().manual_seed(0)),
    lambda mv, like: hf.lanczos(mv, _ones(like), k=1, tol=1e-8),
])
def test_on_a_cpu_the_last_product_is_held_until_the_next_returns_and_released_after(solve):
    # Freed at once, a product's leaves let glibc give the memory of the product's
    # temporaries back to the system, and the next product faulted it all in again: on a
    # small CNN's Hessian trace, 40k-57k page faults and 12% more time per product
    # (hvpfunc._operator, Operator._held). Only a reference: the values are not read.
    import gc
    import weakref

    inner, like = _operator()
    produced = []
    alive_during = []

    def matvec(v):
        alive_during.append(produced[-1]() is not None if produced else True)
        out = inner(v)
        produced.append(weakref.ref(out["a"]))
        return out

    solve(matvec, like)
    assert len(produced) >= 3 and all(alive_during)
    gc.collect()
    assert all(ref() is None for ref in produced)  # nothing outlives the solver
