"""Every layer on every device torch sees: products, Lanczos, trace, CG and the kernel
routing on CUDA (cuDNN's RNNs, fused attention), each against a float64 dense Hessian
formed on the CPU from the same weights. On a machine without a GPU these run on the
CPU only; on one with a GPU they are the GPU's correctness check (benchmarks/gpu.sh)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from nn_cases import LastStep
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import hvpfunc as hf
from hvpfunc.testing import dense_hessian, dense_matrix

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(4, nhead=2, dim_feedforward=4, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x).mean(dim=1))


def _problem(kind: str, device: str):
    """(f, params on ``device`` in float32, its args there, the float64 dense Hessian
    formed on the CPU from the same weights and data)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        x = torch.randn(32, 6, generator=gen)
    elif kind == "lstm":
        model = LastStep(nn.LSTM(3, 5, batch_first=True), 5, 3)
        x = torch.randn(16, 4, 3, generator=gen)
    else:
        model = _Attention()
        x = torch.randn(16, 5, 4, generator=gen)
    y = torch.randint(0, 3, (x.shape[0],), generator=gen)
    model.eval()
    cpu64 = copy.deepcopy(model).double()

    def f_of(m):
        def f(p, x, y):
            return nn.functional.cross_entropy(torch.func.functional_call(m, p, (x,)), y)

        return f

    with sdpa_kernel([SDPBackend.MATH]):  # the reference's double backward needs it on CPUs too
        H = dense_hessian(f_of(cpu64), {k: p.detach() for k, p in cpu64.named_parameters()}, x.double(), y)
    model = model.to(device)
    params = {k: p.detach() for k, p in model.named_parameters()}
    return f_of(model), params, (x.to(device), y.to(device)), H


def _close(A: torch.Tensor, H: torch.Tensor, rtol: float = 1e-4) -> None:
    err = float((A.double().cpu() - H).abs().max())
    assert err <= rtol * float(H.abs().max()), f"max error {err:.3g} against max |H| {float(H.abs().max()):.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "mode", ["auto", "forward-over-reverse", "reverse-over-reverse", "reverse-over-reverse-recomputed", "linearize"]
)
def test_every_mode_matches_the_dense_hessian(device, mode):
    f, params, args, H = _problem("mlp", device)
    mv = hf.hvp_fn(f, params, *args, mode=mode)
    _close(dense_matrix(mv, params), H)
    assert all(leaf.device.type == device for leaf in mv(params).values())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["lstm", "attention"])
def test_kernels_without_second_derivatives_are_routed(device, kind):
    # on CUDA these layers default to cuDNN's RNN and the fused attention kernels,
    # neither of which has a double backward; the routing must leave cuDNN as it was
    f, params, args, H = _problem(kind, device)
    enabled = torch.backends.cudnn.enabled
    mv = hf.hvp_fn(f, params, *args)
    _close(dense_matrix(mv, params, chunk_size=1), H)
    assert torch.backends.cudnn.enabled == enabled


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("basis_device", [None, "cpu"])
def test_lanczos_on_the_device_and_with_the_basis_on_the_host(device, basis_device):
    f, params, args, H = _problem("mlp", device)
    mv = hf.hvp_fn(f, params, *args)
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    res = hf.lanczos(mv, v0, k=3, tol=1e-4, basis_device=basis_device)
    exact = torch.linalg.eigvalsh(H).flip(0)[:3]
    assert res.status == "converged"
    assert torch.allclose(res.eigenvalues.double().cpu(), exact, rtol=0, atol=1e-4 * float(exact[0]))
    assert res.eigenvectors is None or all(
        leaf.device.type == device for leaf in res.eigenvectors.values())


@pytest.mark.parametrize("device", DEVICES)
def test_trace_probes_in_chunks_equal_the_loop_and_the_exact_trace(device):
    f, params, args, H = _problem("mlp", device)
    mv = hf.hvp_fn(f, params, *args)

    def estimate(chunk):
        return hf.trace(mv, params, num_probes=64, method="hutchinson", chunk_size=chunk,
                        generator=torch.Generator().manual_seed(3))

    loop, chunked, auto = estimate(1), estimate(16), estimate("auto")
    exact = float(torch.trace(H))
    # the same probes: vmap over 16 at a time is the loop up to float32 rounding
    assert abs(float(chunked.estimate) - float(loop.estimate)) <= 1e-5 * float(H.abs().sum())
    assert abs(float(auto.estimate) - float(loop.estimate)) <= 1e-5 * float(H.abs().sum())
    assert abs(float(loop.estimate) - exact) <= 5 * float(loop.stderr)


@pytest.mark.parametrize("device", DEVICES)
def test_cg_and_the_spectral_density_on_the_device(device):
    f, params, args, H = _problem("mlp", device)
    mv = hf.hvp_fn(f, params, *args)
    b = hf.tree.random_like(params, generator=torch.Generator().manual_seed(4), kind="gaussian")
    res = hf.cg(mv, b, damping=1.0, tol=1e-6)
    flat_b = torch.cat([t.reshape(-1) for t in b.values()]).double().cpu()
    exact = torch.linalg.solve(H + torch.eye(H.shape[0], dtype=H.dtype), flat_b)
    got = torch.cat([t.reshape(-1) for t in res.x.values()]).double().cpu()
    assert res.converged and float((got - exact).norm() / exact.norm()) < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)
        density = hf.spectral_density(mv, params, num_probes=4, num_iters=20, generator=torch.Generator().manual_seed(5))
    # Gauss quadrature's nodes lie inside the spectrum; its extreme node is the top
    # eigenvalue to within the Krylov space's resolution
    eigenvalues = torch.linalg.eigvalsh(H)
    assert float(density.nodes.max()) <= float(eigenvalues[-1]) * (1 + 1e-4)
    assert float(density.nodes.max()) >= float(eigenvalues[-1]) * (1 - 1e-2)
