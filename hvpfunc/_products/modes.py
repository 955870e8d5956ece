"""The ways to compute H·v, each a builder ``(f, params, args, kwargs) -> matvec``, and the
routing around derivatives PyTorch lacks (fused attention, cuDNN's recurrent kernels,
broken forward-mode formulas)."""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Any, Callable, ContextManager, Iterator, Optional

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._types import Tree


@contextlib.contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Route f around the kernels whose derivatives PyTorch lacks: scaled_dot_product_attention
    through its math kernel (the fused kernels have neither forward-mode AD nor a double
    backward), recurrent layers off cuDNN (:func:`recurrent_without_cudnn`)."""
    with _math_attention(), recurrent_without_cudnn():
        yield


@contextlib.contextmanager
def _math_attention() -> Iterator[None]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the older per-backend switches
        with torch.backends.cuda.sdp_kernel(
            enable_flash=False, enable_math=True, enable_mem_efficient=False
        ):
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


# The functions nn.RNN, nn.LSTM and nn.GRU call (through torch._VF); on CUDA each runs
# cuDNN's fused kernel when cuDNN is enabled.
_RECURRENT = frozenset({"lstm", "gru", "rnn_tanh", "rnn_relu"})


class _RecurrentOffCudnn(TorchFunctionMode):
    """Runs the recurrent functions with cuDNN off, every other function as it is."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) not in _RECURRENT:
            return func(*args, **(kwargs or {}))
        enabled = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            return func(*args, **(kwargs or {}))
        finally:
            torch.backends.cudnn.enabled = enabled


@contextlib.contextmanager
def recurrent_without_cudnn() -> Iterator[None]:
    """Run RNN/LSTM/GRU layers on PyTorch's own kernels instead of cuDNN's, whose backward
    has no derivative ("Double backwards is not supported for CuDNN RNNs", pytorch#5261,
    #25315, #134901) and refuses to run in eval mode ("cudnn RNN backward can only be
    called in training mode"). Only the recurrent calls are switched: convolutions keep
    cuDNN. A build without cuDNN has nothing to route (no mode is entered)."""
    if not torch.backends.cudnn.is_available():
        yield
        return
    with _RecurrentOffCudnn():
        yield


def routing(mode: str) -> Callable[[], ContextManager[None]]:
    """The routing a product of ``mode`` needs on each call: none for the stored modes
    (their graph was built under :func:`differentiable_kernels`), the recurrent one for
    gradient differences (first derivatives, which fused attention has but cuDNN's RNNs
    in eval mode refuse), all of it for the modes that evaluate f again."""
    if mode in ("reverse-over-reverse", "linearize"):
        return contextlib.nullcontext
    if mode == "gradient-difference":
        return recurrent_without_cudnn
    return differentiable_kernels


