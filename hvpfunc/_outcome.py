"""How every solver and estimator ends: its result record and, unless it converged, one
:class:`~hvpfunc.ConvergenceWarning` pointing at the user's call."""

from __future__ import annotations

import warnings
from types import MappingProxyType
from typing import Any, Mapping, Sequence, Tuple, TypeVar

from ._precision import user_stacklevel
from .results import ConvergenceWarning, SolveResult, Status

R = TypeVar("R")


def finish(result: R, solver: str) -> R:
    """``result``, after a warning unless its status is ``"converged"``, pointing at
    the user's call (the first frame outside hvpfunc)."""
    status = Status(result.status)  # type: ignore[attr-defined]
    if status is not Status.CONVERGED:
        warnings.warn(f"{solver} did not converge ({status}): {result.message}", ConvergenceWarning,  # type: ignore[attr-defined]
                      stacklevel=user_stacklevel())
    return result


def finish_all(results: Sequence[SolveResult], solver: str) -> list:
    """The results of several systems, after one warning listing those that did not
    converge (as :func:`finish`)."""
    failed = [(i, r) for i, r in enumerate(results) if r.status is not Status.CONVERGED]
    if failed:
        summary = ", ".join(f"{i}: {r.status}" for i, r in failed[:10])
        more = ", ..." if len(failed) > 10 else ""
        warnings.warn(
            f"{solver}: {len(failed)} of {len(results)} systems did not converge ({summary}{more}); "
            f"each result's message says why",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
    return list(results)


def probes_outcome(finite: bool, used: int, drawn: int, what: str = "the estimate") -> Tuple[Status, str]:
    """The status and message of a stochastic estimator: ``"converged"``, or
    ``"non_finite"`` when a product was nan or inf and only ``used`` of ``drawn`` probes
    before it count."""
    if finite:
        return Status.CONVERGED, ""
    return Status.NON_FINITE, (
        f"a product was not finite (nan or inf): {what} uses the {used} of {drawn} probes before it. "
        f"{Status.NON_FINITE.remedy}"
    )


def solve_result(
    x: Any,
    status: Status,
    message: str = "",
    *,
    num_matvecs: int,
    residual_norm: float,
    stats: Mapping[str, Any] = MappingProxyType({}),
) -> SolveResult:
    """The one constructor of :class:`~hvpfunc.SolveResult`: ``converged`` follows from
    ``status``, and a failure without a specific message carries the status's remedy."""
    status = Status(status)
    if status is not Status.CONVERGED and not message:
        message = status.remedy
    return SolveResult(
        x=x,
        converged=status is Status.CONVERGED,
        status=status,
        num_matvecs=int(num_matvecs),
        residual_norm=float(residual_norm),
        message=message,
        stats=MappingProxyType(dict(stats)),
    )
