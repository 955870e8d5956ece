import warnings

import pytest
import torch
from references import DT, flat, random_tree, spectrum_operator

import hvpfunc as hf


def _spd():
    return spectrum_operator([0.5, 1.0, 2.0, 3.0, 4.0, 5.0])


def test_the_user_story_unscaled_series_diverges_and_says_why():
    # Lorraine et al.'s loop v <- v - H v is alpha = 1: with eigenvalues above 2 it explodes.
    matvec, like, H = _spd()
    b = random_tree(like, 0)
    with pytest.warns(hf.ConvergenceWarning, match="diverged"):
        res = hf.neumann(matvec, b, alpha=1.0)
    assert res.status == "diverged" and not res.converged
    assert res.num_matvecs < 10  # stopped at once, not after 100 terms
    assert torch.isfinite(flat(res.x)).all() and float(flat(res.x).abs().max()) < 10 * float(flat(b).norm())
    for hint in ("smaller alpha", "damping", "hf.cg"):
        assert hint in res.message
    assert res.residual_norm == pytest.approx(float((flat(b) - H @ flat(res.x)).norm()), rel=1e-9)


def test_scaled_series_converges_to_the_solution():
    matvec, like, H = _spd()
    b = random_tree(like, 1)
    res = hf.neumann(matvec, b, num_terms=500, tol=1e-8)
    assert res.converged and res.status == "converged"
    assert torch.allclose(flat(res.x), torch.linalg.solve(H, flat(b)), rtol=1e-6)
    assert res.stats["alpha"] == pytest.approx(1 / 5.0, rel=1e-2)
    # one product per term, those estimating alpha, and one confirming the true residual
    assert res.num_matvecs == res.stats["terms"] + res.stats["alpha_num_matvecs"] + 1
    assert res.residual_norm == pytest.approx(float((flat(b) - H @ flat(res.x)).norm()), rel=1e-6)


def test_too_few_terms_reports_max_iters_with_the_true_residual():
    matvec, like, H = _spd()
    b = random_tree(like, 2)
    with pytest.warns(hf.ConvergenceWarning, match="max_iters"):
        res = hf.neumann(matvec, b, alpha=0.2, num_terms=5)
    assert res.status == "max_iters" and res.num_matvecs == 5
    assert res.residual_norm == pytest.approx(float((flat(b) - H @ flat(res.x)).norm()), rel=1e-9)
    x_ref = 0.2 * sum(torch.linalg.matrix_power(torch.eye(6, dtype=DT) - 0.2 * H, j) @ flat(b) for j in range(5))
    assert torch.allclose(flat(res.x), x_ref)


def test_dominant_negative_eigenvalue_is_reported_as_indefinite():
    matvec, like, _ = spectrum_operator([-6.0, 1.0, 2.0, 3.0])
    with pytest.warns(hf.ConvergenceWarning, match="indefinite"):
        res = hf.neumann(matvec, random_tree(like, 3))
    assert res.status == "indefinite" and "damping" in res.message and "hf.cg" in res.message


def test_small_negative_eigenvalue_makes_the_series_diverge_detectably():
    matvec, like, H = spectrum_operator([-0.5, 1.0, 2.0, 3.0, 4.0])
    b = random_tree(like, 4)
    with pytest.warns(hf.ConvergenceWarning, match="diverged"):
        res = hf.neumann(matvec, b, num_terms=1000)
    assert res.status == "diverged" and res.num_matvecs < 200
    assert torch.isfinite(flat(res.x)).all()


def test_damping_shifts_the_system():
    matvec, like, H = spectrum_operator([-0.5, 1.0, 2.0, 3.0])
    b = random_tree(like, 5)
    res = hf.neumann(matvec, b, damping=1.0, num_terms=500, tol=1e-9)
    assert res.converged
    assert torch.allclose(flat(res.x), torch.linalg.solve(H + torch.eye(4, dtype=DT), flat(b)), rtol=1e-6)


