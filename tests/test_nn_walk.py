"""A walk over torch.nn: losses x reductions, activations, normalization (train and eval),
attention, embeddings, recurrent, convolution, pooling, padding and resampling layers,
through every mode and auto. Each product equals the dense Hessian's
(torch.autograd.functional.hessian), on three calls with the same vector (replays must
not drift), or the mode refuses with an error that names it. Crashing combinations are
refused before they run (linearize over aten::mse_loss, a segmentation fault in torch
2.13), so this runs in-process. The layers whose backward PyTorch cannot differentiate
are refused by every exact mode with an error that names the operation and
gradient-difference, whose products match central differences of the gradient."""

from __future__ import annotations

import pytest
import torch
from nn_cases import cases, without_second_derivative
from references import flat
from torch.nn.attention import SDPBackend, sdpa_kernel

import hvpfunc as hf
from hvpfunc.testing import dense_hessian

CASES = cases()
MODES = ["reverse-over-reverse", "reverse-over-reverse-recomputed", "forward-over-reverse", "linearize", "auto"]


@pytest.mark.parametrize("name", list(CASES))
def test_every_mode_is_right_or_refuses(name, monkeypatch):
    from hvpfunc._products import auto

    monkeypatch.setattr(auto, "_TRACE_COST_IN_BUILDS", 0.0)  # auto tries its traced mode at once
    monkeypatch.setattr(auto, "_FIRST_TRACE_IMPORT_SECONDS", 0.0)
    model, loss, (x, y) = CASES[name]
    params = {k: p.detach() for k, p in model.named_parameters()}
    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernel has no double backward
        H = dense_hessian(lambda q: loss(torch.func.functional_call(model, q, (x,)), y), params)
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    want = H @ flat(v)
    refused = {}
    for mode in MODES:
        try:
            mv, _ = hf.model_hvp_fn(model, loss, (x, y), mode=mode)
            got = [flat(mv(v)) for _ in range(3)]
        except RuntimeError as err:
            assert f"mode='{mode}'" in str(err) and mode != "auto", (mode, str(err)[:300])
            refused[mode] = str(err)
            continue
        for g in got:
            assert torch.allclose(g, want, rtol=1e-8, atol=1e-10 * float(want.abs().max())), mode
    assert "reverse-over-reverse" not in refused and "auto" not in refused


@pytest.mark.parametrize("name", list(without_second_derivative()))
def test_a_layer_without_a_second_derivative_is_refused_and_gradient_difference_computes_it(name):
    model, loss, (x, y) = without_second_derivative()[name]
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")

    def gradient(q):
        return flat(torch.func.grad(lambda w: loss(torch.func.functional_call(model, w, (x,)), y))(q))

    eps = 1e-5  # central differences in float64: error about eps² ‖∇³f‖ + ε/eps
    want = (gradient({k: p + eps * v[k] for k, p in params.items()})
            - gradient({k: p - eps * v[k] for k, p in params.items()})) / (2 * eps)
    for mode in MODES:
        with pytest.raises(RuntimeError, match=f"mode='{mode}'") as caught:
            mv, _ = hf.model_hvp_fn(model, loss, (x, y), mode=mode)
            mv(v)
        said = str(caught.value)
        assert "gradient-difference" in said or "forward-mode derivative" in said, said
        if mode in ("reverse-over-reverse", "auto"):  # the stored graph's first product, in torch's words before
            assert "PyTorch has no derivative for" in said and "_backward" in said, said
    mv, _ = hf.model_hvp_fn(model, loss, (x, y), mode="gradient-difference")
    assert torch.allclose(flat(mv(v)), want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))
