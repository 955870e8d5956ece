import pytest
import torch
from references import DT, spectrum_operator

import hvpfunc as hf


def _two_clusters():
    lam = [1.0] * 20 + [5.0] * 20
    return spectrum_operator(lam, seed=2)


def test_density_integrates_to_one_and_has_the_spectrum_mean():
    lam = torch.linspace(-2.0, 8.0, 50, dtype=DT).tolist()
    matvec, like, H = spectrum_operator(lam)
    sd = hf.spectral_density(matvec, like, num_probes=40, num_iters=20, generator=torch.Generator().manual_seed(0))
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(sd.weights.sum(dim=1), torch.ones(40, dtype=DT))
    mean = float(torch.trapezoid(sd.grid * sd.density, sd.grid))
    assert mean == pytest.approx(float(torch.trace(H)) / 50, abs=0.3)
    assert sd.nodes.shape == (40, 20) and sd.num_matvecs == 40 * 20


def test_mass_of_two_clusters():
    matvec, like, _ = _two_clusters()
    sd = hf.spectral_density(matvec, like, num_probes=30, num_iters=10, generator=torch.Generator().manual_seed(1))
    low = sd.grid < 3.0
    mass_low = float(torch.trapezoid(sd.density * low, sd.grid))
    assert mass_low == pytest.approx(0.5, abs=0.1)
    # quadrature nodes with weight sit on the two eigenvalues (the Krylov space is 2-dim)
    heavy = sd.nodes[sd.weights > 1e-8]
    assert torch.all(((heavy - 1.0).abs() < 1e-8) | ((heavy - 5.0).abs() < 1e-8))


def test_extreme_nodes_match_extreme_eigenvalues():
    lam = [-3.0] + torch.linspace(0.0, 1.0, 40, dtype=DT).tolist() + [10.0]
    matvec, like, H = spectrum_operator(lam)
    sd = hf.spectral_density(matvec, like, num_probes=3, num_iters=30, generator=torch.Generator().manual_seed(2))
    assert float(sd.nodes.max()) == pytest.approx(10.0, rel=1e-8)
    assert float(sd.nodes.min()) == pytest.approx(-3.0, rel=1e-8)
    assert float(sd.grid[0]) < -3.0 and float(sd.grid[-1]) > 10.0


def test_same_generator_same_density_whatever_the_chunking():
    matvec, like, _ = _two_clusters()
    a = hf.spectral_density(matvec, like, num_probes=4, num_iters=8, chunk_size=1, generator=torch.Generator().manual_seed(3))
    b = hf.spectral_density(matvec, like, num_probes=4, num_iters=8, chunk_size=None, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(a.density, b.density, rtol=1e-8, atol=1e-12)


def test_sigma_default_and_explicit():
    matvec, like, _ = _two_clusters()
    sd = hf.spectral_density(matvec, like, num_probes=2, num_iters=5, generator=torch.Generator().manual_seed(0))
    assert sd.sigma == pytest.approx((1e-5 * 4.0) ** 0.5, rel=1e-6)
    sd2 = hf.spectral_density(matvec, like, num_probes=2, num_iters=5, sigma=0.5, generator=torch.Generator().manual_seed(0))
    assert sd2.sigma == 0.5
    with pytest.raises(ValueError, match="sigma must be positive"):
        hf.spectral_density(matvec, like, sigma=0.0)
    with pytest.raises(ValueError, match="num_iters must be at least 1"):
        hf.spectral_density(matvec, like, num_iters=0)


def test_plot_returns_a_figure():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    matvec, like, _ = _two_clusters()
    sd = hf.spectral_density(matvec, like, num_probes=2, num_iters=5, generator=torch.Generator().manual_seed(0))
    fig = sd.plot()
    assert fig.axes[0].get_xlabel() == "eigenvalue"


def test_float32_runs_longer_than_convergence_keep_one_node_per_outlier():
    # Lanczos without reorthogonalization produces ghost copies of converged outliers
    # (float32, 150 steps: the outliers converge in a few dozen); the full
    # reorthogonalization each step (three-term step, then one Gram–Schmidt pass) keeps
    # one node per eigenvalue, and the quadrature's weights where the probe put them
    d = torch.cat([torch.tensor([10.0, 9.0, 8.0]), torch.linspace(0.0, 1.0, 397)])
    sd = hf.spectral_density(lambda v: d * v, torch.zeros(400), num_probes=2, num_iters=150,
                             generator=torch.Generator().manual_seed(0))
    for nodes, weights in zip(sd.nodes, sd.weights):
        for outlier in (10.0, 9.0, 8.0):
            near = (nodes - outlier).abs() < 1e-3
            assert int(near.sum()) == 1, (outlier, nodes[near])
            # a Rademacher probe puts 1/400 of its mass on each coordinate
            assert float(weights[near].sum()) == pytest.approx(1 / 400, rel=1e-3)
