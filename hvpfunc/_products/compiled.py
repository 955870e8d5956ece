"""``mode="compiled"``: ``torch.compile`` of the product that stores nothing, checked
against the eager product before it is trusted."""

from __future__ import annotations

import types
from typing import Callable, Optional

import torch
from torch import Tensor

from .._types import MatvecFn, Tree
from ..tree import norm, random_like, sub
from .checks import Inspection, agreement, memory_light_mode


class CompiledProduct:
    """``(p, v, args, kwargs) -> H(p) v`` compiled once for f, shared by the matvecs of
    several points or batches of f (``model_hvp_fn`` builds one per batch): their
    arguments are the compiled graph's inputs, so a new batch of the same shape reuses
    the graph instead of compiling again."""

    def __init__(self, f: Callable[..., Tensor], params: Tree, args: tuple, kwargs: dict,
                 inspection: Optional[Inspection] = None):
        grad_f = torch.func.grad(f)
        if memory_light_mode(f, params, args, kwargs, inspection) == "forward-over-reverse":
            def product(p, v, args, kwargs):
                return torch.func.jvp(lambda q: grad_f(q, *args, **kwargs), (p,), (v,))[1]
        else:
            def product(p, v, args, kwargs):
                return torch.func.vjp(lambda q: grad_f(q, *args, **kwargs), p)[1](v)[0]
        self.eager = product
        self.compiled = torch.compile(_own_code(product))

    def matvec(self, params: Tree, args: tuple, kwargs: dict) -> MatvecFn:
        """The matvec at one point, after one compiled product there agreed with the eager one."""
        probe = random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
        hooks_were_enabled = _saved_tensor_hooks_enabled()
        try:
            got = self.compiled(params, probe, args, kwargs)
        except Exception as err:  # Dynamo and Inductor raise many types; all mean "cannot compile"
            if hooks_were_enabled and not _saved_tensor_hooks_enabled():
                # A failed compile of torch.func over saved-tensor hooks (activation
                # checkpointing, use_reentrant=False; torch 2.13) leaves them disabled
                # for the whole process: every later product through a checkpoint
                # raised "torch.func... don't yet support saved tensor hooks".
                torch._C._autograd._saved_tensors_hooks_enable()
            raise RuntimeError(
                f"mode='compiled': torch.compile could not compile the product "
                f"({type(err).__name__}: {_first_line(err)}). Use mode='auto', or "
                "mode='forward-over-reverse' for the same product uncompiled."
            ) from err
        try:
            want = self.eager(params, probe, args, kwargs)
        except Exception as err:
            # torch 2.11 compiles torch.func over activation checkpointing, which the
            # eager product it is checked against cannot run ("torch.func... don't yet
            # support saved tensor hooks"): unchecked, the compiled product is not trusted
            raise RuntimeError(
                f"mode='compiled': the eager product that checks the compiled one failed "
                f"({type(err).__name__}: {_first_line(err)}). Use mode='auto'."
            ) from err
        # Compiled kernels fuse and reorder reductions, so the last bits differ; a wrong
        # compiled graph is off by far more than the square root of the rounding unit.
        error, size = norm(sub(got, want)), norm(want)
        if not bool(error <= agreement(params) * size):
            raise RuntimeError(
                f"mode='compiled': the compiled product disagrees with the eager one (relative "
                f"error {float(error / size):.2e} on a random vector); torch.compile "
                "miscompiled f. Use mode='auto' or mode='forward-over-reverse'."
            )
        eager, compiled = self.eager, self.compiled

        def matvec(v: Tree) -> Tree:
            if torch._C._functorch.peek_interpreter_stack() is not None:
                return eager(params, v, args, kwargs)
            return compiled(params, v, args, kwargs)

        return matvec


def compiled_matvec(f, params, args, kwargs, cache: Optional[dict] = None, inspection: Optional[Inspection] = None):
    cache = {} if cache is None else cache
    if "compiled" not in cache:
        cache["compiled"] = CompiledProduct(f, params, args, kwargs, inspection)
    return cache["compiled"].matvec(params, args, kwargs)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, and counts
    recompilations, per code object: matvecs compiled from one definition would share
    its 8 cache slots, and from the ninth on run eagerly with only a logged warning."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _saved_tensor_hooks_enabled() -> bool:
    """Whether saved-tensor hooks are enabled (True where torch does not say)."""
    check = getattr(torch._C._autograd, "_saved_tensors_hooks_is_enabled", None)
    return True if check is None else bool(check())
