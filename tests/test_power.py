import warnings

import pytest
import torch
from references import DT, flat, mlp_loss, random_tree, spectrum_operator

import hvpfunc as hf
from hvpfunc.testing import dense_hessian


def _indefinite():
    # dominant eigenvalue negative: the user story "power iteration converges to a
    # negative value". Gaps keep power iteration quick.
    return spectrum_operator([-10.0, -3.0, -1.0, 0.5, 2.0, 4.0, 6.0])


def test_lm_returns_the_signed_largest_magnitude_eigenvalue():
    matvec, like, H = _indefinite()
    res = hf.power_iteration(matvec, random_tree(like, 0), tol=1e-10)
    assert res.which == "LM"
    assert bool(res.converged[0])
    assert float(res.eigenvalues[0]) == pytest.approx(-10.0, rel=1e-9)
    q = flat(hf.tree.index(res.eigenvectors, 0))
    assert float(q.norm()) == pytest.approx(1.0)
    assert float((H @ q + 10.0 * q).norm()) <= 1e-9 * 10
    assert float(res.residuals[0]) == pytest.approx(float((H @ q + 10 * q).norm()), abs=1e-9)


@pytest.mark.parametrize("which,expected", [("LA", 6.0), ("SA", -10.0)])
def test_algebraic_ends_even_when_the_dominant_eigenvalue_has_the_other_sign(which, expected):
    matvec, like, _ = _indefinite()
    res = hf.power_iteration(matvec, random_tree(like, 1), which=which, tol=1e-9)
    assert res.which == which and bool(res.converged[0])
    assert float(res.eigenvalues[0]) == pytest.approx(expected, rel=1e-7)


def test_sa_on_a_positive_definite_operator_uses_a_shift():
    matvec, like, H = spectrum_operator([1.0, 2.0, 3.0, 9.0, 10.0])
    res = hf.power_iteration(matvec, random_tree(like, 2), which="SA", tol=1e-9, max_iters=5000)
    assert bool(res.converged[0])
    assert float(res.eigenvalues[0]) == pytest.approx(1.0, rel=1e-6)


