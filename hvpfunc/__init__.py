"""hvpfunc: second-order questions about a loss, answered with torch.func.

Hessian-vector products on parameter pytrees, the Hessian's extreme eigenvalues, its
trace, diagonal and spectral density, inverse-Hessian-vector products and implicit
hypergradients. A Hessian is a matvec (a function from a pytree to a pytree shaped like
the parameters); every solver is a pure function of a matvec.
"""

from .cg import cg, cg_batched
from .density import spectral_density
from .hvp import Matvec, hvp, hvp_fn
from .implicit import hypergradient
from .interop import to_scipy
from .lanczos import lanczos
from .minres import minres
from .model import model_hvp_fn
from .neumann import lissa, neumann
from .power import power_iteration
from .results import (
    ConvergenceWarning,
    DiagonalResult,
    EigResult,
    SolveResult,
    SpectralDensity,
    TraceResult,
)
from .trace import diagonal, trace

__version__ = "0.1.0"

__all__ = [
    "hvp",
    "hvp_fn",
    "model_hvp_fn",
    "Matvec",
    "power_iteration",
    "lanczos",
    "trace",
    "diagonal",
    "spectral_density",
    "cg",
    "cg_batched",
    "minres",
    "neumann",
    "lissa",
    "hypergradient",
    "to_scipy",
    "ConvergenceWarning",
    "EigResult",
    "SolveResult",
    "TraceResult",
    "DiagonalResult",
    "SpectralDensity",
]
