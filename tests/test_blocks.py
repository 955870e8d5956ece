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
    with pytest.raises(ValueError, match="pattern 'x.*' matches no parameter"):
        hf.block_spectra(matvec, params, {"a": "x.*", "b": "*"}, num_probes=4)
    with pytest.raises(ValueError, match="'0.weight' is in two groups"):
        hf.block_spectra(matvec, params, {"a": "0.*", "b": "*"}, num_probes=4)


def test_groups_by_glob_pattern_equal_groups_by_name():
    matvec, params, _ = _model_hessian()
    by_pattern = hf.block_spectra(matvec, params, {"weights": "*.weight", "biases": ["0.bias", "2.b*"]},
                                  num_probes=8, k=1, generator=torch.Generator().manual_seed(2))
    by_name = hf.block_spectra(matvec, params, {"weights": ["0.weight", "2.weight"], "biases": ["0.bias", "2.bias"]},
                               num_probes=8, k=1, generator=torch.Generator().manual_seed(2))
    assert by_pattern.groups == ("weights", "biases")
    assert torch.equal(by_pattern.traces, by_name.traces) and torch.equal(by_pattern.top, by_name.top)


def _diagonal_blocks(first, second):
    """A block-diagonal (diagonal) operator on {"a.w", "b.w"} with those spectra."""
    d = torch.cat([first, second])
    like = {"a.w": torch.zeros(len(first), dtype=DT), "b.w": torch.zeros(len(second), dtype=DT)}
    calls = []

    def matvec(v):
        calls.append(v["a.w"].shape)
        return {"a.w": d[: len(first)] * v["a.w"], "b.w": d[len(first):] * v["b.w"]}

    return matvec, like, calls


def _fast_and_slow_groups():
    """Group "a": well separated top eigenvalues (lockstep finishes); group "b": a cluster
    1e-3 apart at the top of 400 (60 lockstep steps do not resolve it at tol 1e-10)."""
    gen = torch.Generator().manual_seed(0)
    first = torch.cat([torch.tensor([10.0, 8.0], dtype=DT), torch.rand(50, generator=gen, dtype=DT)])
    second = torch.cat([torch.tensor([5.0, 4.999, 4.998], dtype=DT), 4.9 * torch.rand(397, generator=gen, dtype=DT)])
    return first, second


def test_lockstep_batches_the_groups_products_and_hands_slow_groups_to_thick_restarts():
    first, second = _fast_and_slow_groups()
    matvec, like, calls = _diagonal_blocks(first, second)
    # lockstep runs where no copy check follows (k = 1, or find_copies=False)
    res = hf.block_spectra(matvec, like, num_probes=4, k=2, tol=1e-10, chunk_size=None, find_copies=False,
                           generator=torch.Generator().manual_seed(1))
    assert res.status == "converged" and bool(res.converged.all())
    assert torch.allclose(res.top[0], torch.tensor([10.0, 8.0], dtype=DT), rtol=1e-10)
    assert torch.allclose(res.top[1], torch.tensor([5.0, 4.999], dtype=DT), rtol=1e-10)
    # one vmap call per lockstep step carried both groups' vectors while "a" ran: fewer
    # calls of the matvec than products (one call for the 4 probes, too)
    assert res.num_matvecs - len(calls) >= 3 + 5
    assert res.num_matvecs > 4 + 60 + 5  # the slow group went on after its 60 lockstep steps
    loop_matvec, _, loop_calls = _diagonal_blocks(first, second)
    looped = hf.block_spectra(loop_matvec, like, num_probes=4, k=2, tol=1e-10, chunk_size=1, find_copies=False,
                              generator=torch.Generator().manual_seed(1))
    assert looped.num_matvecs == len(loop_calls) and torch.allclose(looped.top, res.top, rtol=1e-10)


def test_one_eigenvalue_per_group_one_product_at_a_time_uses_thick_restarts_and_agrees():
    matvec, params, H = _model_hessian()
    res1 = hf.block_spectra(matvec, params, num_probes=4, k=1, tol=1e-10, chunk_size=1)
    res2 = hf.block_spectra(matvec, params, num_probes=4, k=1, tol=1e-10, chunk_size=None)
    for i, idx in enumerate(_slices(params, lambda n: n.split(".")[0]).values()):
        top = torch.linalg.eigvalsh(H[idx][:, idx])[-1]
        assert torch.allclose(res1.top[i, 0], top, rtol=1e-9) and torch.allclose(res2.top[i, 0], top, rtol=1e-9)


def test_lockstep_reads_a_groups_whole_basis_only_where_simons_estimate_asks(monkeypatch):
    # the slow group of the test above runs 60 lockstep steps: its basis stays
    # semi-orthogonal (the Ritz values after hand-over are right to 1e-10) while the
    # whole basis is read on a minority of steps
    from hvpfunc._stochastic import blocks

    passes = []
    step = blocks.reorthogonalize

    def counted(V, *args, **kwargs):
        passes.append(V.shape[0])
        return step(V, *args, **kwargs)

    monkeypatch.setattr(blocks, "reorthogonalize", counted)
    first, second = _fast_and_slow_groups()
    matvec, like, _ = _diagonal_blocks(first, second)
    res = hf.block_spectra(matvec, like, num_probes=4, k=2, tol=1e-10, chunk_size=None, find_copies=False,
                           generator=torch.Generator().manual_seed(1))
    assert torch.allclose(res.top[1], torch.tensor([5.0, 4.999], dtype=DT), rtol=1e-10)
    assert 0 < len(passes) <= 0.4 * 60, passes


