import re
import subprocess
import sys

import pytest

from hvpfunc.cli import main

SMALL = ["--hidden", "6", "--depth", "1", "--samples", "96", "--train-steps", "30", "-k", "2",
         "--probes", "12", "--density-probes", "2", "--density-iters", "20", "--no-progress"]


def test_report_on_a_small_model_checks_itself_against_the_dense_hessian(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    assert main(SMALL + ["--output", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "94 parameters" in out  # 10·6 + 6 + 6·4 + 4
    error = float(re.search(r"max \|error\| / ‖H‖ = (\S+)", out).group(1))
    assert error < 1e-8
    for needle in ("top 2:", "bottom 2:", "trace (12 products", "Neumann, α = 1 ", "CG", "spectral density"):
        assert needle in out
    for png in ("density.png", "layers.png"):
        assert (tmp_path / "out" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "![Hessian spectral density" in markdown and "(layers.png)" in markdown


def test_no_plot_and_float32(capsys):
    assert main(SMALL + ["--no-plot", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "plot written" not in out


def test_help_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "hvpfunc", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--output" in done.stdout and "--device" in done.stdout


def test_missing_cuda_is_a_clear_error(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(SMALL + ["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_softmax_null_space_and_k_beyond_the_parameters(capsys):
    # --depth 0 is softmax regression: 11 zero eigenvalues, so the bottom five are all
    # zero (a single Krylov sequence finds one; the report once said "converged 5/5"
    # beside its own dense check's 1e-2 error). -k above the 44 parameters is clamped,
    # and says so.
    args = ["--depth", "0", "--samples", "96", "--train-steps", "30", "--probes", "12",
            "--density-probes", "2", "--density-iters", "20", "--no-progress", "--no-plot"]
    assert main(args + ["-k", "5"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"max \|error\| / ‖H‖ = (\S+)", out).group(1)) < 1e-8
    assert main(args + ["-k", "50"]) == 0
    captured = capsys.readouterr()
    assert "-k 50 is more than the model's 44 parameters" in captured.err
    assert "top 44:" in captured.out


USER_JOB = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(24, 3, dtype=torch.float64), torch.randn(24, 2, dtype=torch.float64)
    return model, nn.MSELoss(), [(x[:16], y[:16]), (x[16:], y[16:])]
'''

FAST = ["-k", "2", "--probes", "40", "--density-probes", "2", "--density-iters", "10", "--no-progress"]


def _user_reference():
    """The dense Hessian of USER_JOB's loss over both batches (mean over all 48 elements),
    from torch.func.hessian on the flattened parameters."""
    import torch

    namespace = {}
    exec(USER_JOB, namespace)
    model, loss_fn, batches = namespace["make"]()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])

    def loss(theta):
        parts, i = {}, 0
        for name, shape in zip(names, shapes):
            parts[name] = theta[i:i + shape.numel()].reshape(shape)
            i += shape.numel()
        return loss_fn(torch.func.functional_call(model, parts, (x,)), y)

    return torch.linalg.eigvalsh(torch.func.hessian(loss)(flat)), torch.func.hessian(loss)(flat)


def test_report_on_the_users_model_from_a_file_with_json_and_markdown(capsys, tmp_path):
    import json

    import torch

    pytest.importorskip("matplotlib")
    job = tmp_path / "my_job.py"
    job.write_text(USER_JOB)
    assert main(["report", "--model", f"{job}:make", "--json", str(tmp_path / "r.json"),
                 "--output", str(tmp_path / "out")] + FAST) == 0
    out = capsys.readouterr().out
    assert "Sequential (training mode), 2 batches" in out and "26 parameters" in out
    results = json.loads((tmp_path / "r.json").read_text())
    exact, H = _user_reference()
    top, bottom = results["eigenvalues"]["top"], results["eigenvalues"]["bottom"]
    assert top["status"] == bottom["status"] == "converged" and all(top["converged"] + bottom["converged"])
    assert torch.allclose(torch.tensor(top["values"], dtype=torch.float64), exact.flip(0)[:2], rtol=1e-7)
    assert torch.allclose(torch.tensor(bottom["values"], dtype=torch.float64), exact[:2], rtol=1e-7, atol=1e-9)
    tr = results["trace"]
    assert abs(tr["estimate"] - float(exact.sum())) < 5 * tr["stderr"]
    layers = {g["group"]: g for g in results["layers"]["groups"]}
    assert sorted(layers) == ["0", "2"] and layers["0"]["parameters"] == 16
    # each layer's top eigenvalue is that of its diagonal block of the dense Hessian
    assert layers["0"]["top"][0] == pytest.approx(float(torch.linalg.eigvalsh(H[:16, :16])[-1]), rel=1e-5)
    assert layers["2"]["top"][0] == pytest.approx(float(torch.linalg.eigvalsh(H[16:, 16:])[-1]), rel=1e-5)
    cg_run = results["inverse"]["runs"][-1]
    assert cg_run["method"] == "CG" and cg_run["status"] == "converged" and cg_run["relative_residual"] < 1e-7
    assert results["density"]["status"] in ("converged", "max_iters") and len(results["density"]["grid"]) > 10
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# hvpfunc report") and "| group | parameters |" in markdown
    assert (tmp_path / "out" / "density.png").exists() and (tmp_path / "out" / "layers.png").exists()


def test_report_on_an_importable_module(capsys, tmp_path, monkeypatch):
    (tmp_path / "userpkg").mkdir()
    (tmp_path / "userpkg" / "__init__.py").write_text("")
    (tmp_path / "userpkg" / "jobs.py").write_text(USER_JOB)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["--model", "userpkg.jobs:make", "--no-plot"] + FAST) == 0
    out = capsys.readouterr().out
    exact, _ = _user_reference()
    assert f"{float(exact[-1]):+.6g}" in out


@pytest.mark.parametrize("body, spec_tail, expected", [
    (USER_JOB, ":nope", "has no 'nope'"),
    (USER_JOB, "", "expects PATH.py:FUNCTION"),
    ("import not_a_module_anywhere\n", ":make", "raised ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
    ("def make():\n    raise ValueError('no checkpoint at /ckpt')\n", ":make",
     "make() raised ValueError: no checkpoint at /ckpt (at "),
    ("def make():\n    return 1, 2\n", ":make", "must return (model, loss_fn, data), it returned a tuple of 2"),
    ("def make():\n    return 'm', print, None\n", ":make", "returned a str as the model"),
    ("import torch\nfrom torch import nn\ndef make():\n    return nn.Linear(3, 2), nn.MSELoss(reduction='none'), "
     "(torch.randn(4, 3), torch.randn(4, 2))\n", ":make", "must be a floating-point scalar, it gave shape (4, 2)"),
    ("import torch\nfrom torch import nn\ndef make():\n    return nn.Linear(3, 2), nn.MSELoss(), "
     "(torch.randn(4, 5), torch.randn(4, 2))\n", ":make", "on the first batch raised RuntimeError"),
    ("import torch\nfrom torch import nn\ndef make():\n    return nn.Sequential(nn.Linear(3, 2), nn.Dropout()), "
     "nn.MSELoss(), (torch.randn(4, 3), torch.randn(4, 2))\n", ":make", "active dropout at '1' (p=0.5)"),
    ("import torch\nfrom torch import nn\ndef make():\n    return nn.Linear(3, 2), nn.MSELoss(), []\n", ":make",
     "data holds no batches"),
])
def test_errors_in_the_users_function_are_one_clear_line(capsys, tmp_path, body, spec_tail, expected):
    job = tmp_path / "job.py"
    job.write_text(body)
    assert main(["report", "--model", f"{job}{spec_tail}", "--no-plot"] + FAST) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hvpfunc: error: ") and "Traceback" not in captured.err
    assert expected in lines[0]


def test_missing_file_and_demo_options_with_a_model(capsys, tmp_path):
    assert main(["--model", str(tmp_path / "absent.py") + ":make"] + FAST) == 2
    assert "no file" in capsys.readouterr().err
    job = tmp_path / "job.py"
    job.write_text(USER_JOB)
    assert main(["--model", f"{job}:make", "--depth", "3"] + FAST) == 2
    assert "--depth is an option of the built-in demo" in capsys.readouterr().err


STREAMED_FLOAT32_JOB = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    return model, nn.CrossEntropyLoss(), DataLoader(TensorDataset(x, y), batch_size=16)
'''


def test_a_float32_model_with_a_data_loader_converges_at_float32_tolerances(capsys, tmp_path):
    # the report's tolerances follow the parameters' precision: CG's 4 eps was below what
    # float32 products allow, and it ended "max_iters" at a 1e-6 residual
    import json

    job = tmp_path / "loader_job.py"
    job.write_text(STREAMED_FLOAT32_JOB)
    assert main(["--model", f"{job}:make", "--no-plot", "--json", str(tmp_path / "r.json")] + FAST) == 0
    assert "streamed batches" in capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["dtype"] == "torch.float32" and results["eigenvalues"]["top"]["tol"] == 1e-4
    assert results["eigenvalues"]["top"]["status"] == "converged"
    assert results["inverse"]["runs"][-1]["status"] == "converged"
    assert results["dense_check"]["max_relative_error"] < 1e-5