def test_zero_rhs():
    matvec, like, _ = _spd()
    res = hf.neumann(matvec, hf.tree.zeros_like(like))
    assert res.converged and res.num_matvecs == 0


def test_lissa_with_one_matvec_is_neumann_with_effective_damping_scale_times_damping():
    matvec, like, H = _spd()
    b = random_tree(like, 6)
    res = hf.lissa(matvec, b, scale=10.0, damping=0.01, num_terms=2000, tol=1e-9)
    assert res.converged
    assert res.stats["effective_damping"] == pytest.approx(0.1)
    assert torch.allclose(flat(res.x), torch.linalg.solve(H + 0.1 * torch.eye(6, dtype=DT), flat(b)), rtol=1e-6)
    same = hf.neumann(matvec, b, alpha=0.1, damping=0.1, num_terms=2000, tol=1e-9)
    assert torch.allclose(flat(res.x), flat(same.x))


def test_lissa_with_sampled_hessians_approaches_the_mean_system():
    m1, like, H1 = spectrum_operator([1.0, 2.0, 3.0, 4.0], seed=1)
    H2 = H1 + 0.1 * torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=DT))

    def m2(v):
        x = torch.cat([v["a"], v["b"][0].reshape(-1)])
        y = H2 @ x
        return {"a": y[:1], "b": [y[1:].reshape(-1, 1)]}

    b = random_tree(like, 7)
    stream = (m1 if i % 2 == 0 else m2 for i in range(10_000))
    res = hf.lissa(stream, b, scale=5.0, num_terms=400, tol=1e-12)
    assert res.converged  # the sampled terms still contract
    want = torch.linalg.solve((H1 + H2) / 2, flat(b))
    assert float((flat(res.x) - want).norm() / want.norm()) < 0.05


def test_lissa_reports_a_too_small_scale_and_running_out():
    matvec, like, _ = _spd()
    b = random_tree(like, 8)
    with pytest.warns(hf.ConvergenceWarning, match="diverged"):
        res = hf.lissa(matvec, b, scale=1.0)
    assert res.status == "diverged"
    with pytest.warns(hf.ConvergenceWarning, match="ran out"):
        res = hf.lissa([matvec] * 3, b, scale=10.0)
    assert res.status == "max_iters" and res.num_matvecs == 3
    with pytest.raises(ValueError, match="empty"):
        hf.lissa([], b, scale=1.0)


def test_bad_inputs():
    matvec, like, _ = _spd()
    b = random_tree(like, 0)
    with pytest.raises(ValueError, match="alpha must be positive"):
        hf.neumann(matvec, b, alpha=0.0)
    with pytest.raises(ValueError, match="num_terms must be at least 1"):
        hf.neumann(matvec, b, num_terms=0)
    with pytest.raises(ValueError, match="b has non-finite"):
        hf.neumann(matvec, {"a": b["a"] * float("nan"), "b": b["b"]})
    with pytest.raises(ValueError, match=r"b\['b'\]\[0\] has shape|missing leaves"):
        hf.neumann(lambda v: {"a": v["a"]}, b, alpha=0.1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_converged_is_decided_on_the_true_residual(seed):
    # κ = 1000 in float32: the series' own residual (I − αA)^J b drifts from b − Ax as x
    # sums ten thousand rounded terms. "converged" must hold for b − Ax, and where
    # rounding keeps b − Ax above tol the result must say so, not claim convergence.
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=DT))
    H64 = (Q * torch.logspace(0, 3, 50, dtype=DT)) @ Q.T
    b64 = torch.randn(50, generator=g, dtype=DT)
    H, b = H64.float(), b64.float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        res = hf.neumann(lambda v: H @ v, b, tol=1e-5, num_terms=30000)
    true = float((b - H @ res.x).norm())
    assert float(res.residual_norm) == pytest.approx(true, rel=1e-3)  # the true residual, in the solver's precision
    if res.converged:
        assert true <= 1e-5 * float(b.norm())
    else:
        assert res.status is hf.Status.MAX_ITERS and "stalls" in res.message
        assert true > 1e-5 * float(b.norm())