def test_a_nearly_scalar_operator_has_each_blocks_top_eigenvalues():
    # H = 5I + O(1e-6): the three-term steps cancel (‖Hq_j‖/β_j ≈ 10⁶); with one pass the
    # next step carried the pair's rounding into the older vectors and every run raised
    # "the matvec is not symmetric"
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=torch.Generator().manual_seed(2), dtype=DT))
    lam = 5.0 + 1e-6 * torch.randn(60, generator=torch.Generator().manual_seed(3), dtype=DT)
    H = (Q * lam) @ Q.T
    H = (H + H.T) / 2
    like = {"a": torch.zeros(30, dtype=DT), "b": torch.zeros(30, dtype=DT)}

    def matvec(v):
        y = H @ torch.cat([v["a"], v["b"]])
        return {"a": y[:30], "b": y[30:]}

    res = hf.block_spectra(matvec, like, num_probes=4, k=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    assert res.groups == ("a", "b")
    for i, block in enumerate((slice(0, 30), slice(30, 60))):
        exact = torch.linalg.eigvalsh(H[block, block]).flip(0)[:3]
        assert torch.allclose(res.top[i], exact, rtol=0, atol=1e-12)


def _rotated_blocks(spectra, seed=0):
    """A block-diagonal operator on {"a", "b", ...} whose blocks have these spectra in
    random eigenbases, and the dense blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, lam in spectra.items():
        Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=gen, dtype=DT))
        blocks[name] = (Q * lam) @ Q.T
    like = {name: torch.zeros(len(lam), dtype=DT) for name, lam in spectra.items()}
    return (lambda v: {name: B @ v[name] for name, B in blocks.items()}), like, blocks


@pytest.mark.parametrize("chunk_size", [1, None])
def test_a_repeated_top_eigenvalue_of_a_block_is_found_twice(chunk_size):
    # A single Krylov sequence holds one vector per distinct eigenvalue: the lockstep
    # steps returned a's top two as 2 and 1 (the copy of 2 missed) marked converged;
    # the copy check of thick-restart Lanczos finds the second 2.
    gen = torch.Generator().manual_seed(1)
    a = torch.cat([torch.tensor([2.0, 2.0, 1.0], dtype=DT), 0.5 * torch.rand(17, generator=gen, dtype=DT)])
    b = torch.cat([torch.tensor([3.0, 2.5], dtype=DT), torch.rand(10, generator=gen, dtype=DT)])
    matvec, like, blocks = _rotated_blocks({"a": a, "b": b})
    res = hf.block_spectra(matvec, like, num_probes=4, k=2, tol=1e-8, chunk_size=chunk_size)
    assert res.status == "converged" and bool(res.converged.all())
    for i, name in enumerate(("a", "b")):
        exact = torch.linalg.eigvalsh(blocks[name]).flip(0)[:2]
        assert torch.allclose(res.top[i], exact, rtol=1e-7), (name, res.top[i], exact)
    # without the check the lockstep values stand, and the copy is missed
    unchecked = hf.block_spectra(matvec, like, num_probes=4, k=2, tol=1e-8, chunk_size=chunk_size,
                                 find_copies=False)
    assert unchecked.num_matvecs < res.num_matvecs and "not ruled out" in unchecked.message and not res.message


def test_a_scalar_block_with_more_than_one_eigenvalue_asked_for():
    # b = 3I: its Krylov space is invariant after one step; the lockstep steps went on
    # dividing by β = 0 and raised "the matvec is not symmetric"
    gen = torch.Generator().manual_seed(2)
    matvec, like, blocks = _rotated_blocks({"a": torch.rand(25, generator=gen, dtype=DT), "b": torch.ones(6, dtype=DT)})
    blocks["b"] = 3.0 * torch.eye(6, dtype=DT)  # exactly: a rotated 3I is off by rounding, which hid it
    # lockstep (chunk_size=None with k = 1 or find_copies=False) and Lanczos alone
    for k, chunk_size, find_copies in ((3, 1, True), (3, None, True), (3, None, False), (1, None, True)):
        res = hf.block_spectra(matvec, like, num_probes=4, k=k, tol=1e-8, chunk_size=chunk_size,
                               find_copies=find_copies)
        assert res.status == "converged" and bool(res.converged.all())
        for i, name in enumerate(("a", "b")):
            exact = torch.linalg.eigvalsh(blocks[name]).flip(0)[:k]
            assert torch.allclose(res.top[i], exact, rtol=1e-7), (name, k, chunk_size, find_copies, res.top[i], exact)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_a_group_of_zero_size_leaves_has_no_eigenvalues_and_a_zero_trace(chunk_size):
    # a group of empty leaves (nn.Linear(4, 0)'s parameters): Lanczos on it raised
    # "k must be ... between 1 and the dimension 0, got 0", lockstep an IndexError
    D = torch.tensor([3.0, -1.0, 2.0], dtype=DT)
    like = {"a.w": torch.zeros(3, dtype=DT), "b.w": torch.zeros(0, 4, dtype=DT)}
    matvec = lambda v: {"a.w": D * v["a.w"], "b.w": 2 * v["b.w"]}  # noqa: E731
    for k in (1, 2):
        res = hf.block_spectra(matvec, like, num_probes=4, k=k, chunk_size=chunk_size)
        assert res.status == "converged" and bool(res.converged.all())
        assert torch.equal(res.traces, torch.tensor([4.0, 0.0], dtype=DT)) and res.sizes.tolist() == [3, 0]
        assert torch.allclose(res.top[0], torch.tensor([3.0, 2.0], dtype=DT)[:k]) and torch.isnan(res.top[1]).all()
