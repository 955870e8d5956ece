"""Type aliases shared by every layer: one ``Tree``, and the option literals."""

from __future__ import annotations

from typing import Any, Callable, Literal, Union

Tree = Any
"""A pytree of tensors (dicts, lists, tuples, namedtuples; ``torch.utils._pytree`` decides)."""

MatvecFn = Callable[[Tree], Tree]
"""``v -> H v`` on trees shaped like the parameters."""

Mode = Literal[
    "auto",
    "forward-over-reverse",
    "reverse-over-reverse",
    "reverse-over-reverse-recomputed",
    "linearize",
    "compiled",
    "gradient-difference",
]
Which = Literal["LM", "LA", "SA"]
TraceMethod = Literal["auto", "hutchinson", "hutch++", "xtrace"]
DiagonalMethod = Literal["hutchinson", "xdiag"]
Solver = Literal["cg", "minres", "neumann"]
ChunkSize = Union[int, None, Literal["auto"]]
ProgressArg = Union[bool, Callable[..., Any]]
