"""The product API: ``hvp`` (one product), ``hvp_fn`` (a reusable matvec) and ``Matvec``."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Callable, Dict, Hashable, Mapping, Optional, get_args

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._precision import plain_autograd
from .._types import MatvecFn, Mode, Tree
from ..tree import check_like, check_tree
from . import difference, sharded
from .auto import AutoProduct, signature
from .checks import check_product, inspect, record, refuse_fused_attention
from .compiled import compiled_matvec
from .modes import (
    BUILDERS,
    differentiable_kernels,
    is_forward_ad_gap,
    missing_second_derivative,
    no_second_derivative,
    routing,
    scalar_fn,
)

MODES = get_args(Mode)


def hvp(f: Callable[..., Tensor], params: Tree, v: Tree, *args: Any, **kwargs: Any) -> Tree:
    """The Hessian-vector product H v of a scalar function at ``params``.

    .. math:: H v = \\nabla^2_{\\theta} f(\\theta, \\ldots)\\, v
              = \\frac{d}{dt} \\nabla_\\theta f(\\theta + t v)\\big|_{t=0}

    computed forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), one
    forward and backward pass with tangents, without forming H; if an operation in f
    has no working forward-mode derivative, reverse-over-reverse (``torch.func.vjp`` of
    ``torch.func.grad``) instead. ``params`` and ``v`` are
    pytrees of tensors of the same structure; nothing is flattened. It composes with
    ``torch.func`` transforms: ``vmap`` over ``v`` gives many products at once.

    Args:
        f: ``f(params, *args, **kwargs)`` returning a 0-dim floating tensor.
        params: the point, a pytree of floating tensors.
        v: the tangent, a pytree matching ``params`` leaf for leaf.
        *args, **kwargs: passed to ``f`` unchanged (data, targets...); not differentiated.

    Returns:
        A pytree shaped like ``params``.

    Raises:
        ValueError, TypeError: ``v`` differs from ``params`` in structure, shape, dtype or
            device (the message names the leaf), ``f`` does not return a scalar, or ``f``
            calls a third-party fused attention kernel.
        RuntimeError: PyTorch has no derivative for the backward of an operation in f
            (``nn.Hardsigmoid``, ``nn.MultiMarginLoss``, ``nn.EmbeddingBag`` in torch
            2.13); ``hvp_fn(..., mode="gradient-difference")`` needs none.

    Example:
        >>> import torch, hvpfunc as hf
        >>> f = lambda p, x: ((x @ p["w"]) ** 2).sum()
        >>> params = {"w": torch.ones(3)}
        >>> hf.hvp(f, params, {"w": torch.tensor([1., 0., 0.])}, torch.eye(3))
        {'w': tensor([2., 0., 0.])}
    """
    check_tree(params, name="params")
    check_like(v, params, name="v")
    grad_f = torch.func.grad(scalar_fn(f))
    with differentiable_kernels():
        inspection = record(f, params, args, kwargs)
        refuse_fused_attention(inspection, "hvp")
        if inspection.forward_hazard is None:
            try:
                return torch.func.jvp(lambda p: grad_f(p, *args, **kwargs), (params,), (v,))[1]
            except RuntimeError as err:
                if not is_forward_ad_gap(err):
                    raise
        try:
            return torch.func.vjp(lambda p: grad_f(p, *args, **kwargs), params)[1](v)[0]
        except (RuntimeError, NotImplementedError) as err:
            if missing_second_derivative(err) is None:
                raise
            raise no_second_derivative(err, "hvp") from err


class Matvec:
    """``v -> H v`` at a fixed point: the operator the solvers take.

    Calling it checks ``v`` against the parameters (structure, shapes, dtypes, devices)
    and returns a tree shaped like them. It works under ``torch.func.vmap`` over ``v``,
    and inside ``torch.inference_mode()`` (it computes outside it).

    Attributes:
        mode: the mode that computes the product now (``"auto"`` may switch between
            calls: see ``switches``).
        params: the point (detached; inference tensors cloned out of inference mode).
        timings: seconds per product of each mode ``"auto"`` timed.
        switches: ``"auto"``'s decisions, each a ``Switch(after_products, from_mode,
            to_mode, reason)``; empty for an explicit mode.
        chunk_trials: with ``"auto"``, the seconds per product that solvers'
            ``chunk_size="auto"`` measured on a CPU for a loop (key 1) and for ``vmap``
            chunks (key 16; inf where ``vmap`` failed), shared by the matvecs of the same
            f and input signature in this process, so that later solvers skip the trial;
            None for an explicit mode.
    """

    def __init__(self, product: Any, params: Tree):
        self._product = product
        self.params = params

    @property
    def mode(self) -> str:
        return self._product.mode

    @property
    def timings(self) -> Dict[str, float]:
        return dict(self._product.timings)

    @property
    def switches(self) -> list:
        return list(self._product.switches)

    @property
    def chunk_trials(self) -> Optional[Dict[int, float]]:
        return getattr(self._product, "chunk_trials", None)

    def expect_products(self, count: int) -> None:
        """Say that about ``count`` more products will follow (a trace's probes, a
        density's steps), so that ``"auto"`` traces a faster mode only when those
        products repay it. A hint; solvers that know their count call it."""
        hint = getattr(self._product, "expect_products", None)
        if hint is not None:
            hint(count)

    def __call__(self, v: Tree) -> Tree:
        check_like(v, self.params, name="v")
        with plain_autograd():
            if _has_inference(v):
                v = pytree.tree_map(_usable, v)
            with self._product.routing():
                try:
                    return self._product(v)
                except (RuntimeError, NotImplementedError) as err:
                    # the stored graph's build needs first derivatives only: a missing
                    # second one shows at the first product, in torch's words
                    if self.mode == "gradient-difference" or missing_second_derivative(err) is None:
                        raise
                    auto = isinstance(self._product, AutoProduct)
                    named = f"mode='auto' (running {self.mode!r})" if auto else f"mode={self.mode!r}"
                    raise no_second_derivative(err, named) from err

    def __repr__(self) -> str:
        return f"Matvec(mode={self.mode!r})"


class Fixed:
    """The product of an explicit mode."""

    timings: Mapping[str, float] = MappingProxyType({})  # an explicit mode times nothing
    switches: tuple = ()

    def __init__(self, fn: MatvecFn, mode: str):
        self._fn, self.mode = fn, mode
        self.routing = routing(mode)

    def __call__(self, v: Tree) -> Tree:
        return self._fn(v)


def _has_inference(tree: Tree) -> bool:
    return any(isinstance(t, Tensor) and t.is_inference() for t in pytree.tree_leaves(tree))


def _usable(x: Any) -> Any:
    """A tensor autograd can differentiate through: detached, and an inference tensor
    (made under ``torch.inference_mode()``, e.g. a checkpoint loaded there) cloned into a
    normal one; autograd refuses inference tensors, and a traced product would treat
    them as constants (zero products)."""
    if not isinstance(x, Tensor):
        return x
    x = x.detach()
    return x.clone() if x.is_inference() else x


def usable(tree: Tree) -> Tree:
    """:func:`_usable` on every leaf; call it outside inference mode."""
    with plain_autograd():
        return pytree.tree_map(_usable, tree)


def hvp_fn(
    f: Callable[..., Tensor],
    params: Tree,
    *args: Any,
    mode: Mode = "auto",
    **kwargs: Any,
) -> Matvec:
    """A reusable matvec ``v -> H v`` for the Hessian of f at the fixed point ``params``.

    Solvers call the matvec many times at one point, so the modes that build something
    once and replay it cost less per product than those that recompute f each call.
    Every mode's matvec works under ``torch.func.vmap`` (batch the tangents only). The
    modes (measured costs: README's benchmark tables, ``python -m benchmarks``):

    * ``"reverse-over-reverse"``: the gradient's autograd graph is built once
      (``create_graph=True``) and each v back-propagated through it (Pearlmutter's
      trick, as PyHessian does it); keeps the graph alive.
    * ``"linearize"``: ``torch.func.linearize(grad(f))`` traces the tangent map once and
      replays it; tracing is slow, replays are cheap on convolutions.
    * ``"forward-over-reverse"``: ``jvp(grad(f))``, recomputed each call; stores nothing.
    * ``"reverse-over-reverse-recomputed"``: ``vjp(grad(f))``, recomputed each call;
      stores nothing and needs no forward-mode derivatives.
    * ``"auto"`` (default): starts at once with the reused graph (about one gradient to
      build), or where f has no double backward with a recomputing mode; once the time
      spent in products reaches the cost of tracing (measured on an earlier matvec of the
      same f and input shapes, else estimated as 50 builds), it traces ``"linearize"``,
      checks it, and keeps whichever is faster per product (ski rental: never much more
      than twice the best fixed choice). The outcome is remembered per process for f and
      its input signature, so a later matvec does not repeat a trace that lost.
      ``Matvec.switches`` records every decision. Under
      ``torch.use_deterministic_algorithms(True)`` it keeps its first mode, as timings
      would decide the trace. For one product use :func:`hvp`.
    * ``"gradient-difference"`` (opt-in): (∇f(θ + hv) − ∇f(θ − hv)) / 2h from
      gradients only, no second derivative, with h = ε^{1/3} max(1, ‖θ‖)/‖v‖: two
      gradients a product in float64 (relative error about 1e-10); below float64 one
      Richardson step, (4 D(h/2) − D(h)) / 3 with h = ε^{1/5} max(1, ‖θ‖)/‖v‖, four
      gradients (about 1e-5, up to 1e-4 on BatchNorm networks). An approximation, for
      code that has gradients only: :func:`hvpfunc.model_hvp_fn` runs it through the
      module's own forward and backward (FSDP2, DDP, any wrapper).
    * ``"compiled"`` (opt-in, never chosen by ``"auto"``): ``torch.compile`` of the
      product that stores nothing, checked against the eager product at construction
      (a failure to compile or a disagreement raises). Code Dynamo cannot trace runs
      eagerly between compiled pieces; under ``torch.func`` transforms the product runs
      eagerly (compiled functions cannot be called inside them, pytorch#128711).

    A mode is trusted only after it is checked. At construction f is evaluated twice
    (finite and deterministic, or ``ValueError``; for ``"auto"`` the second evaluation
    is the forward pass that builds its graph), recording the operations it
    dispatches: ``torch.func.linearize`` crashes the process on some (``F.mse_loss`` in
    torch 2.13), so ``"linearize"`` is refused for them before any tracing. A traced
    map must replay bit for bit and agree with an independent mode on two vectors before
    it is used (with ``BCEWithLogitsLoss`` and recurrent layers it mutates its own
    constants and drifts). Every mode evaluates f under the math kernel of
    ``scaled_dot_product_attention`` (the fused kernels have neither forward-mode AD
    nor a double backward), and runs RNN/LSTM/GRU layers with cuDNN off (cuDNN's
    recurrent kernels have no double backward, pytorch#5261; convolutions keep cuDNN).
    Third-party fused attention (``flash_attn``, xFormers operators) cannot be rerouted:
    it is found among the operations f dispatches and refused with a ``ValueError``
    that says what to switch. Inference tensors (made under ``torch.inference_mode()``)
    are cloned into normal tensors: autograd refuses them, and a traced map would treat
    them as constants.

    Args:
        f: ``f(params, *args, **kwargs)`` returning a 0-dim floating tensor.
        params: the point, a pytree of floating tensors. It is detached, not copied:
            after an in-place update of the parameters the matvec is no longer at one
            well-defined point (the reused graph then raises; the other modes would mix
            the old and new values), so build a new matvec after each update.
        *args, **kwargs: passed to ``f``; not differentiated.
        mode: ``"auto"`` (default), ``"forward-over-reverse"``, ``"reverse-over-reverse"``,
            ``"reverse-over-reverse-recomputed"``, ``"linearize"``, ``"compiled"`` or
            ``"gradient-difference"``.

    Returns:
        A :class:`Matvec`; its ``mode`` attribute says which mode computes products.

    Raises:
        ValueError: unknown ``mode``; ``f`` does not return a scalar; ``f`` is not finite
            or not deterministic at ``params`` (two evaluations at construction); ``f``
            calls a third-party fused attention kernel (any mode but
            ``"gradient-difference"``).
        TypeError: a leaf of ``params`` is not a floating tensor.
        RuntimeError: no mode can differentiate f twice (the message lists each error);
            ``mode="linearize"`` for an f it would crash on, or whose traced map does not
            replay bit for bit or disagrees with an independent mode;
            ``mode="compiled"`` and ``torch.compile`` fails on f or disagrees with the
            eager product; and, from the matvec's first call, PyTorch has no derivative
            for the backward of an operation in f (``nn.Hardsigmoid``,
            ``nn.MultiMarginLoss``, ``nn.EmbeddingBag`` in torch 2.13), which the exact
            modes need: ``mode="gradient-difference"`` does not. The same for sharded
            (DTensor) params where DTensor's all-gather has no second derivative (torch
            2.11: every exact product would be zero), raised at construction.

    Example:
        >>> import torch, hvpfunc as hf
        >>> mv = hf.hvp_fn(lambda p: (p["w"] ** 4).sum(), {"w": torch.tensor([1., 2.])})
        >>> mv({"w": torch.ones(2)})["w"]
        tensor([12., 48.])
        >>> torch.func.vmap(mv)({"w": torch.eye(2)})["w"]   # two products at once
        tensor([[12.,  0.],
                [ 0., 48.]])
    """
    return build(f, params, args, kwargs, mode=mode)


def build(f, params, args, kwargs, *, mode: str, cache: Optional[dict] = None,
          key: Optional[Hashable] = None) -> Matvec:
    """:func:`hvp_fn`; matvecs built with one ``cache`` for the same f at several points
    or data share what can be shared (the compiled product). ``key`` names f and its
    input signature for ``"auto"``'s memory (default: f's code and the inputs' shapes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_tree(params, name="params")
    with plain_autograd():
        params, args, kwargs = usable(params), usable(args), usable(kwargs)
        f = scalar_fn(f)
        if mode != "gradient-difference":
            sharded.check_twice_differentiable(pytree.tree_leaves(params))
        inspection = inspect(f, params, args, kwargs, again=mode != "auto")
        refuse_fused_attention(inspection, mode)
        if mode == "auto":
            return Matvec(AutoProduct(f, params, args, kwargs, inspection, key or signature(f, params, args, kwargs)),
                          params)
        with differentiable_kernels():
            if mode == "compiled":
                fn = compiled_matvec(f, params, args, kwargs, cache, inspection)
            elif mode == "gradient-difference":
                fn = difference.functional(f, params, args, kwargs)
            elif mode == "forward-over-reverse" and inspection.forward_hazard is not None:
                raise RuntimeError(f"mode='forward-over-reverse' is refused: {inspection.forward_hazard}. "
                                   "Use mode='auto' or a reverse mode.")
            elif mode == "linearize":
                if inspection.linearize_hazard is not None:
                    raise RuntimeError(f"mode='linearize' is refused: {inspection.linearize_hazard}. "
                                       "Use mode='auto' or mode='reverse-over-reverse'.")
                try:
                    fn = BUILDERS[mode](f, params, args, kwargs)
                    check_product(fn, BUILDERS["reverse-over-reverse-recomputed"](f, params, args, kwargs), params,
                                  mode="linearize")
                except RuntimeError as err:
                    if str(err).startswith("mode="):
                        raise
                    raise RuntimeError(
                        f"mode='linearize' cannot trace or replay this f ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}). "
                        "Use mode='auto' or mode='reverse-over-reverse'."
                    ) from err
            else:
                fn = BUILDERS[mode](f, params, args, kwargs)
    return Matvec(Fixed(fn, mode), params)
