"""Where hvpfunc computes: plain autograd, in the parameters' dtype, whatever the caller's
context (``torch.inference_mode()``, ``torch.autocast``); what the caller's
``torch.use_deterministic_algorithms`` fixes; and where its warnings point."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Any])

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
# the package's folder as imported and as resolved (frames carry the path they were loaded by)
_PACKAGE = tuple({str(Path(__file__).parent) + os.sep, str(Path(__file__).resolve().parent) + os.sep})


@contextlib.contextmanager
def plain_autograd() -> Iterator[None]:
    """Outside inference mode (autograd refuses it) and with any ``torch.autocast``
    switched off, so that products and the solvers' linear algebra run in the
    parameters' dtype, as every tolerance assumes: under CPU bfloat16 autocast, Lanczos
    at tol 1e-6 returned eigenvalues 7e-4 off (bfloat16 products) and, with the
    products fixed, 1e-4 off (its orthogonalization in bfloat16), marked converged. A
    lower precision is had by casting the parameters themselves."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        for device in _AUTOCAST_DEVICES:
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device_type=device, enabled=False))
        yield


def in_plain_autograd(fn: F) -> F:
    """``fn`` run inside :func:`plain_autograd` (a public solver's entry)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plain_autograd():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def deterministic() -> bool:
    """Whether the caller asked PyTorch for deterministic algorithms
    (``torch.use_deterministic_algorithms(True)``, also with ``warn_only``). hvpfunc then
    makes no choice from timings or free memory, each of which changes the products a
    run spends and the last bits of its answer from one run to the next: the Lanczos
    basis grows whenever full up to a share of the device's total memory,
    ``chunk_size="auto"`` computes products one at a time on CPUs, and ``mode="auto"``
    keeps its first mode."""
    return torch.are_deterministic_algorithms_enabled()


def user_stacklevel() -> int:
    """The ``stacklevel`` for a warning issued by this function's caller that points at
    the first frame outside hvpfunc: the user's call, however many of hvpfunc's own
    frames (a solver called by another, a decorator) lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    return level
