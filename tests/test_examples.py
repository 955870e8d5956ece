"""The examples' claims, each checked on a small setting against an independent reference
(the examples with real data need scikit-learn: ``pip install -e ".[examples]"``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def examples_path():
    sys.path.insert(0, str(EXAMPLES))
    yield
    sys.path.remove(str(EXAMPLES))


def _flat_hessian(loss, named):
    """Dense Hessian of ``loss(dict)`` in the flattened parameters, by torch.func.hessian."""
    names, shapes = list(named), [t.shape for t in named.values()]
    flat = torch.cat([t.detach().reshape(-1) for t in named.values()])

    def f(theta):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = theta[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss(parts)

    return torch.func.hessian(f)(flat)


@pytest.mark.parametrize("lr, steps", [(1.0, 1000), (0.5, 2000)])
def test_edge_of_stability_sharpness_rises_to_two_over_the_step_and_hovers(examples_path, lr, steps):
    pytest.importorskip("sklearn")
    from edge_of_stability import run

    history = run(lr=lr, steps=steps, num_examples=300, width=16)
    sharpness, threshold = history["sharpness"], 2 / lr
    late = sharpness[len(sharpness) * 2 // 3:]
    assert sharpness[0] < 0.7 * threshold  # progressive sharpening from well below 2/η ...
    assert 0.95 * threshold < sum(late) / len(late) < 1.15 * threshold  # ... to 2/η, where it stays
    assert max(late) < 1.2 * threshold
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    # the tracked value is the top eigenvalue of the dense Hessian at the last step
    model, (x, y) = history["model"], history["data"]
    H = _flat_hessian(lambda p: torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x,)), y),
                      dict(model.named_parameters()))
    assert sharpness[-1] == pytest.approx(float(torch.linalg.eigvalsh(H.double())[-1]), rel=1e-4)


def test_hypergradient_neumann_explodes_unscaled_converges_scaled_and_tuning_helps(examples_path):
    pytest.importorskip("sklearn")
    from hypergradient_digits import run

    out = run(steps=6)
    w0, hp0, inner, outer = out["w0"], out["hp0"], out["inner"], out["outer"]
    # the premise: the training-loss Hessian has an eigenvalue above 2 (dense reference)
    H = _flat_hessian(lambda w: inner(w, hp0), w0)
    assert out["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(H)[-1]), rel=1e-8)
    assert out["lambda_max"] > 2
    # the exact hypergradient: ∂²L_in/∂λ_ij∂W_ij = exp(λ_ij) W_ij, so dL_val/dλ = −exp(λ) ⊙ W ⊙ (H⁻¹∇_w L_val)_W
    g = torch.func.grad(outer)(w0, hp0)
    x = torch.linalg.solve(H, torch.cat([g["W"].reshape(-1), g["b"]]))
    exact = -torch.exp(hp0["W"]) * w0["W"] * x[:640].reshape(64, 10)
    first = out["first"]
    grad_cg, res_cg = first["cg"]
    assert res_cg.status == "converged" and torch.allclose(grad_cg["W"], exact, rtol=1e-6, atol=1e-12)
    assert first["neumann, α = 1"][1].status == "diverged"
    scaled = first["neumann, α = 1/λ̂_max"][0]["W"]
    assert float((scaled * exact).sum() / (scaled.norm() * exact.norm())) > 0.99
    for solver in ("cg", "neumann"):
        history = out[solver]
        assert history["val_loss"][-1] < 0.85 * history["val_loss"][0]
        assert history["test_accuracy"][-1] > history["test_accuracy"][0] + 0.03


def _run(script):
    done = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_user_story_1_power_iteration_says_which_end_it_found():
    out = _run("negative_top_eigenvalue.py")
    number = lambda pattern: float(re.search(pattern, out).group(1))  # noqa: E731
    top, bottom = number(r"dense eigvalsh: +top \[([-+.\d]+)"), number(r"bottom \[([-+.\d]+)")
    assert bottom < 0 < top < -bottom
    assert number(r"which='LM': ([-+.\d]+)") == pytest.approx(bottom, abs=1e-6)  # the largest magnitude
    assert number(r"which='LA': ([-+.\d]+)") == pytest.approx(top, abs=1e-6)
    assert number(r"which='SA': ([-+.\d]+)") == pytest.approx(bottom, abs=1e-6)


def test_user_story_2_the_neumann_series_explodes_and_is_stopped():
    out = _run("neumann_explodes.py")
    assert re.search(r"λ_max = (\S+),", out) and float(re.search(r"λ_max = (\S+),", out).group(1)) > 2
    assert "α = 1 (v <- v - Hv): status=diverged" in out
    assert re.search(r"CG: status=converged", out)
    losses = [float(v) for v in re.findall(r"validation loss = (\S+)", out)]
    assert losses[-1] < losses[0]