def test_an_end_is_right_or_flagged_when_the_first_run_cannot_converge():
    # H = 5I + O(1e-6): the unshifted run cannot converge in 1000 steps (ratio 1 − 3e-7),
    # and the norm it estimates, a lower bound of ‖H‖, falls mid-spectrum: shifted by it,
    # the far end dominated and was returned as "SA" in some of these problems. Shifted
    # by that end instead, "SA" converges; "LA" (shifted by −‖H‖, ratio 1 − 1e-7) may
    # say that it did not converge, never return a wrong end as converged.
    for seed in range(8):
        lam = (5.0 + 1e-6 * torch.randn(5, generator=torch.Generator().manual_seed(seed), dtype=DT)).tolist()
        matvec, like, H = spectrum_operator(lam, seed=seed)
        for which, want in (("SA", min(lam)), ("LA", max(lam))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", hf.ConvergenceWarning)
                res = hf.power_iteration(matvec, random_tree(like, seed), which=which, tol=1e-10)
            right = abs(float(res.eigenvalues[0]) - want) <= 1e-10 * 5.0
            assert right or res.status != "converged", (seed, which, float(res.eigenvalues[0]), lam)
            assert res.status == "converged" or which == "LA"


def test_stops_as_soon_as_the_tolerance_holds():
    matvec, like, _ = spectrum_operator([1.0, 2.0, 20.0])
    loose = hf.power_iteration(matvec, random_tree(like, 3), tol=1e-3)
    tight = hf.power_iteration(matvec, random_tree(like, 3), tol=1e-10)
    assert loose.num_matvecs < tight.num_matvecs
    # ratio 1/10 per step: about 3 extra steps per 3 digits of residual, not 1000
    assert tight.num_matvecs < 20
    assert float(tight.residuals[0]) <= 1e-10 * 20


def test_max_iters_reached_says_not_converged_and_warns():
    matvec, like, _ = spectrum_operator([1.0, 0.999, 0.5])
    with pytest.warns(hf.ConvergenceWarning, match=r"did not converge \(max_iters\): stopped after 5 products"):
        res = hf.power_iteration(matvec, random_tree(like, 4), max_iters=5)
    assert not bool(res.converged[0])
    assert res.num_matvecs == 5
    assert res.status is hf.Status.MAX_ITERS and "raise max_iters" in res.message


def test_network_hessian_top_eigenvalue_matches_eigh():
    f, params, (x, y) = mlp_loss([4, 6, 1])
    matvec = hf.hvp_fn(f, params, x, y)
    H = dense_hessian(f, params, x, y)
    evals = torch.linalg.eigvalsh(H)
    lm = evals[evals.abs().argmax()]
    res = hf.power_iteration(matvec, random_tree(params, 5), tol=1e-9, max_iters=20000)
    assert bool(res.converged[0])
    assert float(res.eigenvalues[0]) == pytest.approx(float(lm), rel=1e-8)


def test_bad_inputs_are_clear_errors():
    matvec, like, _ = spectrum_operator([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="zero vector"):
        hf.power_iteration(matvec, hf.tree.zeros_like(like))
    nan_start = {"a": torch.full_like(like["a"], float("nan")), "b": like["b"]}
    with pytest.raises(ValueError, match="non-finite"):
        hf.power_iteration(matvec, nan_start)
    with pytest.raises(ValueError, match="which must be"):
        hf.power_iteration(matvec, random_tree(like, 0), which="BE")
    with pytest.raises(ValueError, match=r"matvec\(v\)\['a'\] has shape \(2,\), but v\['a'\] has shape \(1,\)"):
        hf.power_iteration(lambda v: {"a": torch.zeros(2, dtype=DT), "b": v["b"]}, random_tree(like, 0))
    with pytest.raises(ValueError, match="missing leaves"):
        hf.power_iteration(lambda v: {"a": v["a"]}, random_tree(like, 0))


def test_tied_magnitudes_stall_lm_but_not_the_algebraic_ends():
    matvec, like, _ = spectrum_operator([-2.0, 2.0, 0.5, -0.3, 1.0])
    with pytest.warns(hf.ConvergenceWarning, match="did not converge"):
        lm = hf.power_iteration(matvec, random_tree(like, 0), max_iters=200)
    assert not bool(lm.converged[0])
    # the message names the cause (not a budget to raise) and what does separate them
    assert "opposite signs, about 2 and -2" in lm.message or "opposite signs, about -2 and 2" in lm.message
    assert "hf.lanczos(matvec, v0, k=2, which='LM')" in lm.message
    both = hf.lanczos(matvec, random_tree(like, 0), k=2, which="LM", tol=1e-10)
    assert sorted(both.eigenvalues.tolist()) == pytest.approx([-2.0, 2.0], rel=1e-9)
    # a near tie too: at the rate 0.999 per step a budget of 200 was never going to do
    near_tie, near_like, _ = spectrum_operator([1.0, -0.999, 0.5])
    with pytest.warns(hf.ConvergenceWarning):
        near = hf.power_iteration(near_tie, random_tree(near_like, 4), max_iters=200)
    assert "opposite signs, about 1 and -0.999 " in near.message
    la = hf.power_iteration(matvec, random_tree(like, 0), which="LA", tol=1e-8, max_iters=2000)
    sa = hf.power_iteration(matvec, random_tree(like, 0), which="SA", tol=1e-8, max_iters=2000)
    assert bool(la.converged[0]) and float(la.eigenvalues[0]) == pytest.approx(2.0, rel=1e-7)
    assert bool(sa.converged[0]) and float(sa.eigenvalues[0]) == pytest.approx(-2.0, rel=1e-7)


def test_max_iters_none_is_the_default():
    matvec, like, _ = spectrum_operator([1.0, 3.0, -0.5])
    res = hf.power_iteration(matvec, random_tree(like, 0), max_iters=None, tol=1e-10)
    assert res.converged and float(res.eigenvalues[0]) == pytest.approx(3.0)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_error_bound_holds_in_float32_against_the_exact_spectrum(which):
    # ‖H‖ = 1e6 in float32: the products' rounding (≈ 0.1) is far above the eigenvalues
    # 1e-3, which the bound must cover (to the nearest eigenvalue: power iteration's r)
    lam = torch.tensor([1e6, 5e5] + [1e-3] * 28, dtype=torch.float64)
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    H = ((Q * lam) @ Q.T).float()
    res = hf.power_iteration(lambda v: {"w": H @ v["w"]}, {"w": torch.randn(30, generator=gen)}, which=which, tol=1e-7)
    assert res.status == "converged"
    nearest = float((lam - float(res.eigenvalues[0])).abs().min())
    assert nearest <= float(res.errors[0]) <= 100 * torch.finfo(torch.float32).eps * 2e6  # its stopping floor
