"""What must hold before a product mode is trusted: f is finite and deterministic at the
point, its operations are none that make a mode crash, and a stored or traced product
replays bit for bit and agrees with an independent mode."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, FrozenSet, Iterator, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .._types import MatvecFn, Tree
from ..tree import norm, random_like, sub
from .modes import differentiable_kernels, forward_over_reverse, is_forward_ad_gap, scalar_fn

# Operations for which torch.func.linearize takes the process down (segmentation fault in
# torch 2.13; every reduction of aten.mse_loss, found by tracing each torch.nn loss in a
# subprocess): they are detected from the operations f dispatches, never by trying.
_LINEARIZE_CRASHES = frozenset({"aten::mse_loss"})


# Namespaces of the fused attention kernels of third-party packages (flash-attn 2 and 3,
# xFormers), registered as torch operators: they have a backward but neither a double
# backward nor forward-mode AD, and unlike torch's scaled_dot_product_attention there is
# no math kernel to route them to.
_FUSED_ATTENTION = ("flash_attn", "flash_attn_3", "xformers", "xformers_flash", "xformers_flash3")

FUSED_ATTENTION_REMEDY = (
    "Switch the model to PyTorch's attention, which hvpfunc reroutes through its math kernel "
    "(Hugging Face: from_pretrained(..., attn_implementation='sdpa') or 'eager'; flash_attn or "
    "xFormers modules: torch.nn.functional.scaled_dot_product_attention), or use "
    "model_hvp_fn(..., mode='gradient-difference'), whose products need only the module's own backward."
)


class _OpRecorder(TorchDispatchMode):
    """Records the names of the ATen operations dispatched while it is active, and the
    uses that make forward-mode products wrong."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch wraps a dispatch mode's __torch_dispatch__ in torch._disable_dynamo, whose
        # first call imports torch._dynamo: 0.55 s of every process's first matvec, for
        # a mode that never runs under torch.compile (it records f's eager operations)
        return False

    def __init__(self) -> None:
        super().__init__()
        self.names: set = set()
        self.forward_wrong: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.names.add(name)
        if name == "aten::embedding":
            padding_idx = args[2] if len(args) > 2 else (kwargs or {}).get("padding_idx", -1)
            if padding_idx is not None and padding_idx >= 0:
                # The gradient of embedding(padding_idx=i) leaves row i out, but the forward
                # pass reads it: the Jacobian of that gradient is not symmetric, so
                # forward-over-reverse computes another matrix (measured: 3% to 30% off).
                self.forward_wrong.add("aten::embedding with padding_idx (its masked gradient)")
        return func(*args, **(kwargs or {}))


class Inspection:
    """What one look at f told: the operations it dispatches and the modes they rule out."""

    def __init__(self, ops: FrozenSet[str], forward_wrong: FrozenSet[str] = frozenset(), value: float = math.nan):
        self.ops = ops
        self.value = value  # f at the point, from the recorded evaluation
        self.forward_hazard: Optional[str] = (
            f"forward-mode products are wrong through {', '.join(sorted(forward_wrong))}" if forward_wrong else None
        )
        fused = sorted(op for op in ops if op.split("::")[0] in _FUSED_ATTENTION)
        self.fused_attention: Optional[str] = (
            f"f calls {', '.join(fused)}, a third-party fused attention kernel without second derivatives"
            if fused else None
        )
        crashing = sorted(ops & _LINEARIZE_CRASHES)
        self.linearize_hazard: Optional[str] = (
            f"torch.func.linearize crashes the process on {', '.join(crashing)} (torch 2.13)" if crashing
            else self.forward_hazard
        )


