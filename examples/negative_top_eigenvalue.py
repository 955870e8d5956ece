"""User story 1: "power iteration on my Hessian converges to a negative value".

Power iteration finds the eigenvalue of largest *magnitude*. A network far from its
targets has strong negative curvature, so on its indefinite Hessian that eigenvalue is
the most negative one: the negative answer is right, it is just not the top of the
spectrum. hvpfunc says which end it computed and gives both ends on request.

Run: python examples/negative_top_eigenvalue.py   (a few seconds on a CPU)
"""

import torch
from torch import nn

import hvpfunc as hf
from hvpfunc.testing import dense_matrix


def main() -> None:
    torch.manual_seed(0)
    n, d, h = 64, 5, 8
    X = torch.randn(n, d, dtype=torch.float64)
    Y = 20.0 + torch.randn(n, 1, dtype=torch.float64)  # targets far from the outputs
    model = nn.Sequential(nn.Linear(d, h), nn.Softplus(), nn.Linear(h, 1)).double()
    with torch.no_grad():
        model[0].weight.mul_(0.1)
        model[2].weight.fill_(1.0)
        model[2].bias.zero_()

    def loss(out, target):
        return 0.5 * ((out - target) ** 2).mean()

    matvec, params = hf.model_hvp_fn(model, loss, (X, Y))
    v0 = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")

    lm = hf.power_iteration(matvec, v0)  # which="LM", the textbook algorithm
    la = hf.power_iteration(matvec, v0, which="LA")
    sa = hf.power_iteration(matvec, v0, which="SA")
    top = hf.lanczos(matvec, v0, k=3, which="LA", tol=1e-10)
    bottom = hf.lanczos(matvec, v0, k=3, which="SA", tol=1e-10)
    exact = torch.linalg.eigvalsh(dense_matrix(matvec, params))

    print(f"model: {sum(p.numel() for p in params.values())} parameters, Hessian via mode={matvec.mode!r}")
    print(f"power iteration, which='LM': {float(lm.eigenvalues[0]):+.6f}  converged={bool(lm.converged[0])}  "
          f"({lm.num_matvecs} products)")
    print("  -> negative because the most negative eigenvalue has the largest magnitude.")
    print(f"power iteration, which='LA': {float(la.eigenvalues[0]):+.6f}  converged={bool(la.converged[0])}  "
          f"({la.num_matvecs} products, spectral shift)")
    print(f"power iteration, which='SA': {float(sa.eigenvalues[0]):+.6f}  converged={bool(sa.converged[0])}")
    print(f"Lanczos top-3:    {[round(float(x), 6) for x in top.eigenvalues]}  ({top.num_matvecs} products)")
    print(f"Lanczos bottom-3: {[round(float(x), 6) for x in bottom.eigenvalues]}  ({bottom.num_matvecs} products)")
    print(f"dense eigvalsh:   top {[round(float(x), 6) for x in exact.flip(0)[:3]]}, "
          f"bottom {[round(float(x), 6) for x in exact[:3]]}")


if __name__ == "__main__":
    main()
