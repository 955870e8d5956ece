"""The small projected eigenproblems of the Krylov solvers, and which Ritz values they want."""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch


# The projected eigenproblems go through torch's LAPACK, which shares torch's thread pool:
# numpy's OpenBLAS threads, idling in spin-waits after each call, took the cores from
# torch's products (a 3,922-parameter MLP's Lanczos ran 3x slower: 0.71 s against 0.25 s).
def eigh(T: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    theta, Y = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(T)))
    return theta.numpy(), Y.numpy()


def eigvalsh(T: np.ndarray) -> np.ndarray:
    return torch.linalg.eigvalsh(torch.from_numpy(np.ascontiguousarray(T))).numpy()


def select(theta: np.ndarray, which: str, count: int) -> np.ndarray:
    """Indices of the ``count`` Ritz values ``which`` prefers, in its order."""
    key = {"LA": -theta, "SA": theta, "LM": -np.abs(theta)}[which]
    return np.argsort(key, kind="stable")[:count]