@contextlib.contextmanager
def without_gradients() -> Iterator[None]:
    """``torch.no_grad()`` for hvpfunc's own evaluations of f, without the warning a
    reentrant checkpoint issues there ("None of the inputs have requires_grad=True"),
    which is about training and would puzzle a user who never asked for no_grad."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="None of the inputs have requires_grad=True")
        yield


def record(f: Callable[..., Any], params: Tree, args: tuple, kwargs: dict) -> Inspection:
    """One evaluation of f, without gradients, recording what it dispatches."""
    recorder = _OpRecorder()
    with without_gradients(), differentiable_kernels(), recorder:
        f(params, *args, **kwargs)
    return Inspection(frozenset(recorder.names), frozenset(recorder.forward_wrong))


def memory_light_mode(f: Callable[..., Any], params: Tree, args: tuple, kwargs: dict,
                      inspection: Optional[Inspection] = None) -> str:
    """The mode that stores nothing between products and is right for f:
    forward-over-reverse where f's operations support forward-mode AD correctly
    (cheaper), else reverse-over-reverse-recomputed. ``inspection``: what
    :func:`inspect` or :func:`record` already found for f (else one evaluation finds it)."""
    if inspection is None:
        inspection = record(f, params, args, kwargs)
    if inspection.forward_hazard is not None:
        return "reverse-over-reverse-recomputed"
    probe = pytree.tree_map(torch.ones_like, params)
    try:
        with differentiable_kernels():
            forward_over_reverse(scalar_fn(f), params, args, kwargs)(probe)
        return "forward-over-reverse"
    except RuntimeError as err:
        if is_forward_ad_gap(err):
            return "reverse-over-reverse-recomputed"
        raise


def inspect(f: Callable[..., Any], params: Tree, args: tuple, kwargs: dict, *, again: bool = True) -> Inspection:
    """Evaluate f at the point, recording its operations, and (``again``) a second time.

    Raises ``ValueError`` when f is not finite there (every product would be nan, yet
    nan passes every comparison a solver makes) or not deterministic (randomness inside f
    would make every product random, and a stored mode would freeze one random draw into
    the operator, both silently). ``again=False`` leaves the second evaluation to the
    caller (:func:`check_deterministic`): ``mode="auto"`` compares with the forward pass
    that builds its graph instead of paying for one more.
    """
    recorder = _OpRecorder()
    with without_gradients(), differentiable_kernels(), recorder:
        value = f(params, *args, **kwargs)
    a = float(value)
    if not math.isfinite(a):
        raise ValueError(
            f"f is not finite at params (f = {a!r}): every Hessian-vector product would be nan "
            "or inf. Check the loss at these parameters and data (a log or sqrt of a negative "
            "number, a division by zero, an overflow)."
        )
    if again:
        check_deterministic(a, evaluate(f, params, args, kwargs))
    return Inspection(frozenset(recorder.names), frozenset(recorder.forward_wrong), a)


def evaluate(f: Callable[..., Any], params: Tree, args: tuple, kwargs: dict) -> float:
    """f at the point as the checks see it: without gradients, through the kernels the
    products differentiate."""
    with without_gradients(), differentiable_kernels():
        return float(f(params, *args, **kwargs))


def check_deterministic(a: float, b: float) -> None:
    """Raise ``ValueError`` unless two evaluations of f at the same point agree."""
    # GPU reductions may differ in the last bits between runs; randomness does not hide there
    if abs(a - b) > 1e-6 * max(abs(a), abs(b)) + 1e-30:
        raise ValueError(
            f"f is not deterministic: two evaluations at the same params gave {a!r} and "
            f"{b!r}. Randomness inside f (dropout, sampling, data augmentation) would make "
            "every Hessian-vector product random and solvers would not converge: make f "
            "deterministic (model.eval(), fixed noise, or model_hvp_fn(..., dropout='off'))."
        )


def refuse_fused_attention(inspection: Inspection, mode: str) -> None:
    """Raise ``ValueError`` when f runs a fused attention kernel that no mode but gradient
    differences can differentiate twice."""
    if inspection.fused_attention is not None and mode != "gradient-difference":
        raise ValueError(f"{inspection.fused_attention}. {FUSED_ATTENTION_REMEDY}")


def agreement(params: Tree) -> float:
    """Relative gap two correct products may show: far above rounding (modes reorder
    sums), far below a wrong product (a drifting replay is off by percents)."""
    eps = max(torch.finfo(leaf.dtype).eps for leaf in pytree.tree_leaves(params))
    return 10 * eps**0.5


def check_product(fn: MatvecFn, reference: MatvecFn, params: Tree, *, mode: str) -> None:
    """Trust ``fn`` only if, on two random vectors, it replays bit for bit and agrees
    with ``reference`` (an independent mode). Raises ``RuntimeError`` otherwise.

    Two vectors, because a stored map that mutates its own constants is right once and
    wrong after (torch.func.linearize over BCEWithLogitsLoss or recurrent layers).
    """
    generator = torch.Generator().manual_seed(0)
    tolerance = agreement(params)
    for _ in range(2):
        v = random_like(params, generator=generator, kind="gaussian")
        first, again = fn(v), fn(v)
        same = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(first), pytree.tree_leaves(again)))
        want = reference(v)
        error, size = float(norm(sub(again, want))), float(norm(want))
        if not same:
            drift = float(norm(sub(again, first))) / max(float(norm(first)), 1e-300)
            raise RuntimeError(
                f"mode={mode!r} is not trustworthy for this f: the same vector gave different "
                f"products on two calls (relative change {drift:.2e}); the replayed map "
                "mutates its own constants (a PyTorch bug seen with BCEWithLogitsLoss and "
                "recurrent layers). Use mode='reverse-over-reverse' or mode='auto'."
            )
        if not error <= tolerance * size:
            raise RuntimeError(
                f"mode={mode!r} disagrees with an independent mode (relative error "
                f"{error / max(size, 1e-300):.2e} on a random vector). Use "
                "mode='reverse-over-reverse' or mode='auto'."
            )
