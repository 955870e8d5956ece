"""hvpfunc/_precision.py: what the caller's torch.use_deterministic_algorithms fixes.

Timings and free memory choose the Lanczos basis' growth, chunk_size="auto"'s loop or
vmap on CPUs and mode="auto"'s trace; each changes the products spent and the last bits
of the answer from run to run. Under the flag none of them is consulted."""

import threading
import time

import torch
from references import DT, flat, mlp_loss, random_tree

import hvpfunc as hf


def _clustered():
    # ARPACK's clustered spectrum (README: Lanczos against ARPACK), diagonal
    return torch.cat([torch.tensor([9.0, 8.5, 8.0, 7.0, 6.5, -9.5, -8.7], dtype=DT),
                      torch.linspace(-2.0, 2.0, 293, dtype=DT)])


def test_lanczos_spends_the_same_products_however_fast_the_matvec(deterministic):
    # A product priced as a small network's (2 ms) grows the basis by default (135
    # products with 101 vectors against 210 with 21 for an instant one): the same call
    # gave different counts and last bits run to run. Under the flag it always grows.
    d = _clustered()
    v0 = torch.randn(300, generator=torch.Generator().manual_seed(0), dtype=DT)

    def slow(v):
        time.sleep(2e-3)
        return d * v

    runs = [hf.lanczos(mv, v0, k=5, which="SA", tol=1e-10) for mv in (slow, lambda v: d * v)]
    assert runs[0].num_matvecs == runs[1].num_matvecs and runs[0].basis_size == runs[1].basis_size
    assert torch.equal(runs[0].eigenvalues, runs[1].eigenvalues) and runs[0].basis_size > 21
    torch.testing.assert_close(runs[0].eigenvalues, d.sort().values[:5], rtol=1e-10, atol=0)


def test_concurrent_runs_agree_to_the_last_bit(deterministic):
    # scipy's test_parallel_threads: the second difference matrix, k = 3, threads
    T = (torch.diag(torch.full((50,), -2.0, dtype=DT)) + torch.diag(torch.ones(49, dtype=DT), 1)
         + torch.diag(torch.ones(49, dtype=DT), -1))
    v0 = torch.linspace(0.1, 1.0, 50, dtype=DT)
    results = []

    def worker():
        res = hf.lanczos(lambda v: T @ v, v0, k=3, which="LM", generator=torch.Generator().manual_seed(1))
        results.append((res.eigenvalues, res.num_matvecs))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    worker()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 7
    assert all(torch.equal(values, results[0][0]) and count == results[0][1] for values, count in results)
    exact = torch.linalg.eigvalsh(T)
    torch.testing.assert_close(results[0][0], exact[exact.abs().argsort(descending=True)[:3]])


def test_chunk_size_auto_loops_without_a_timed_trial(deterministic):
    # a fast product on a CPU: the trial would try a vmap of 16 on the first probes
    d = torch.linspace(1.0, 2.0, 40, dtype=DT)
    batched = []

    def matvec(v):
        batched.append(torch._C._functorch.is_batchedtensor(v))
        return d * v

    res = hf.trace(matvec, torch.zeros(40, dtype=DT), num_probes=40, generator=torch.Generator().manual_seed(0))
    assert len(batched) == 40 and not any(batched)
    torch.testing.assert_close(res.estimate, d.sum())  # Rademacher probes of a diagonal: exact


def test_auto_keeps_its_first_mode(deterministic, monkeypatch):
    from hvpfunc._products import auto

    # tracing priced at nothing: without the flag the second product traces (test_hvp)
    monkeypatch.setattr(auto, "_TRACE_COST_IN_BUILDS", 0.0)
    monkeypatch.setattr(auto, "_FIRST_TRACE_IMPORT_SECONDS", 0.0)
    f, params, (x, y) = mlp_loss([4, 8, 1], seed=3)
    mv = hf.hvp_fn(f, params, x, y)
    v = random_tree(params, 1)
    first = flat(mv(v))
    for _ in range(4):
        assert torch.equal(flat(mv(v)), first)
    assert mv.mode == "reverse-over-reverse" and mv.timings == {} and len(mv.switches) == 1
    assert "use_deterministic_algorithms" in mv.switches[0].reason
