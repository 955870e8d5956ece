import pytest
import torch
from hypothesis import given
from references import DT, spectrum_operator

from hvpfunc import tree as T
from hvpfunc.testing import (
    assert_hvp_matches_hessian,
    assert_symmetric,
    dense_hessian,
    dense_matrix,
    pytrees,
    smooth_functions,
)


def test_assert_symmetric_passes_on_symmetric_and_fails_on_non_symmetric():
    matvec, like, _ = spectrum_operator([1.0, -2.0, 3.0, 0.5])
    assert_symmetric(matvec, like)
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=gen, dtype=DT)
    with pytest.raises(AssertionError, match=r"not symmetric: pair 0: <u, Hv> ="):
        assert_symmetric(lambda v: A @ v, torch.zeros(4, dtype=DT))


def test_dense_matrix_and_dense_hessian_agree():
    f = lambda p: (p["x"] ** 3).sum() * p["y"][0].sum()  # noqa: E731
    params = {"x": torch.tensor([1.0, 2.0], dtype=DT), "y": [torch.tensor([0.5, -1.0], dtype=DT)]}
    H = dense_hessian(f, params)
    # closed form: f = s3 * t with s3 = Σx³, t = Σy
    t, x = params["y"][0].sum(), params["x"]
    want = torch.zeros(4, 4, dtype=DT)
    want[:2, :2] = torch.diag(6 * x * t)
    want[:2, 2:] = (3 * x**2)[:, None].expand(2, 2)
    want[2:, :2] = want[:2, 2:].T
    assert torch.allclose(H, want)
    from hvpfunc import hvp_fn

    assert torch.allclose(dense_matrix(hvp_fn(f, params), params), want)


def test_assert_hvp_matches_hessian_reports_a_mismatch(monkeypatch):
    f = lambda p: (p["x"] ** 4).sum()  # noqa: E731
    params = {"x": torch.tensor([1.0, -2.0], dtype=DT)}
    assert_hvp_matches_hessian(f, params)
    import hvpfunc.testing as testing

    monkeypatch.setattr(testing, "hvp_fn", lambda *a, **k: (lambda v: T.scale(1.01, v)))
    with pytest.raises(AssertionError, match="differs from the dense Hessian"):
        assert_hvp_matches_hessian(f, params)


@given(params=pytrees(), f=smooth_functions())
def test_strategies_give_float_trees_and_smooth_scalar_functions(params, f):
    T.check_tree(params)
    out = f(params)
    assert out.dim() == 0 and torch.isfinite(out)
    assert 1 <= len(T.leaves_with_paths(params)[0]) <= 4
