import numpy as np
import pytest
import torch
from references import flat, mlp_loss, random_tree, spectrum_operator

import hvpfunc as hf

scipy_linalg = pytest.importorskip("scipy.sparse.linalg")


def test_linear_operator_applies_the_matvec_in_float64_numpy():
    matvec, like, H = spectrum_operator([3.0, -1.0, 2.0, 0.5, 4.0])
    A = hf.to_scipy(matvec, like)
    assert A.shape == (5, 5) and A.dtype == np.float64
    x = np.arange(5.0)
    assert np.allclose(A.matvec(x), H.numpy() @ x)
    assert np.allclose(A.rmatvec(x), H.numpy() @ x)
    X = np.random.default_rng(0).standard_normal((5, 3))
    assert np.allclose(A.matmat(X), H.numpy() @ X)


def test_arpack_cross_check_on_a_network_hessian():
    f, params, (x, y) = mlp_loss([4, 8, 2])
    matvec = hf.hvp_fn(f, params, x, y)
    ev = scipy_linalg.eigsh(hf.to_scipy(matvec, params), k=3, which="LA", tol=1e-10)[0]
    ours = hf.lanczos(matvec, random_tree(params, 0), k=3, tol=1e-10)
    assert np.allclose(np.sort(ev)[::-1], ours.eigenvalues.numpy(), rtol=1e-8)


def test_minres_on_an_indefinite_hessian_where_cg_stops():
    matvec, like, H = spectrum_operator([-2.0, 1.0, 3.0, 5.0])
    b = flat(random_tree(like, 1)).numpy()
    x, info = scipy_linalg.minres(hf.to_scipy(matvec, like), b, rtol=1e-12)
    assert info == 0 and np.allclose(H.numpy() @ x, b, atol=1e-9)


def test_float32_params_round_trip():
    params = {"w": torch.tensor([1.0, 2.0])}
    A = hf.to_scipy(lambda v: {"w": 3.0 * v["w"]}, params)
    assert np.allclose(A.matvec(np.array([1.0, -1.0])), [3.0, -3.0])
