"""The one rule, fuzzed over small random problems (singular, indefinite, nan-producing,
made in inference mode): every number a solver returns is right against a dense
reference, or the result says it is not (status, converged, one ConvergenceWarning)."""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from references import DT

import hvpfunc as hf


@st.composite
def problems(draw):
    n = draw(st.integers(3, 8))
    eigenvalues = draw(st.lists(st.sampled_from([0.0, 0.0, -2.0, -0.5, 0.1, 0.7, 1.0, 2.5, 4.0]), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2**16))
    nan_after = draw(st.sampled_from([None, None, None, 1, 3]))
    inference = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    H = (Q * torch.tensor(eigenvalues, dtype=DT)) @ Q.T
    H = (H + H.T) / 2
    b = torch.randn(n, generator=gen, dtype=DT)
    if inference:
        with torch.inference_mode():
            H, b = H.clone(), b.clone()
    return H, b, nan_after


def _matvec(H, nan_after):
    calls = {"n": 0}

    def matvec(v):
        calls["n"] += 1
        out = H @ v
        return out * math.nan if nan_after is not None and calls["n"] > nan_after else out

    return matvec


def _run(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    flagged = [w for w in caught if issubclass(w.category, hf.ConvergenceWarning)]
    return result, flagged


@settings(max_examples=40, deadline=None)
@given(problems())
def test_linear_solvers_are_right_or_flagged(problem):
    H, b, nan_after = problem
    for solver in (hf.cg, hf.minres):
        res, flagged = _run(lambda: solver(_matvec(H, nan_after), b, tol=1e-8))
        assert isinstance(res.status, hf.Status) and torch.isfinite(res.x).all()
        assert res.converged == (res.status is hf.Status.CONVERGED) == (not flagged)
        if res.converged:
            assert float((b - H @ res.x).norm()) <= 1.01e-8 * float(b.norm()) + 1e-300
        else:
            assert len(flagged) == 1 and res.message


@settings(max_examples=40, deadline=None)
@given(problems(), st.sampled_from(["LA", "SA", "LM"]))
def test_eigensolvers_are_right_or_flagged(problem, which):
    H, b, nan_after = problem
    exact = torch.linalg.eigvalsh(H)
    want = {"LA": exact[-1], "SA": exact[0], "LM": exact[exact.abs().argmax()]}[which]
    runs = [
        lambda: hf.lanczos(_matvec(H, nan_after), b, k=1, which=which, tol=1e-8),
        lambda: hf.power_iteration(_matvec(H, nan_after), b, which=which, tol=1e-8, max_iters=3000),
    ]
    for run in runs:
        res, flagged = _run(run)
        assert isinstance(res.status, hf.Status)
        assert (res.status is hf.Status.CONVERGED) == (not flagged) and len(flagged) <= 1
        if res.status is hf.Status.CONVERGED:
            assert bool(res.converged.all())
        else:
            assert res.message
        if bool(res.converged[0]):  # a pair marked converged is the wanted one, whatever the run's status
            got = float(res.eigenvalues[0])
            if which == "LM":  # ±λ ties: either sign is a largest-magnitude eigenvalue
                assert abs(abs(got) - abs(float(want))) <= 1e-6 * max(1.0, abs(float(want)))
            else:
                assert abs(got - float(want)) <= 1e-6 * max(1.0, abs(float(want)))


@settings(max_examples=40, deadline=None)
@given(problems(), problems(), st.integers(1, 3), st.sampled_from([1, None]))
def test_block_spectra_top_eigenvalues_are_right_or_flagged(first, second, k, chunk_size):
    # the spectra repeat eigenvalues (drawn from nine values): a block's top k must
    # count a repeated one as often as it occurs
    blocks = {"a": first[0], "b": second[0]}
    like = {name: torch.zeros(len(B), dtype=DT) for name, B in blocks.items()}
    res, flagged = _run(lambda: hf.block_spectra(lambda v: {name: B @ v[name] for name, B in blocks.items()}, like,
                                                 num_probes=4, k=k, tol=1e-8, chunk_size=chunk_size,
                                                 generator=torch.Generator().manual_seed(0)))
    assert (res.status is hf.Status.CONVERGED) == (not flagged)
    for i, B in enumerate(blocks.values()):
        exact = torch.linalg.eigvalsh(B).flip(0)[:k]
        for j, want in enumerate(exact):
            if bool(res.converged[i, j]):
                assert abs(float(res.top[i, j]) - float(want)) <= 1e-6 * max(1.0, float(exact.abs().max()))


@settings(max_examples=60, deadline=None)
@given(problems(), st.sampled_from(["LA", "SA", "LM"]), st.integers(2, 4), st.sampled_from(["residual", "eigenvalue"]),
       st.sampled_from([1, 1, 2]))
def test_several_eigenvalues_are_right_or_flagged(problem, which, k, stop, block_size):
    # repeated eigenvalues (drawn from nine values) are what one Krylov sequence misses:
    # the copy check must find every copy among the k returned
    H, b, nan_after = problem
    n = H.shape[0]
    k = min(k, n)
    if block_size > 1 and (stop == "eigenvalue" or n < k + 3 * block_size):
        block_size = 1
    exact = torch.linalg.eigvalsh(H)
    ordered = {"LA": exact.flip(0), "SA": exact, "LM": exact[exact.abs().argsort(descending=True)]}[which][:k]
    res, flagged = _run(lambda: hf.lanczos(_matvec(H, nan_after), b, k=k, which=which, tol=1e-8, stop=stop,
                                           block_size=block_size))
    assert (res.status is hf.Status.CONVERGED) == (not flagged) and len(flagged) <= 1
    if res.status is hf.Status.CONVERGED:
        atol = 1e-6 * max(1.0, float(exact.abs().max()))
        if which == "LM":  # ±λ ties: either sign is a largest-magnitude eigenvalue
            assert torch.allclose(res.eigenvalues.abs(), ordered.abs(), atol=atol)
        else:
            assert torch.allclose(res.eigenvalues, ordered, atol=atol)
