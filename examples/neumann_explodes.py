"""User story 2: "my truncated Neumann series for H⁻¹v explodes".

Hyperparameter optimization by implicit differentiation (Lorraine, Vicol & Duvenaud
2020) needs H⁻¹ ∂L_val/∂w. The usual loop `v <- v - H v` is the Neumann series with
step α = 1: it converges only if every eigenvalue of H lies in (0, 2). Here the
training-loss Hessian has eigenvalues above 2, so the terms grow. hvpfunc stops the
series as soon as a term grows, says why, and offers the scaled series and CG; the
hypergradient then drives a step on the weight decay.

Run: python examples/neumann_explodes.py   (a few seconds on a CPU)
"""

import warnings

import torch
from torch import nn

import hvpfunc as hf

DT = torch.float64


def make_problem():
    gen = torch.Generator().manual_seed(0)
    X, Xv = 2.0 * torch.randn(80, 3, generator=gen, dtype=DT), 2.0 * torch.randn(40, 3, generator=gen, dtype=DT)

    def teacher(x):
        return torch.sin(x[:, :1]) + 0.5 * x[:, 1:2] * x[:, 2:3]

    y = teacher(X) + 0.3 * torch.randn(80, 1, generator=gen, dtype=DT)
    yv = teacher(Xv) + 0.3 * torch.randn(40, 1, generator=gen, dtype=DT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).to(DT)

    def inner(w, hp):  # training loss + exp(log_wd)/2 · ‖w‖²
        pred = torch.func.functional_call(model, w, (X,))
        decay = sum((t**2).sum() for t in w.values())
        return ((pred - y) ** 2).mean() + 0.5 * torch.exp(hp["log_wd"]) * decay

    def outer(w, hp):  # validation loss
        return ((torch.func.functional_call(model, w, (Xv,)) - yv) ** 2).mean()

    return model, inner, outer


def train(model, inner, hp, steps=60):
    w = {k: p.detach().clone().requires_grad_() for k, p in model.named_parameters()}
    opt = torch.optim.LBFGS(list(w.values()), lr=1.0, max_iter=steps, tolerance_grad=1e-12,
                            tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = inner(w, hp)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return {k: t.detach() for k, t in w.items()}


def main() -> None:
    model, inner, outer = make_problem()
    hp = {"log_wd": torch.tensor(-2.0, dtype=DT)}
    w = train(model, inner, hp)
    matvec = hf.hvp_fn(inner, w, hp)
    b = torch.func.grad(outer)(w, hp)
    v0 = hf.tree.random_like(w, generator=torch.Generator().manual_seed(0), kind="gaussian")
    top = hf.lanczos(matvec, v0, k=1, which="LA", tol=1e-8)
    bottom = hf.lanczos(matvec, v0, k=1, which="SA", tol=1e-6)
    print(f"training-loss Hessian: λ_max = {float(top.eigenvalues[0]):.4f}, "
          f"λ_min = {float(bottom.eigenvalues[0]):.4g}  ->  α = 1 needs λ_max < 2")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hf.ConvergenceWarning)  # each result says it itself
        naive = hf.neumann(matvec, b, alpha=1.0, num_terms=100)
        scaled = hf.neumann(matvec, b, num_terms=100)
        long = hf.neumann(matvec, b, num_terms=3000)
        solved = hf.cg(matvec, b, tol=1e-8)
    print(f"\nNeumann, α = 1 (v <- v - Hv): status={naive.status} after {naive.num_matvecs} products")
    print(f"  {naive.message}")
    print(f"\nNeumann, α = 1/λ̂_max = {scaled.stats['alpha']:.4f}, 100 terms: status={scaled.status}, "
          f"relative residual {scaled.residual_norm / float(hf.tree.norm(b)):.2e}")
    print(f"Neumann, 3000 terms: status={long.status}, relative residual "
          f"{long.residual_norm / float(hf.tree.norm(b)):.2e}, {long.num_matvecs} products")
    print(f"CG: status={solved.status}, relative residual {solved.residual_norm / float(hf.tree.norm(b)):.2e}, "
          f"{solved.num_matvecs} products")

    print("\nhypergradient steps on log(weight decay), retraining after each:")
    lr = 3.0
    for step in range(4):
        grad_hp, info = hf.hypergradient(inner, outer, w, hp, tol=1e-10)
        print(f"  step {step}: log_wd = {float(hp['log_wd']):+.3f}  validation loss = {float(outer(w, hp)):.5f}  "
              f"d val / d log_wd = {float(grad_hp['log_wd']):+.5f}  (CG {info.status}, {info.num_matvecs} products)")
        hp = {"log_wd": hp["log_wd"] - lr * grad_hp["log_wd"]}
        w = train(model, inner, hp)
    print(f"  final:  log_wd = {float(hp['log_wd']):+.3f}  validation loss = {float(outer(w, hp)):.5f}")


if __name__ == "__main__":
    main()