def scalar_fn(f: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Wrap f so that a non-scalar or non-float output is a clear error."""

    def wrapped(*args: Any, **kwargs: Any) -> Tensor:
        out = f(*args, **kwargs)
        if not isinstance(out, Tensor):
            raise TypeError(
                f"f must return a scalar tensor, it returned a {type(out).__name__}"
            )
        if out.dim() != 0:
            raise ValueError(
                f"f must return a scalar (0-dim) tensor, it returned shape {tuple(out.shape)}; "
                "reduce it first, e.g. with .mean() or .sum()"
            )
        if not out.is_floating_point():
            raise TypeError(f"f must return a floating-point scalar, it returned {out.dtype}")
        return out

    return wrapped


def forward_over_reverse(f, params, args, kwargs, *, mode: str = "forward-over-reverse"):
    """``jvp(grad(f))``, recomputed every call; ``mode`` names the mode in its errors
    (``linearize`` runs one such product first)."""
    grad_f = torch.func.grad(f)

    def matvec(v: Tree) -> Tree:
        try:
            return torch.func.jvp(lambda p: grad_f(p, *args, **kwargs), (params,), (v,))[1]
        except RuntimeError as err:
            if is_forward_ad_gap(err):
                raise RuntimeError(
                    f"mode={mode!r}: an operation in f has no working forward-mode "
                    f"derivative under torch.func ({err}). Use mode='reverse-over-reverse' or mode='auto'."
                ) from err
            raise

    return matvec


def reverse_over_reverse_recomputed(f, params, args, kwargs):
    """``vjp(grad(f))``, recomputed every call. What torch.func's transforms cannot run,
    plain ``torch.autograd`` can (double backward on a fresh graph per call, which
    ``vmap`` cannot batch): kernels that read their inputs' data pointers (RNNs on a
    PackedSequence, torch 2.13), an ``autograd.Function`` without ``setup_context``, and
    saved-tensor hooks (activation checkpointing with ``use_reentrant=False``); the
    first such failure switches this matvec to it."""
    grad_f = torch.func.grad(f)
    plain = False

    def matvec(v: Tree) -> Tree:
        nonlocal plain
        if not plain:
            try:
                return torch.func.vjp(lambda p: grad_f(p, *args, **kwargs), params)[1](v)[0]
            except RuntimeError as err:
                if not is_transform_gap(err):
                    raise
                plain = True
        return reverse_over_reverse(f, params, args, kwargs)(v)

    return matvec


def reverse_over_reverse(f, params, args, kwargs):
    leaves, spec = pytree.tree_flatten(params)
    inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        out = f(pytree.tree_unflatten(inputs, spec), *args, **kwargs)
        if _reentrant_checkpoint(out):
            raise ValueError(_REENTRANT_CHECKPOINT_REMEDY)
        grads = torch.autograd.grad(
            out, inputs, create_graph=True, allow_unused=True, materialize_grads=True
        )
    # Leaves whose gradient does not depend on the parameters (f linear in them) have no
    # graph; their rows of H are zero and autograd must not be asked about them.
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def matvec(v: Tree) -> Tree:
        v_leaves = pytree.tree_leaves(v)
        if not live:
            return pytree.tree_map(torch.zeros_like, v)
        out = _retained_vjp([grads[i] for i in live], inputs, [v_leaves[i] for i in live])
        return pytree.tree_unflatten(list(out), spec)

    matvec.value = out.detach()  # f at the point: auto's second look at f (determinism)
    return matvec


# Reentrant activation checkpointing recomputes its segment inside the backward pass, in
# a graph of its own that create_graph does not connect: a double backward through it
# drops the segment's second-order terms without an error (a two-layer net's Hessian came
# out 0.19 off with torch.utils.checkpoint(..., use_reentrant=True); the other modes
# raise on its autograd.Function).
_REENTRANT_CHECKPOINT_REMEDY = (
    "f runs activation checkpointing with use_reentrant=True (torch.utils.checkpoint's "
    "CheckpointFunction), whose backward cannot be differentiated again: Hessian-vector "
    "products through it would silently miss the checkpointed layers' second-order terms. "
    "Pass use_reentrant=False to torch.utils.checkpoint (Hugging Face: "
    "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})), "
    "turn checkpointing off, or use mode='gradient-difference', whose products need only gradients."
)


def _reentrant_checkpoint(out: Tensor) -> bool:
    """Whether ``out``'s autograd graph passes through a reentrant checkpoint."""
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        if type(node).__name__ == "CheckpointFunctionBackward":
            return True
        seen.add(node)
        stack.extend(child for child, _ in node.next_functions)
    return False


def _retained_vjp(outputs: list, inputs: list, cotangents: list) -> list:
    """Σᵢ cotangentsᵢ · ∂outputsᵢ/∂inputs, keeping the graph: ``torch.autograd.grad(outputs,
    inputs, cotangents, retain_graph=True, allow_unused=True, materialize_grads=True)``
    without its Python-side check of the cotangents' shapes, whose first call imports
    torch's symbolic-shapes module and with it sympy: 0.25-0.3 s, more than the whole
    first answer of a small job (torch 2.13). The Matvec checked the shapes, dtypes and
    devices against the parameters already. Tensors with ``__torch_function__`` (and a
    torch without the engine entry point) take the public path."""
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if run is None or torch.overrides.has_torch_function((*outputs, *inputs, *cotangents)):
        return list(torch.autograd.grad(
            outputs, inputs, cotangents, retain_graph=True, allow_unused=True, materialize_grads=True
        ))
    out = run(tuple(outputs), tuple(cotangents), True, False, tuple(inputs), True, accumulate_grad=False)
    return [g if g is not None else torch.zeros_like(x) for g, x in zip(out, inputs)]


