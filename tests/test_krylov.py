import pytest
import torch
from references import DT

from hvpfunc._krylov import empty_basis, expand, lanczos_step


def _basis(j: int, n: int, seed: int, batch: tuple = ()) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(*batch, n, j, generator=gen, dtype=DT))
    return Q.transpose(-1, -2).contiguous()


@pytest.mark.parametrize("batch", [(), (1,), (3,)])
@pytest.mark.parametrize("inside", [0.0, 1.0, 1e9])
def test_lanczos_step_leaves_w_orthogonal_to_the_basis_and_returns_its_coefficients(batch, inside):
    # w = Vᵀa + r with r ⊥ V: the step must return r and h = a, also when w lies almost
    # inside the basis (inside = 1e9: one pass cancels nine digits, the second restores
    # orthogonality), for one basis, a batch of one (matrix-vector kernels) and a batch
    gen = torch.Generator().manual_seed(1)
    V = _basis(12, 200, 0, batch)
    a = torch.randn(*batch, 12, generator=gen, dtype=DT)
    r = torch.randn(*batch, 200, generator=gen, dtype=DT)
    r = r - (V.transpose(-1, -2) @ (V @ r.unsqueeze(-1))).squeeze(-1)
    w = inside * (a.unsqueeze(-2) @ V).squeeze(-2) + r
    out, h, beta = lanczos_step(V, w.clone())
    assert out.shape == w.shape and h.shape == a.shape and beta.shape == batch
    rounding = 1e-13 * max(inside, 1.0)  # r is recoverable to a few ε·‖w‖, no better
    assert torch.allclose(out, r, rtol=0, atol=rounding)
    assert torch.allclose(h, inside * a, rtol=1e-12, atol=1e-12)
    assert torch.allclose(beta, torch.linalg.vector_norm(r, dim=-1), rtol=0, atol=rounding)
    leftover = torch.linalg.vector_norm(V @ out.unsqueeze(-1), dim=(-2, -1)) / beta
    assert float(leftover.max()) <= 1e-13


def test_lanczos_step_matches_expand_on_a_lanczos_basis():
    # on a true Lanczos basis the three-term step and one pass give expand's four-pass
    # result to rounding
    gen = torch.Generator().manual_seed(2)
    A = torch.randn(80, 80, generator=gen, dtype=DT)
    H = (A + A.T) / 2
    q = torch.randn(80, generator=gen, dtype=DT)
    V = (q / q.norm())[None]
    for _ in range(30):
        w = H @ V[-1]
        ours = lanczos_step(V, w.clone())
        theirs = expand(V, w.clone())
        for x, y in zip(ours, theirs):
            assert torch.allclose(x, y, rtol=1e-10, atol=1e-12)
        V = torch.cat([V, (ours[0] / ours[2])[None]])
    assert torch.allclose(V @ V.T, torch.eye(31, dtype=DT), atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.complex64])
def test_empty_basis_gives_aligned_writable_rows_of_any_dtype(dtype):
    V = empty_basis((3, 5, 7), dtype, torch.device("cpu"))
    assert V.shape == (3, 5, 7) and V.dtype == dtype and V.is_contiguous()
    assert V.data_ptr() % 64 == 0
    V.fill_(2)
    assert torch.equal(V[2, 4], torch.full((7,), 2, dtype=dtype))
    assert empty_basis((2, 3), dtype, torch.device("meta")).device.type == "meta"


def test_an_asymmetry_at_low_precision_rounding_says_what_to_do():
    # a bfloat16 matvec behind float32 vectors: symmetric up to bfloat16's rounding,
    # which the float32 check refuses; the error names the way out, which works
    import hvpfunc as hf

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(200, 200, generator=gen)
    H16 = ((A + A.T) / 2).to(torch.bfloat16)
    eigenvalues = torch.linalg.eigvalsh(H16.double())
    with pytest.raises(ValueError, match="not symmetric.*lower precision than its vectors") as raised:
        hf.lanczos(lambda v: (H16 @ v.to(torch.bfloat16)).float(), torch.ones(200), tol=3e-2)
    assert "vectors of its own precision" in str(raised.value)
    res = hf.lanczos(lambda v: H16 @ v, torch.ones(200, dtype=torch.bfloat16), tol=3e-2)
    # at tol 3e-2 the bound is a residual's: an eigenvalue lies within the reported error
    assert res.status == "converged"
    assert float((eigenvalues - float(res.eigenvalues[0])).abs().min()) <= float(res.errors[0])
    # an operator that is plainly not symmetric gets no such hint
    with pytest.raises(ValueError, match="not symmetric") as raised:
        hf.lanczos(lambda v: A @ v, torch.ones(200), tol=3e-2)
    assert "lower precision" not in str(raised.value)
