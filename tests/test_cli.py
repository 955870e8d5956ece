import re
import subprocess
import sys

import pytest

from hvpfunc.cli import main

SMALL = ["--hidden", "6", "--depth", "1", "--samples", "96", "--train-steps", "30", "-k", "2",
         "--probes", "12", "--density-probes", "2", "--density-iters", "20", "--no-progress"]


def test_report_on_a_small_model_checks_itself_against_the_dense_hessian(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out_png = tmp_path / "density.png"
    assert main(SMALL + ["--output", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "94 parameters" in out  # 10·6 + 6 + 6·4 + 4
    error = float(re.search(r"max \|error\| / ‖H‖ = (\S+)", out).group(1))
    assert error < 1e-8
    for needle in ("top 2:", "bottom 2:", "trace (Hutch++", "Neumann, α = 1 ", "CG", "spectral density"):
        assert needle in out
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


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