def linearize(f, params, args, kwargs):
    """``torch.func.linearize(grad(f))``: traced once, replayed. Callers check the
    operations f dispatches first (some crash the tracer) and the replays after
    (:mod:`.checks`)."""
    # Broken forward-mode formulas (F.mse_loss with reduction="mean",
    # pytorch/pytorch#123996) raise in one eager forward-over-reverse product; tracing
    # them would not raise.
    probe = pytree.tree_map(torch.ones_like, params)
    forward_over_reverse(f, params, args, kwargs, mode="linearize")(probe)
    grad_f = torch.func.grad(f)
    with warnings.catch_warnings():
        # linearize's constant folding warns about attributes it creates itself.
        warnings.filterwarnings("ignore", module=r"torch\.fx\..*")
        _, jvp_fn = torch.func.linearize(lambda p: grad_f(p, *args, **kwargs), params)
    return jvp_fn


BUILDERS = {
    "forward-over-reverse": forward_over_reverse,
    "reverse-over-reverse": reverse_over_reverse,
    "reverse-over-reverse-recomputed": reverse_over_reverse_recomputed,
    "linearize": linearize,
}

# What torch says when an operation has no usable forward-mode derivative. The last: a
# kernel that reads a dual tensor's data pointer (packed-sequence RNNs, _VF.gru/lstm/rnn
# on a PackedSequence, under torch.func.jvp in torch 2.13).
_NO_STORAGE = "cannot access data pointer of tensor that doesn't have storage"
# what torch.func refuses and plain autograd runs (reverse_over_reverse_recomputed)
_TRANSFORM_GAPS = (_NO_STORAGE, "must override the setup_context staticmethod", "support saved tensor hooks")
# forward-over-reverse runs under torch.func too: its gaps include those
FORWARD_AD_GAPS = ("forward ad", "forward-mode", "forward mode", "zerotensor", "jvp") + _TRANSFORM_GAPS


def is_forward_ad_gap(err: BaseException) -> bool:
    """Whether an error says that some operation lacks a usable forward-mode derivative
    (or that torch.func, which forward-over-reverse runs under, cannot run f)."""
    text = str(err).lower()
    return any(pattern in text for pattern in FORWARD_AD_GAPS)


# torch's words for a backward formula that has no derivative of its own: "derivative for
# aten::hardsigmoid_backward is not implemented" (RuntimeError), "the derivative for
# '_embedding_bag_backward' is not implemented." (NotImplementedError)
_NO_DERIVATIVE = re.compile(r"derivative for '?(?:aten::)?([\w.]+?)'? is not implemented")


def missing_second_derivative(err: BaseException) -> Optional[str]:
    """The operation named where ``err`` says that PyTorch has no derivative for it (for
    a product's error: the backward of an operation in f, whose second derivative the
    exact modes need), else None."""
    found = _NO_DERIVATIVE.search(str(err))
    return found.group(1) if found else None


def no_second_derivative(err: BaseException, mode: str) -> RuntimeError:
    """The error a product raises where PyTorch has no derivative for an operation's
    backward (torch 2.13: multi_margin_loss, multilabel_margin_loss, hardsigmoid,
    embedding_bag): what is missing, and the mode that needs none. ``mode``: how the
    message names the mode (``"mode='auto' (running ...)"``)."""
    return RuntimeError(
        f"{mode}: PyTorch has no derivative for {missing_second_derivative(err)} (the backward of an "
        "operation in f), which every exact mode needs for the second derivative. "
        "mode='gradient-difference' (of hf.hvp_fn or hf.model_hvp_fn) computes H·v from two gradients "
        "instead (central differences: about 1e-5 relative accuracy in float32, 1e-10 in float64)."
    )


def is_transform_gap(err: BaseException) -> bool:
    """Whether an error says that torch.func's transforms cannot run f, which plain
    autograd can (:func:`reverse_over_reverse_recomputed`)."""
    text = str(err).lower()
    return any(pattern in text for pattern in _TRANSFORM_GAPS)
