"""hvpfunc: second-order questions about a loss, answered with torch.func.

Hessian-vector products on parameter pytrees, the Hessian's extreme eigenvalues, its
trace, diagonal and spectral density, inverse-Hessian-vector products and implicit
hypergradients. A Hessian is a matvec (a function from a pytree to a pytree shaped like
the parameters); every solver is a pure function of a matvec.

The implementation lives in private packages, one per layer: ``_products`` (layer 2),
``_eigen``, ``_stochastic`` and ``_solve`` (layer 3), over ``tree`` (layer 1) and the
shared ``_operator`` and ``_krylov`` kernels. The public namespaces are this package,
``hvpfunc.tree``, ``hvpfunc.results``, ``hvpfunc.testing``, ``hvpfunc.distributed`` and
``hvpfunc.cli``.
"""

from . import tree
from ._eigen.lanczos import lanczos
from ._eigen.power import power_iteration
from ._eigen.tracking import EigenTracker
from ._interop import to_scipy
from ._products.api import Matvec, hvp, hvp_fn
from ._products.model import model_hvp_fn
from ._solve.cg import cg, cg_batched
from ._solve.implicit import hypergradient
from ._solve.minres import minres
from ._solve.neumann import lissa, neumann
from ._stochastic.blocks import block_spectra
from ._stochastic.density import spectral_density
from ._stochastic.trace import diagonal, squared_frobenius_norm, trace
from .results import (
    BlockSpectra,
    ConvergenceWarning,
    DiagonalResult,
    EigResult,
    SolveResult,
    SpectralDensity,
    Status,
    TraceResult,
)

__version__ = "0.1.0"

__all__ = [
    # layer 1: tree linear algebra
    "tree",
    # layer 2: products
    "hvp",
    "hvp_fn",
    "model_hvp_fn",
    "Matvec",
    # layer 3: eigenvalues
    "power_iteration",
    "lanczos",
    "EigenTracker",
    # layer 3: stochastic estimators
    "trace",
    "diagonal",
    "squared_frobenius_norm",
    "spectral_density",
    "block_spectra",
    # layer 3: linear solves and implicit differentiation
    "cg",
    "cg_batched",
    "minres",
    "neumann",
    "lissa",
    "hypergradient",
    # edges
    "to_scipy",
    # results
    "Status",
    "ConvergenceWarning",
    "EigResult",
    "SolveResult",
    "TraceResult",
    "DiagonalResult",
    "SpectralDensity",
    "BlockSpectra",
]
