"""Edge of stability (Cohen, Kaur, Li, Kolter & Talwalkar, ICLR 2021), on real data.

Gradient descent with step η on a quadratic diverges along any direction whose curvature
exceeds 2/η. Cohen et al. found that full-batch gradient descent on a neural network
does not stay away from that threshold: the top eigenvalue of the training loss's
Hessian (the *sharpness*) rises during training ("progressive sharpening") until it
reaches 2/η, then hovers there while the loss keeps decreasing, non-monotonically.

This script trains an MLP on scikit-learn's digits (shipped with the package: nothing is
downloaded) by full-batch gradient descent with mean-squared error on one-hot targets,
as in the paper, and follows the sharpness with :class:`hvpfunc.EigenTracker` (for one
eigenvalue each Lanczos run starts from a random vector: a warm start from the previous
eigenvector would miss an eigenvalue that overtook it, and checking costs more).

Run: pip install -e ".[examples]" && python examples/edge_of_stability.py [--plot eos.png]
(about 10 s on a CPU).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Dict

import torch
from torch import nn

import hvpfunc as hf


def digits(num_examples: int) -> tuple:
    """The first ``num_examples`` digits, pixels scaled to [0, 1], one-hot targets."""
    from sklearn.datasets import load_digits

    x, labels = load_digits(return_X_y=True)
    x = torch.tensor(x[:num_examples] / 16.0, dtype=torch.float32)
    return x, nn.functional.one_hot(torch.tensor(labels[:num_examples]), 10).float()


def run(*, lr: float = 0.5, steps: int = 3000, every: int = 50, num_examples: int = 500, width: int = 64,
        seed: int = 0) -> Dict[str, Any]:
    """Full-batch gradient descent with step ``lr``; every ``every`` steps the training
    loss and the sharpness (top Hessian eigenvalue, relative residual 1e-3).

    Returns a dict of lists: ``step``, ``loss``, ``sharpness``, ``products`` (Hessian
    products each sharpness cost), the tracker under ``"tracker"`` and the trained
    ``"model"`` with its ``"data"``.
    """
    x, y = digits(num_examples)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    loss_fn = nn.MSELoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = hf.EigenTracker(k=1, tol=1e-3, generator=torch.Generator().manual_seed(seed))
    history: Dict[str, Any] = {"step": [], "loss": [], "sharpness": [], "products": [], "tracker": tracker,
                               "model": model, "data": (x, y)}
    for step in range(steps + 1):
        if step % every == 0:
            matvec, params = hf.model_hvp_fn(model, loss_fn, (x, y))
            with warnings.catch_warnings():
                warnings.simplefilter("error", hf.ConvergenceWarning)  # an unconverged sharpness is a failure here
                result = tracker.update(matvec, params, step=step)
            with torch.no_grad():
                history["loss"].append(float(loss_fn(model(x), y)))
            history["step"].append(step)
            history["sharpness"].append(float(result.eigenvalues[0]))
            history["products"].append(result.num_matvecs)
        if step == steps:
            break
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=0.5, help="gradient descent's step η (default 0.5)")
    parser.add_argument("--steps", type=int, default=3000, help="gradient descent steps (default 3000)")
    parser.add_argument("--plot", help="write the sharpness-against-steps figure here (needs matplotlib)")
    args = parser.parse_args()
    history = run(lr=args.lr, steps=args.steps)
    threshold = 2 / args.lr
    print(f"full-batch gradient descent, η = {args.lr}: 2/η = {threshold:.3g}")
    print(f"{'step':>6} {'loss':>8} {'sharpness':>10} {'products':>9}")
    for step, loss, sharp, products in zip(history["step"], history["loss"], history["sharpness"],
                                           history["products"]):
        print(f"{step:>6} {loss:>8.4f} {sharp:>10.3f} {products:>9}")
    late = history["sharpness"][len(history["sharpness"]) * 2 // 3:]
    print(f"sharpness: {history['sharpness'][0]:.3g} at the start, {sum(late) / len(late):.3g} on average over the "
          f"last third of training ({min(late):.3g} to {max(late):.3g}); 2/η = {threshold:.3g}")
    print(f"Hessian products for {len(history['step'])} sharpness values: {sum(history['products'])}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        fig = history["tracker"].plot()
        ax = fig.axes[0]
        ax.axhline(threshold, color="black", linestyle="--", label="2/η")
        ax.set_title(f"edge of stability: MLP on digits, gradient descent with η = {args.lr}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure written to {args.plot}")


if __name__ == "__main__":
    main()
