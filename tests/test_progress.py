import torch
from references import DT, random_tree, spectrum_operator

import hvpfunc as hf


def test_progress_in_a_log_is_plain_lines_not_a_bar(capsys):
    # stderr is captured (not a terminal): no tqdm bar with its carriage returns
    matvec, like, _ = spectrum_operator(torch.linspace(1.0, 2.0, 30, dtype=DT).tolist())
    hf.lanczos(matvec, random_tree(like, 0), k=2, progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.startswith("lanczos (k=2, LA): step 1 ")


def test_a_progress_callable_sees_every_step():
    matvec, like, _ = spectrum_operator(torch.linspace(1.0, 2.0, 30, dtype=DT).tolist())
    steps = []
    res = hf.lanczos(matvec, random_tree(like, 0), k=1, progress=lambda step, residual: steps.append(step))
    assert steps == list(range(1, res.num_matvecs + 1))


def test_the_diagonal_and_frobenius_estimators_report_their_products():
    matvec, like, _ = spectrum_operator(torch.linspace(1.0, 2.0, 30, dtype=DT).tolist())
    runs = {
        "hutchinson": lambda p: hf.diagonal(matvec, like, num_probes=6, chunk_size=4, progress=p),
        "xdiag": lambda p: hf.diagonal(matvec, like, num_probes=8, method="xdiag", progress=p),
        "frobenius": lambda p: hf.squared_frobenius_norm(matvec, like, num_probes=6, chunk_size=4, progress=p),
    }
    for name, run in runs.items():
        steps = []
        res = run(lambda step, *values: steps.append(step))
        assert steps and steps[-1] == res.num_matvecs, (name, steps, res.num_matvecs)
