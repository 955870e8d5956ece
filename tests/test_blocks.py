"""block_spectra: per-group traces and top eigenvalues against the dense Hessian's blocks."""

import pytest
import torch
from references import DT, mlp
from torch import nn

import hvpfunc as hf
from hvpfunc.testing import dense_matrix


def _model_hessian():
    model = mlp([4, 6, 3])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 4, generator=gen, dtype=DT), torch.randint(0, 3, (40,), generator=gen)
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
    return matvec, params, dense_matrix(matvec, params).double()


def _slices(params, names):
    out, start = {}, 0
    for name, p in params.items():
        out.setdefault(names(name), []).extend(range(start, start + p.numel()))
        start += p.numel()
    return {k: torch.tensor(v) for k, v in out.items()}


def test_traces_and_top_eigenvalues_of_each_layer_match_the_dense_blocks():
    matvec, params, H = _model_hessian()
    res = hf.block_spectra(matvec, params, num_probes=400, k=2, tol=1e-10,
                           generator=torch.Generator().manual_seed(1))
    assert res.groups == ("0", "2") and res.status == "converged"
    for i, (name, idx) in enumerate(_slices(params, lambda n: n.split(".")[0]).items()):
        assert res.groups[i] == name
        block = H[idx][:, idx]
        assert abs(float(res.traces[i]) - float(block.trace())) < 4 * float(res.stderrs[i])
        assert torch.allclose(res.top[i], torch.linalg.eigvalsh(block).flip(0)[:2], rtol=1e-8)
        assert int(res.sizes[i]) == len(idx)
    assert torch.allclose(res.shares.sum(), torch.tensor(1.0, dtype=DT))
    assert "| 0 |" in res.table() and "| 2 |" in res.table()


def test_groups_by_callable_and_by_mapping_and_the_exact_trace_of_a_diagonal_operator():
    matvec, params, H = _model_hessian()
    by_kind = hf.block_spectra(matvec, params, lambda n: n.split(".")[1], num_probes=8, k=1)
    assert by_kind.groups == ("weight", "bias")
    mapping = {"first": ["0.weight", "0.bias"], "last": ["2.weight", "2.bias"]}
    by_map = hf.block_spectra(matvec, params, mapping, num_probes=8, k=0,
                              generator=torch.Generator().manual_seed(1))
    by_module = hf.block_spectra(matvec, params, num_probes=8, k=0, generator=torch.Generator().manual_seed(1))
    assert by_map.groups == ("first", "last")
    assert torch.equal(by_map.traces, by_module.traces)  # the same probes, the same groups
    D = torch.tensor([3.0, -1.0, 2.0, 5.0], dtype=DT)
    like = {"a.w": torch.zeros(3, dtype=DT), "b.w": torch.zeros(1, dtype=DT)}
    diag = hf.block_spectra(lambda v: {"a.w": D[:3] * v["a.w"], "b.w": D[3:] * v["b.w"]}, like, num_probes=4, k=3)
    assert torch.equal(diag.traces, torch.tensor([4.0, 5.0], dtype=DT))  # z² = 1: exact for diagonal H
    assert torch.allclose(diag.top[0], torch.tensor([3.0, 2.0, -1.0], dtype=DT))
    assert diag.top[1, 0] == 5.0 and torch.isnan(diag.top[1, 1:]).all()


def test_bad_groups_name_the_parameter():
    matvec, params, _ = _model_hessian()
    with pytest.raises(ValueError, match="'0.bias'"):
        hf.block_spectra(matvec, params, {"a": ["0.weight"], "b": ["2.weight", "2.bias"]}, num_probes=4)
    with pytest.raises(ValueError, match="'nope'"):
        hf.block_spectra(matvec, params, {"a": ["nope"]}, num_probes=4)
    with pytest.raises(ValueError, match="two groups"):
        hf.block_spectra(matvec, params, {"a": ["0.weight"], "b": ["0.weight"]}, num_probes=4)
