"""The benchmark suite runs end to end on tiny models (peers included where installed),
so that it cannot rot between the runs that produce the README's tables."""

import statistics
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from references import DTENSOR_SECOND_DERIVATIVE, NEEDS_EXACT_SHARDED_PRODUCTS

from benchmarks import choices, estimators, jobs, products, sharded, solvers
from benchmarks.models import build


@pytest.mark.slow
def test_product_tables_on_tiny_models():
    text = products.run(build("tiny", torch.device("cpu")), torch.device("cpu"), vectors=4)
    for name in ("MLP", "CNN", "transformer"):
        assert f"### {name}" in text
    assert "hvpfunc auto (chose" in text and "4 vectors: hvpfunc vmap(auto)" in text
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| construction: hvpfunc")]
    assert len(rows) == 3 and all(float(r[2].strip().rstrip("×")) > 0 for r in rows)


@pytest.mark.slow
def test_choice_tables_on_a_tiny_mlp():
    models = {"MLP": build("tiny", torch.device("cpu"))["MLP"]}
    text = choices.run(models, torch.device("cpu"), tiny=True)
    for title in ("mode='auto' against", "chunk_size", "Block Lanczos", "SLQ grouping", "Recurrent layers",
                  "Mixed precision"):
        assert f"### {title}" in text
    def rows(section: str) -> dict:
        body = text.split(f"### {section}")[1].split("\n### ")[0]
        return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
                for line in body.splitlines() if line.startswith("| ")}

    auto = rows("mode='auto' against")["auto"]
    assert auto[-1].startswith("ends in ") and float(auto[1].rstrip("×")) >= 1.0
    # every block size answers the same top eigenvalue, converged
    blocks = rows("Block Lanczos")
    assert [blocks[b][2] for b in ("1", "4", "8")] == ["CONVERGED"] * 3
    assert len({blocks[b][3] for b in ("1", "4", "8")}) == 1
    assert float(rows("chunk_size")["16"][0]) > 0
    assert float(rows("Recurrent layers")["product, mode='auto'"][0]) > 0


@pytest.mark.slow
def test_solver_tables_on_a_tiny_network():
    text = solvers.run(torch.device("cpu"), tiny=True)
    assert "hvpfunc lanczos(k=5, tol=1e-6)" in text and "hvpfunc trace('hutch++', 100 probes)" in text
    assert "scipy eigsh (ARPACK)" in text
    assert "hvpfunc minres (damping 1, up to 100 iterations)" in text and "outside them" in text


def test_time_outside_the_products_is_what_the_solve_spends_around_them():
    import time

    from benchmarks.harness import outside_products

    def matvec(v):
        time.sleep(0.01)
        return v

    def solve(mv):
        time.sleep(0.005)  # the solver's own work
        return [mv(i) for i in range(3)]

    result, total, outside = outside_products(solve, matvec, torch.device("cpu"), runs=3)
    assert result == [0, 1, 2]
    assert outside >= 0.005 and total - outside >= 0.03  # sleeps overshoot, never undershoot


@pytest.mark.slow
def test_job_tables_on_tiny_models():
    text = jobs.run(torch.device("cpu"), tiny=True)
    for name in ("MLP", "ResNet-style CNN", "transformer"):
        assert f"### {name}" in text
    for how in ("hvpfunc lanczos(k=1", "hvpfunc trace(100 probes)", "hvpfunc lanczos(k=5", "hvpfunc spectral_density",
                "hvpfunc hypergradient(solver='cg'), defaults (converged)"):
        assert how in text
    assert "(max of 5)" in text  # a top-5 job's error is its worst value's
    # the first-answer table: a fresh process per job, its top eigenvalue against the reference
    first = text.split("### First answer", 1)[1].split("###", 1)[0]
    rows = [line.split("|")[1:-1] for line in first.splitlines() if line.startswith("| ") and "model" not in line]
    assert [r[0].strip() for r in rows] == ["MLP", "ResNet-style CNN (BatchNorm, eval)", "transformer"]
    assert all(float(r[3]) < 1e-2 for r in rows)


@pytest.mark.slow
def test_estimator_tables_run():
    pytest.importorskip("scipy")
    text = estimators.run(tiny=True)
    assert "scipy eigsh (ARPACK), ncv=20" in text and "hvpfunc trace('xtrace')" in text
    assert "hvpfunc diagonal('xdiag')" in text


@pytest.mark.slow
@pytest.mark.skipif(not DTENSOR_SECOND_DERIVATIVE, reason=NEEDS_EXACT_SHARDED_PRODUCTS)
def test_sharded_memory_table_on_a_tiny_model():
    text = sharded.run(tiny=True)
    for how in ("training gradient", "exact product", "gradient-difference product", "Lanczos basis"):
        assert how in text


def test_pyhessian_accuracy_is_its_best_error_rounded_down(monkeypatch):
    # the matched-accuracy row asks hvpfunc for the smallest error PyHessian reached,
    # rounded down to a power of ten; a PyHessian that fails gives no row
    values = iter([1.023, 0.9991, 1.034])
    monkeypatch.setattr(jobs, "_pyhessian_counted", lambda fn: lambda: (fn(), 0))
    monkeypatch.setattr(jobs, "pyhessian_top", lambda model, x, y, seed=None: [next(values)])
    assert jobs._pyhessian_accuracy(None, None, None, 1.0, seeds=3) == pytest.approx(1e-4)  # 9e-4, not 2e-2

    def fails(model, x, y, seed=None):
        raise RuntimeError("derivative for aten::_scaled_dot_product_flash_attention not implemented")

    monkeypatch.setattr(jobs, "pyhessian_top", fails)
    assert jobs._pyhessian_accuracy(None, None, None, 1.0, seeds=3) is None


def test_paired_rows_seed_both_libraries_with_the_round_and_report_median_products():
    # PyHessian's start vector comes from the global generator: unseeded, its products
    # (and so the paired ratio) depended on whatever ran before in the process
    seen = {"ours": [], "theirs": []}

    class Result:
        def __init__(self, n):
            self.num_matvecs = n

    def ours(seed):
        seen["ours"].append(seed)
        return Result(10 + seed)

    def theirs(seed):
        seen["theirs"].append(seed)
        return None, 20 + 2 * seed

    rows = []
    jobs._versus(rows, "job", ours, "ours", lambda r: "-", theirs, "theirs", lambda r: "-", torch.device("cpu"))
    rounds = list(range(jobs._ROUNDS_SHORT + 1))  # a warm-up round, then the timed ones
    assert seen["ours"] == seen["theirs"] == rounds
    timed = rounds[1:]
    assert rows[0][3] == f"{statistics.median(10 + s for s in timed):g}"
    assert rows[1][3] == f"{statistics.median(20 + 2 * s for s in timed):g}"
    assert "per product" in rows[0][5]  # counts differ: the ratio per product, round by round
