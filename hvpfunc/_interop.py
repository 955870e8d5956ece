"""Bridges to other libraries' operator types."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._operator import Operator
from ._types import MatvecFn, Tree


def to_scipy(matvec: MatvecFn, like: Tree) -> Any:
    """A ``scipy.sparse.linalg.LinearOperator`` of shape (n, n) for a tree matvec.

    The operator takes and returns float64 NumPy vectors of length n (the tree's total
    size, leaves in ``torch.utils._pytree`` order); inside, each vector is unflattened
    into a tree on the parameters' device and dtype. Use it to cross-check hvpfunc
    against ARPACK (``scipy.sparse.linalg.eigsh``) or to run MINRES on an indefinite
    Hessian. ``rmatvec`` is the matvec itself (H is symmetric), and ``matmat`` sends
    all columns through ``torch.func.vmap``.

    Args:
        matvec: ``v -> H v`` on trees shaped like ``like``.
        like: a tree giving the vectors' structure (the params).

    Returns:
        ``scipy.sparse.linalg.LinearOperator`` with dtype float64.

    Raises:
        ImportError: scipy is not installed.

    Example:
        >>> import torch, hvpfunc as hf
        >>> from scipy.sparse.linalg import eigsh
        >>> H = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> A = hf.to_scipy(lambda v: {"w": H @ v["w"]}, {"w": torch.zeros(10, dtype=torch.float64)})
        >>> A.shape, eigsh(A, k=2, which="LA", tol=1e-10)[0].round(8).tolist()
        ((10, 10), [9.0, 10.0])
    """
    try:
        from scipy.sparse.linalg import LinearOperator
    except ImportError as err:
        raise ImportError("to_scipy needs scipy: pip install scipy") from err
    op = Operator(matvec, like, name="like")

    def apply(x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(-1))
        out = op(v.to(op.device, op.dtype))
        return out.detach().to("cpu", torch.float64).numpy()

    def apply_many(X: np.ndarray) -> np.ndarray:
        V = torch.as_tensor(np.asarray(X, dtype=np.float64)).T.to(op.device, op.dtype)
        out = op.batch(V.contiguous(), chunk_size=None)
        return out.detach().to("cpu", torch.float64).numpy().T

    return LinearOperator(
        (op.n, op.n), matvec=apply, rmatvec=apply, matmat=apply_many, dtype=np.float64
    )
