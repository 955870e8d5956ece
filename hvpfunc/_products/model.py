"""Hessian-vector products for ``torch.nn.Module`` losses over one or many batches."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from .._types import Mode
from ..tree import axpy, scale
from .api import Fixed, Matvec, build, usable
from .modes import memory_light_mode

Batch = Tuple[Any, Tensor]


def model_hvp_fn(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Batch | Iterable[Batch],
    *,
    mode: Mode = "auto",
    dropout: str = "error",
    select: Optional[Callable[[str], bool]] = None,
) -> Tuple[Matvec, Dict[str, Tensor]]:
    """The Hessian of a model's loss over data, as a matvec on its parameter dict.

    .. math:: H = \\nabla^2_\\theta \\frac{1}{N} \\sum_b n_b\\, L_b(\\theta),
              \\qquad L_b = \\text{loss\\_fn}(\\text{model}_\\theta(x_b), y_b)

    where batch b holds n_b examples (the length of ``y_b``'s first dimension) and
    N = Σ n_b: with a mean-reduced ``loss_fn`` this is exactly the full-data Hessian,
    whatever the batch sizes. The model is called through
    ``torch.func.functional_call``; the module itself is not modified.

    Buffers are read and never written. BatchNorm (and any ``_NormBase`` layer) in
    training mode normalizes with the batch's statistics, as in training, while its
    running statistics stay untouched; in eval mode it uses the running statistics.
    Parameters with ``requires_grad=False`` are constants.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(inputs), targets)`` returning a 0-dim tensor, usually a
            mean over the batch.
        data: one batch ``(inputs, targets)`` or an iterable of such batches (a list, a
            ``DataLoader``: it is read once, here). ``inputs`` is a tensor (``model(x)``),
            a tuple (``model(*x)``) or a dict (``model(**x)``); ``targets`` is a tensor.
        mode: as in :func:`hvpfunc.hvp_fn`. With one batch, ``"auto"`` times the modes;
            with several it uses a mode that stores nothing, so memory stays at one
            batch's (the stored modes would keep one graph per batch alive):
            ``"forward-over-reverse"``, or ``"reverse-over-reverse-recomputed"`` where the
            loss lacks forward-mode derivatives. ``"compiled"`` is that product through
            ``torch.compile``, compiled once for all the batches (a batch of another
            shape, such as a smaller last one, compiles once more).
        dropout: what to do when the model is in training mode with active dropout
            (``nn.Dropout*``, or ``nn.MultiheadAttention``, ``nn.RNN``/``LSTM``/``GRU``
            with ``dropout`` > 0), which would make
            every product random: ``"error"`` (default) raises, ``"off"`` evaluates the
            loss with those modules switched off, the rest of the model unchanged.
        select: ``select(name) -> bool`` picks the parameters to differentiate (e.g.
            ``lambda n: n.startswith("layer4.")``); the others are held constant, so the
            matvec is the diagonal block of the Hessian for the selected ones. Default:
            every parameter with ``requires_grad``.

    Returns:
        ``(matvec, params)``: the matvec (a :class:`hvpfunc.Matvec`) and the dict
        name -> tensor (detached) of the trainable parameters, the point and the shape of
        its vectors.

    Raises:
        ValueError: empty data, a batch that is not ``(inputs, targets)``, active dropout
            with ``dropout="error"``, ``select`` choosing no parameter, or a forward pass
            that wrote to a buffer.

    Example:
        >>> import torch, hvpfunc as hf
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
        >>> hv = matvec({k: torch.ones_like(p) for k, p in params.items()})
        >>> sorted(hv), hv["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([8, 4]))
    """
    if dropout not in ("error", "off"):
        raise ValueError(f"dropout must be 'error' or 'off', got {dropout!r}")
    batches = _batches(data)
    dropouts = _active_dropout(model)
    if dropouts and dropout == "error":
        names = ", ".join(f"'{name}' (p={p})" for name, _, p in dropouts)
        raise ValueError(
            f"the model is in training mode with active dropout at {names}: every "
            "Hessian-vector product would draw new masks, so products would be random and "
            "solvers would not converge. Call model.eval() (BatchNorm then uses running "
            "statistics), or pass dropout='off' to switch only dropout off."
        )
    named = dict(model.named_parameters())
    chosen = {k for k, p in named.items() if p.requires_grad and (select is None or select(k))}
    if not chosen:
        if select is None:
            raise ValueError(
                "no parameter to differentiate: every parameter of the model has "
                "requires_grad=False (set it on the ones whose Hessian you want)"
            )
        raise ValueError("no parameter to differentiate: select chose none of " + ", ".join(named))
    params = usable({k: p for k, p in named.items() if k in chosen})
    frozen = usable({k: p for k, p in named.items() if k not in chosen})
    buffers = usable(_read_only_buffers(model))
    versions = {k: b._version for k, b in model.named_buffers()}

    # One loss with the batch as arguments: matvecs of the batches can then share one
    # compiled product (mode="compiled") instead of compiling a closure per batch.
    def loss(p: Dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        with _dropout_off(dropouts):
            out = torch.func.functional_call(model, (p, frozen, buffers), *_as_call(x))
        return loss_fn(out, y)

    cache: dict = {}
    if len(batches) == 1:
        # auto's memory: this model's parameter shapes, this loss and the batch's shapes
        # (the loss closure's code is the same for every model)
        key = (type(model), tuple((k, tuple(p.shape), p.dtype) for k, p in params.items()),
               getattr(loss_fn, "__code__", None) or type(loss_fn), repr(getattr(loss_fn, "reduction", None)),
               tuple((tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(batches[0])
                     if isinstance(t, Tensor)))
        with _explained_randomness(dropouts):
            matvec = build(loss, params, batches[0], {}, mode=mode, cache=cache, key=key)
    else:
        total = sum(int(y.shape[0]) for _, y in batches)
        with _explained_randomness(dropouts):
            per_batch = memory_light_mode(loss, params, *batches[0]) if mode == "auto" else mode
            parts = [
                (int(y.shape[0]) / total, build(loss, params, (x, y), {}, mode=per_batch, cache=cache))
                for x, y in batches
            ]

        def summed(v: Dict[str, Tensor]) -> Dict[str, Tensor]:
            acc = None
            for weight, mv in parts:
                hv = mv(v)
                acc = scale(weight, hv) if acc is None else axpy(weight, hv, acc)
            return acc

        matvec = Matvec(Fixed(summed, per_batch), params)
    for name, buf in model.named_buffers():
        if buf._version != versions[name]:
            raise ValueError(
                f"the forward pass wrote to buffer '{name}'; hvpfunc keeps buffers read-only"
            )
    return matvec, params


@contextlib.contextmanager
def _explained_randomness(dropouts: List[Tuple[str, nn.Module, float]]) -> Iterator[None]:
    """Say where randomness the dropout switch cannot reach may come from."""
    try:
        yield
    except ValueError as err:
        if "not deterministic" not in str(err):
            raise
        switched = ", ".join(f"'{name}'" for name, _, _ in dropouts)
        raise ValueError(
            "the loss is not deterministic"
            + (f" even with dropout switched off at {switched}" if switched else "")
            + ": the randomness comes from code hvpfunc cannot switch off, such as "
            "torch.nn.functional.dropout(..., training=True) or sampling in forward(). Call "
            f"model.eval() or make forward() deterministic. ({err})"
        ) from None


def _batches(data: Any) -> List[Batch]:
    if _is_batch(data):
        return [tuple(data)]
    try:
        batches = list(data)
    except TypeError as err:
        raise ValueError(
            "data must be an (inputs, targets) batch or an iterable of such batches, got "
            f"{type(data).__name__}"
        ) from err
    if not batches:
        raise ValueError("data holds no batches")
    for i, batch in enumerate(batches):
        if not _is_batch(batch):
            raise ValueError(
                f"data[{i}] is not an (inputs, targets) pair with a tensor of targets"
            )
        if batch[1].dim() == 0:
            raise ValueError(f"data[{i}]: targets must have a batch dimension")
    return [tuple(b) for b in batches]


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], Tensor)


def _as_call(x: Any) -> Tuple[tuple, ...]:
    """functional_call's (args,) or (args, kwargs) for model(x), model(*x), model(**x)."""
    if isinstance(x, dict):
        return ((), x)
    if isinstance(x, (tuple, list)):
        return (tuple(x),)
    return ((x,),)


def _read_only_buffers(model: nn.Module) -> Dict[str, Any]:
    """Buffers to pass to functional_call: normalization layers in training mode get no
    running statistics, so they normalize with the batch's and update nothing."""
    buffers: Dict[str, Any] = dict(model.named_buffers())
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{prefix}.{name}" if prefix else name
                if key in buffers:
                    buffers[key] = None
    return buffers


def _active_dropout(model: nn.Module) -> List[Tuple[str, nn.Module, float]]:
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, _DropoutNd) and module.p > 0:
            found.append((name, module, module.p))
        elif isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.dropout > 0:
            found.append((name, module, module.dropout))
    return found


@contextlib.contextmanager
def _dropout_off(dropouts: List[Tuple[str, nn.Module, float]]) -> Iterator[None]:
    """Switch the given dropout modules off for the duration of one loss evaluation
    (recurrent layers and attention by their ``dropout`` attribute)."""
    saved = []
    for _, module, _ in dropouts:
        if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
            saved.append((module, "dropout", module.dropout))
            module.dropout = 0.0
        else:
            saved.append((module, "training", module.training))
            module.training = False
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
