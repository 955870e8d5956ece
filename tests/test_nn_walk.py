"""A walk over torch.nn: losses x reductions, activations, normalization (train and eval),
attention, embeddings, recurrent and convolution layers, through every mode and auto.
Each product equals the dense Hessian's (torch.autograd.functional.hessian), on three
calls with the same vector (replays must not drift), or the mode refuses with an error
that names it. Crashing combinations are refused before they run (linearize over
aten::mse_loss, a segmentation fault in torch 2.13), so this runs in-process."""

from __future__ import annotations

import pytest
import torch
from nn_cases import cases
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
