"""Hessian-vector products for ``torch.nn.Module`` losses over one or many batches."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterable, Iterator, List, Literal, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd

from .._precision import plain_autograd
from .._types import Mode, Tree
from ..tree import axpy, scale
from . import difference, sharded
from .api import Fixed, Matvec, build, usable
from .checks import FUSED_ATTENTION_REMEDY, inspect, memory_light_mode, refuse_fused_attention, without_gradients
from .modes import BUILDERS, differentiable_kernels, scalar_fn

Batch = Tuple[Any, Tensor]


def model_hvp_fn(
    model: nn.Module,
    loss_fn: Callable[[Any, Tensor], Tensor],
    data: Batch | Iterable[Batch],
    *,
    mode: Mode = "auto",
    reduction: Optional[Literal["mean", "sum"]] = None,
    dropout: str = "error",
    select: Optional[Callable[[str], bool]] = None,
    unpack_inputs: bool = True,
    batch_size: Optional[Callable[[Batch], int]] = None,
    check_data: bool = True,
    at: Optional[Mapping] = None,
) -> Tuple[Matvec, Dict[str, Tensor]]:
    """The Hessian of a model's loss over data, as a matvec on its parameter dict.

    With one batch, H is the Hessian of ``loss_fn(model(x), y)``. With several, it is the
    Hessian of the loss the user wrote, over the whole data set:

    .. math:: H = \nabla^2_\theta \\sum_b w_b\\, L_b(\theta), \\qquad
              w_b = 1 \\;(\text{"sum"}), \\qquad
              w_b = m_b / \textstyle\\sum_c m_c \\;(\text{"mean"})

    where L_b = loss_fn(model(x_b), y_b) and m_b is what batch b's loss averages over:
    for a ``torch.nn`` loss, the ratio of its ``reduction="sum"`` and ``"mean"`` values
    at the point (elements for ``MSELoss``, non-ignored targets for ``CrossEntropyLoss``,
    the total class weight with ``weight=``, tokens for sequence losses), so "mean" is
    the mean over everything the loss averages, whatever the batch sizes; for a plain
    callable, ``batch_size(batch)`` (default: the length of the targets). The model is
    called through ``torch.func.functional_call``; the module is not modified.

    The module is never modified: hvpfunc works on copies of its parameters and buffers
    (one more copy of the model's memory), and a forward pass that writes to them in
    place is refused. BatchNorm (and any ``_NormBase`` layer) in
    training mode normalizes with the batch's statistics, as in training, while its
    running statistics stay untouched; in eval mode it uses the running statistics.
    Parameters with ``requires_grad=False`` are constants; a parameter shared by two
    modules (tied weights) is one entry, differentiated through both uses. Embeddings
    with ``sparse=True`` are evaluated with dense gradients (the same values: a sparse
    gradient has no second derivative in torch), their flag restored after each call.

    Args:
        model: the network.
        loss_fn: ``loss_fn(model(inputs), targets)`` returning a 0-dim tensor.
        data: one batch ``(inputs, targets)``; a list or tuple of batches, held in
            memory; or any other re-iterable of batches (a ``DataLoader``; not an
            iterator or generator, which reads only once), streamed: read once here and
            once per product, so memory holds one batch at a time.
        mode: as in :func:`hvpfunc.hvp_fn`. With one batch, ``"auto"`` starts with the
            reused graph. With several it uses a mode that stores nothing, so memory
            stays at one batch's: ``"forward-over-reverse"``, or
            ``"reverse-over-reverse-recomputed"`` where the loss lacks forward-mode
            derivatives. ``"compiled"`` (batches in memory) is that product through
            ``torch.compile``, compiled once for all the batches. Streamed data takes
            ``"auto"`` or those two modes.
        reduction: ``"mean"`` or ``"sum"``: how the batches' losses combine. ``None``
            (default) reads ``loss_fn.reduction`` for ``torch.nn`` losses; a plain
            callable over several batches must say (hvpfunc does not guess). Ignored
            for one batch.
        dropout: what to do when the model is in training mode with active dropout
            (``nn.Dropout*``, or ``nn.MultiheadAttention``, ``nn.RNN``/``LSTM``/``GRU``
            with ``dropout`` > 0), which would make every product random: ``"error"``
            (default) raises, ``"off"`` evaluates the loss with those modules switched
            off, the rest of the model unchanged.
        select: ``select(name) -> bool`` picks the parameters to differentiate (e.g.
            ``lambda n: n.startswith("layer4.")``); the others are held constant, so the
            matvec is the diagonal block of the Hessian for the selected ones. Default:
            every parameter with ``requires_grad``.
        unpack_inputs: ``True`` (default): a tuple or list of inputs is unpacked,
            ``model(*x)``, and any ``Mapping`` (``dict``, Hugging Face's
            ``BatchEncoding``) is passed as keywords, ``model(**x)``; other inputs (a
            tensor, a ``PackedSequence``) as ``model(x)``. ``False``: always ``model(x)``.
        batch_size: ``batch_size(batch) -> int``, the examples in a batch, for a plain
            callable with ``reduction="mean"`` whose batches' size is not
            ``len(targets)``.
        check_data: with streamed data, check on every pass that the batches are the
            ones read first (a fingerprint of each): shuffling, random augmentation or a
            sampler that changes the set would otherwise mix different Hessians. Turn it
            off only for data known to repeat (it costs a read of each batch's tensors).
        at: the point, by parameter or buffer name (e.g. a checkpoint's state dict, whose
            BatchNorm running statistics count in eval mode, or iterates of an
            optimizer): those values replace the module's own, which are left untouched;
            names not given take the module's values.

    Returns:
        ``(matvec, params)``: the matvec (a :class:`hvpfunc.Matvec`) and the dict
        name -> tensor (detached) of the trainable parameters, the point and the shape of
        its vectors.

    Raises:
        ValueError: empty data, an iterator as data, a batch that is not ``(inputs,
            targets)``, several batches with a loss whose reduction is unknown (or
            ``"none"``, or contradicting ``reduction=``), active dropout with
            ``dropout="error"``, no parameter to differentiate, a stored mode with
            streamed data, a forward pass that wrote to a buffer, or, in any mode but
            ``"gradient-difference"``, third-party fused attention (the ``flash_attn`` or
            ``xformers`` packages, Hugging Face's ``attn_implementation=
            "flash_attention_2"``) or activation checkpointing with
            ``use_reentrant=True`` (with several batches: at the first product).
        RuntimeError: (when a product runs) streamed data that cannot be re-iterated or
            that changed between passes.

    Example:
        >>> import torch, hvpfunc as hf
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> matvec, params = hf.model_hvp_fn(model, nn.MSELoss(), [(x[:20], y[:20]), (x[20:], y[20:])])
        >>> hv = matvec({k: torch.ones_like(p) for k, p in params.items()})
        >>> sorted(hv), hv["0.weight"].shape
        (['0.bias', '0.weight', '2.bias', '2.weight'], torch.Size([8, 4]))
    """
    if dropout not in ("error", "off"):
        raise ValueError(f"dropout must be 'error' or 'off', got {dropout!r}")
    if reduction not in (None, "mean", "sum"):
        raise ValueError(f"reduction must be 'mean', 'sum' or None, got {reduction!r}")
    # Called under torch.inference_mode() (an evaluation loop), the copies of the
    # parameters would be inference tensors, which autograd refuses and which keep no
    # version counter: it raised "Inference tensors do not track version counter". Under
    # autocast the stored graph would be a low-precision one.
    with plain_autograd():
        return _model_hvp_fn(model, loss_fn, data, mode, reduction, dropout, select, unpack_inputs, batch_size,
                             check_data, at)


def _model_hvp_fn(model, loss_fn, data, mode, reduction, dropout, select, unpack_inputs, batch_size, check_data, at):
    """:func:`model_hvp_fn` outside inference mode, its arguments checked."""
    single, batches, stream = _source(data)
    dropouts = _active_dropout(model)
    if dropouts and dropout == "error":
        names = ", ".join(f"'{name}' (p={p})" for name, _, p in dropouts)
        raise ValueError(
            f"the model is in training mode with active dropout at {names}: every "
            "Hessian-vector product would draw new masks, so products would be random and "
            "solvers would not converge. Call model.eval() (BatchNorm then uses running "
            "statistics), or pass dropout='off' to switch only dropout off."
        )
    # modules switched for the loss evaluations: dropout (with dropout="off"), and sparse
    # embeddings made dense (a sparse gradient has no double backward; same values)
    switches = dropouts + _sparse_embeddings(model)
    fused = _fused_attention(model)
    if fused is not None and mode != "gradient-difference":
        raise ValueError(f"the model uses {fused}, a fused attention kernel without second derivatives that "
                         f"hvpfunc cannot reroute. {FUSED_ATTENTION_REMEDY}")
    named = dict(model.named_parameters())
    buffer_values: Dict[str, Any] = dict(model.named_buffers())
    if at is not None:
        named, buffer_values = _at(named, buffer_values, at)
    chosen = {k for k, p in named.items() if p.requires_grad and (select is None or select(k))}
    if not chosen:
        if select is None:
            raise ValueError(
                "no parameter to differentiate: every parameter of the model has "
                "requires_grad=False (set it on the ones whose Hessian you want)"
            )
        raise ValueError("no parameter to differentiate: select chose none of " + ", ".join(named))
    # Copies: a forward that writes in place (Embedding(max_norm) renormalizes its rows,
    # spectral_norm updates u and v, a call counter) must not touch the user's module.
    params = _copies({k: p for k, p in named.items() if k in chosen})
    frozen = _copies({k: p for k, p in named.items() if k not in chosen})
    buffers = _copies(_read_only_buffers(model, buffer_values))
    versions = {k: t._version for k, t in {**params, **frozen, **buffers}.items() if t is not None}

    def written() -> Optional[str]:
        """The first copy the forward passes so far wrote to in place, if any."""
        tensors = {**params, **frozen, **buffers}
        return next((k for k, version in versions.items() if tensors[k]._version != version), None)

    def forward(p: Dict[str, Tensor], x: Any) -> Any:
        with _switched_off(switches):
            return torch.func.functional_call(model, (p, frozen, buffers), *_as_call(x, unpack_inputs))

    # One loss with the batch as arguments: matvecs of the batches can then share one
    # compiled product (mode="compiled") instead of compiling a closure per batch.
    def loss(p: Dict[str, Tensor], x: Any, y: Tensor) -> Tensor:
        return loss_fn(forward(p, x), y)

    if mode == "gradient-difference":
        return _gradient_difference(model, loss_fn, single, batches, stream, named, params, reduction, forward,
                                    batch_size, switches, unpack_inputs,
                                    {k: at[k] for k in at if k in buffer_values} if at is not None else {}), params
    if sharded.is_sharded(named):
        return _sharded(model, loss_fn, single, batches, stream, params, frozen, buffers, reduction, batch_size,
                        switches, unpack_inputs, mode), params
    cache: dict = {}
    if single is not None:
        # auto's memory: this model (its type and its modules as printed: two Sequentials
        # that differ in an activation are different functions), its parameter shapes,
        # this loss and the batch's shapes (the loss closure's code is the same for every model)
        key = (type(model), repr(model), tuple((k, tuple(p.shape), p.dtype) for k, p in params.items()),
               getattr(loss_fn, "__code__", None) or type(loss_fn), repr(getattr(loss_fn, "reduction", None)),
               tuple((tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(single)
                     if isinstance(t, Tensor)))
        with _explained_randomness(dropouts, written):
            matvec = build(loss, params, single, {}, mode=mode, cache=cache, key=key)
    else:
        kind = _reduction(loss_fn, reduction)
        weigh = _weigher(kind, loss_fn, forward, params, batch_size)
        if stream is None:
            with _explained_randomness(dropouts, written):
                per_batch = memory_light_mode(loss, params, batches[0], {}) if mode == "auto" else mode
                parts = [(weigh(batch), build(loss, params, batch, {}, mode=per_batch, cache=cache))
                         for batch in batches]
            shares = _shares([m for m, _ in parts], kind)
            matvec = Matvec(Fixed(_summed([(w, mv) for w, (_, mv) in zip(shares, parts)]), per_batch), params)
        else:
            matvec = _streamed(stream, loss, params, mode, weigh, kind, check_data, dropouts, written)
    _refuse_writes(written())
    return matvec, params


def _gradient_difference(model: nn.Module, loss_fn: Any, single: Optional[Batch], batches: List[Batch],
                         stream: Optional[Iterable], named: Dict[str, Tensor], params: Dict[str, Tensor],
                         reduction: Optional[str], forward: Callable, batch_size: Optional[Callable[[Batch], int]],
                         switches: List[Tuple[str, nn.Module, Any]], unpack_inputs: bool,
                         buffers_at: Dict[str, Tensor]) -> Matvec:
    """``mode="gradient-difference"``: gradients from the module's own forward and
    backward at θ ± hv (:func:`difference.live_module`, its buffers at ``buffers_at``
    where given), the batches weighted as the other modes weigh them."""

    def thunk(batch: Batch) -> Callable[[], Tensor]:
        x, y = batch
        call = _as_call(x, unpack_inputs)
        return lambda: loss_fn(model(*call[0], **(call[1] if len(call) > 1 else {})), y)

    if single is not None:
        def passes() -> Iterable[Tuple[float, Callable[[], Tensor]]]:
            return [(1.0, thunk(single))]
    else:
        kind = _reduction(loss_fn, reduction)
        weigh = _weigher(kind, loss_fn, forward, params, batch_size)
        if stream is None:
            fixed = [(w, thunk(batch)) for w, batch in zip(_shares([weigh(b) for b in batches], kind), batches)]

            def passes() -> Iterable[Tuple[float, Callable[[], Tensor]]]:
                return fixed
        else:  # the weights from one read now; each gradient reads the stream again, a batch at a time
            weights = _shares([weigh(_checked(batch, i)) for i, batch in enumerate(_outside_transforms(stream))], kind)

            def passes() -> Iterable[Tuple[float, Callable[[], Tensor]]]:
                for w, batch in zip(weights, _outside_transforms(stream)):
                    yield w, thunk(batch)

    base = {name: value.detach().clone() for name, value in named.items()}
    fn = difference.live_module(model, list(params), base, passes, lambda: _switched_off(switches),
                                buffers_at=buffers_at)
    return Matvec(Fixed(fn, "gradient-difference"), params)


def _sharded(model: nn.Module, loss_fn: Any, single: Optional[Batch], batches: List[Batch],
             stream: Optional[Iterable], params: Dict[str, Tensor], frozen: Dict[str, Any], buffers: Dict[str, Any],
             reduction: Optional[str], batch_size: Optional[Callable[[Batch], int]],
             switches: List[Tuple[str, nn.Module, Any]], unpack_inputs: bool, mode: str) -> Matvec:
    """Exact products of a model with sharded (DTensor) parameters (:mod:`.sharded`):
    this rank's batches, weighted as in the other modes, hooks off, parameters gathered
    for the product."""
    if stream is not None:
        raise NotImplementedError(
            "streamed data for a model with sharded parameters: pass this rank's batches as a list")
    if mode not in sharded.MODES:
        raise ValueError(f"mode={mode!r} is not available for a model with sharded (DTensor) parameters: "
                         f"use one of {sharded.MODES}")
    sharded.check_twice_differentiable(params.values())
    constants = {k: sharded.gathered(t).detach() for k, t in frozen.items()}

    def forward(p: Dict[str, Tensor], x: Any) -> Any:
        with _switched_off(switches):
            return torch.func.functional_call(model, (p, constants, buffers), *_as_call(x, unpack_inputs))

    if single is not None:
        parts = [(1.0, single)]
    else:
        kind = _reduction(loss_fn, reduction)

        def plain_forward(p: Dict[str, Tensor], x: Any) -> Any:
            with sharded.hooks_off(model):
                return forward({k: sharded.gathered(t) for k, t in p.items()}, x)

        weigh = _weigher(kind, loss_fn, plain_forward, params, batch_size)
        parts = list(zip(_shares([weigh(batch) for batch in batches], kind), batches))
    fn = sharded.matvec(sharded.batches_loss(model, parts, forward, loss_fn), params, mode)
    return Matvec(Fixed(fn, "reverse-over-reverse" if mode == "auto" else mode), params)


def _copies(tensors: Dict[str, Any]) -> Dict[str, Any]:
    """Detached copies (inference tensors made normal); None stays None."""
    return {k: (t.clone() if isinstance(t, Tensor) else t) for k, t in usable(tensors).items()}


def _at(named: Dict[str, Tensor], buffers: Dict[str, Any], at: Mapping) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """The module's parameters and buffers with the values of ``at`` in their place
    (requires_grad kept from the module's): a checkpoint's state dict holds both, and
    eval-mode BatchNorm's running statistics are part of the point."""
    unknown = [k for k in at if k not in named and k not in buffers]
    if unknown:
        raise ValueError(f"at names no parameter or buffer of the model: {unknown}; its parameters: {list(named)}, "
                         f"its buffers: {list(buffers)}")
    params, values = dict(named), dict(buffers)
    for k, value in at.items():
        own = named[k] if k in named else buffers[k]
        what = "parameter" if k in named else "buffer"
        if own is None or tuple(value.shape) != tuple(own.shape) or value.dtype != own.dtype:
            raise ValueError(
                f"at[{k!r}] has shape {tuple(value.shape)} and dtype {value.dtype}, but the {what} has "
                + ("no value" if own is None else f"shape {tuple(own.shape)} and dtype {own.dtype}")
            )
        if k in named:
            params[k] = value.detach().requires_grad_(own.requires_grad) if value.is_leaf else value
        else:
            values[k] = value.detach()
    return params, values


def _summed(parts: List[Tuple[float, Callable[[Tree], Tree]]]) -> Callable[[Tree], Tree]:
    def summed(v: Tree) -> Tree:
        acc = None
        for weight, mv in parts:
            hv = mv(v)
            acc = scale(weight, hv) if acc is None else axpy(weight, hv, acc)
        return acc

    return summed


def _reduction(loss_fn: Any, reduction: Optional[str]) -> str:
    """How several batches' losses combine: the ``torch.nn`` loss's own reduction, or the
    one the user gave; never a guess."""
    own = getattr(loss_fn, "reduction", None) if isinstance(loss_fn, nn.Module) else None
    if own is not None:
        kind = {"mean": "mean", "batchmean": "mean", "sum": "sum"}.get(own)
        if kind is None:
            raise ValueError(
                f"loss_fn has reduction={own!r}: its output is not a scalar; use 'mean' or 'sum'"
            )
        if reduction is not None and reduction != kind:
            raise ValueError(f"reduction={reduction!r} contradicts loss_fn.reduction={own!r}")
        return kind
    if reduction is None:
        raise ValueError(
            "several batches and a loss whose reduction hvpfunc cannot know (a plain callable): "
            "pass reduction='mean' (the mean over all examples; batch_size= says how many a "
            "batch holds if not len(targets)) or reduction='sum' (the batches' losses added)"
        )
    return reduction


def _shares(sizes: List[float], kind: str) -> List[float]:
    """The batches' weights in the loss over all of them: m_b / Σ m_c for "mean", the
    sizes themselves (1 each) for "sum"."""
    total = sum(sizes) if kind == "mean" else 1.0
    return [m / total for m in sizes]


def _weigher(kind: str, loss_fn: Any, forward: Callable, params: Dict[str, Tensor],
             batch_size: Optional[Callable[[Batch], int]]) -> Callable[[Batch], float]:
    """What each batch's loss averages over (m_b), or 1 for sums."""
    if kind == "sum":
        return lambda batch: 1.0
    if batch_size is not None:
        return lambda batch: float(batch_size(batch))
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        summed = copy.copy(loss_fn)
        summed.reduction = "sum"

        def elements(batch: Batch) -> float:
            x, y = batch
            with without_gradients():
                out = forward(params, x)
                mean, total = float(loss_fn(out, y)), float(summed(out, y))
            if mean != 0.0 and math.isfinite(total / mean):
                return total / mean
            return float(y.numel())  # a zero loss: count the targets' elements

        return elements

    def examples(batch: Batch) -> float:
        y = batch[1]
        if y.dim() == 0:
            raise ValueError(
                "targets without a batch dimension: pass batch_size= to say how many examples a batch holds"
            )
        return float(y.shape[0])

    return examples


def _fingerprint(batch: Batch) -> tuple:
    """Shapes, dtypes and two moments of every tensor in a batch: equal for the same
    data, different after shuffling or random augmentation."""
    out = []
    for t in torch.utils._pytree.tree_leaves(batch):
        if isinstance(t, Tensor):
            d = t.detach().double()
            out.append((tuple(t.shape), t.dtype, float(d.sum()), float((d * d).sum())))
    return tuple(out)


def _streamed(stream: Iterable, loss: Callable, params: Dict[str, Tensor], mode: str,
              weigh: Callable[[Batch], float], kind: str, check_data: bool, dropouts,
              written: Callable[[], Optional[str]]) -> Matvec:
    """A matvec that reads the data once per product, one batch alive at a time."""
    if mode not in ("auto", "forward-over-reverse", "reverse-over-reverse-recomputed"):
        raise ValueError(
            f"mode={mode!r} with streamed data: every product recomputes each batch, so only "
            "'auto', 'forward-over-reverse' or 'reverse-over-reverse-recomputed' apply; pass "
            "the batches as a list to keep stored products in memory"
        )
    weights, prints, per_batch = [], [], mode
    with _explained_randomness(dropouts, written):
        for i, batch in enumerate(stream):
            batch = usable(_checked(batch, i))
            if i == 0:
                inspection = inspect(scalar_fn(loss), params, batch, {})
                refuse_fused_attention(inspection, mode)
                if mode == "auto":
                    per_batch = memory_light_mode(loss, params, batch, {}, inspection)
            weights.append(weigh(batch))
            prints.append(_fingerprint(batch) if check_data else None)
    if not weights:
        raise ValueError("data holds no batches")
    weights = _shares(weights, kind)
    product = BUILDERS[per_batch]

    def streamed(v: Tree) -> Tree:
        acc, count = None, 0
        for i, batch in enumerate(_outside_transforms(stream)):
            batch = usable(_checked(batch, i))
            if i >= len(weights):
                raise RuntimeError(f"the data gave more than the {len(weights)} batches it gave when read first")
            if check_data and _fingerprint(batch) != prints[i]:
                raise RuntimeError(
                    f"batch {i} differs from the one read first: the data changes between passes "
                    "(DataLoader(shuffle=True), random augmentation, a random sampler), so products "
                    "would mix different Hessians. Use a fixed order and deterministic transforms, "
                    "or pass check_data=False if the data repeats and only its fingerprint changes."
                )
            with differentiable_kernels():
                hv = product(loss, params, batch, {})(v)
            acc = scale(weights[i], hv) if acc is None else axpy(weights[i], hv, acc)
            count = i + 1
        if count != len(weights):
            raise RuntimeError(
                f"the data gave {count} batches on this pass but {len(weights)} when read first"
                + (": an iterator or generator can be read only once; pass a list or a DataLoader"
                   if count == 0 else "")
            )
        return acc

    return Matvec(Fixed(streamed, per_batch), params)


@contextlib.contextmanager
def _explained_randomness(dropouts: List[Tuple[str, nn.Module, float]],
                          written: Callable[[], Optional[str]]) -> Iterator[None]:
    """Say why two evaluations of the loss differed: a forward pass that writes to the
    model's tensors (spectral_norm's vectors in training mode), or randomness the dropout
    switch cannot reach."""
    try:
        yield
    except ValueError as err:
        if "not deterministic" not in str(err):
            raise
        _refuse_writes(written())
        switched = ", ".join(f"'{name}'" for name, _, _ in dropouts)
        raise ValueError(
            "the loss is not deterministic"
            + (f" even with dropout switched off at {switched}" if switched else "")
            + ": the randomness comes from code hvpfunc cannot switch off, such as "
            "torch.nn.functional.dropout(..., training=True) or sampling in forward(). Call "
            f"model.eval() or make forward() deterministic. ({err})"
        ) from None


def _refuse_writes(name: Optional[str]) -> None:
    """Raise ``ValueError`` if the forward pass wrote to the copy ``name`` in place."""
    if name is not None:
        raise ValueError(
            f"the forward pass writes to '{name}' in place (e.g. Embedding(max_norm=...) renormalizes "
            "its rows, spectral_norm updates its vectors in training mode, a counter in a buffer): the "
            "point of the Hessian would move with every product. Apply the update once and evaluate a "
            "forward that does not write (model.eval() for spectral_norm, max_norm=None, "
            "torch.nn.utils.parametrize.remove_parametrizations). The module itself was not modified: "
            "hvpfunc works on copies."
        )


def _outside_transforms(stream: Iterable) -> Iterator[Any]:
    """The batches of ``stream``, read outside any ``torch.func`` transform: a matvec runs
    under ``vmap`` over tangents, where a DataLoader's seed draw on ``iter()`` would be a
    random operation inside the transform (an error); the data are not batched anyway."""
    with torch._C._DisableFuncTorch():
        it = iter(stream)
    while True:
        with torch._C._DisableFuncTorch():
            batch = next(it, _END)
        if batch is _END:
            return
        yield batch


_END = object()


def _source(data: Any) -> Tuple[Optional[Batch], List[Batch], Optional[Iterable]]:
    """(one batch, None, None), (None, batches in memory, None) or (None, [], a stream)."""
    if _is_batch(data):
        return tuple(data), [], None
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError("data holds no batches")
        batches = [_checked(batch, i) for i, batch in enumerate(data)]
        return (batches[0] if len(batches) == 1 else None), batches, None
    try:
        it = iter(data)
    except TypeError as err:
        raise ValueError(
            "data must be an (inputs, targets) batch or an iterable of such batches, got "
            f"{type(data).__name__}"
        ) from err
    if it is data:  # an iterator (a generator): read here, it would be empty at the first product
        raise ValueError(
            f"data is an iterator ({type(data).__name__}), which can be read only once, but every "
            "product reads the data again: pass a list of batches (held in memory) or a re-iterable "
            "such as a DataLoader (streamed)"
        )
    return None, [], data


def _checked(batch: Any, i: int) -> Batch:
    if not _is_batch(batch):
        raise ValueError(f"data[{i}] is not an (inputs, targets) pair with a tensor of targets")
    return tuple(batch)


def _is_batch(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], Tensor)


def _as_call(x: Any, unpack: bool) -> Tuple[tuple, ...]:
    """functional_call's (args,) or (args, kwargs) for model(x), model(*x), model(**x)."""
    if unpack and isinstance(x, Mapping):
        return ((), dict(x))
    if unpack and type(x) in (tuple, list):  # not namedtuples such as PackedSequence
        return (tuple(x),)
    return ((x,),)


def _fused_attention(model: nn.Module) -> Optional[str]:
    """The third-party fused attention a model declares, if any: a Hugging Face config that
    asks for flash attention, or a module of the flash_attn or xformers packages (older
    flash-attn calls its CUDA extension directly, which the operator trace cannot see)."""
    for name, module in model.named_modules():
        implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(implementation, str) and "flash" in implementation:
            return f"attn_implementation={implementation!r} (the config of '{name or type(model).__name__}')"
        if type(module).__module__.split(".")[0] in ("flash_attn", "xformers"):
            return f"{type(module).__module__}.{type(module).__name__} at '{name}'"
    return None


def _read_only_buffers(model: nn.Module, values: Dict[str, Any]) -> Dict[str, Any]:
    """Buffers to pass to functional_call (``values``, by name): normalization layers in
    training mode get no running statistics, so they normalize with the batch's and
    update nothing."""
    buffers: Dict[str, Any] = dict(values)
    for prefix, module in model.named_modules():
        if isinstance(module, _NormBase) and module.training and module.track_running_stats:
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                key = f"{prefix}.{name}" if prefix else name
                if key in buffers:
                    buffers[key] = None
    return buffers


def _sparse_embeddings(model: nn.Module) -> List[Tuple[str, nn.Module, None]]:
    """Embeddings with ``sparse=True``, whose sparse weight gradients torch cannot
    differentiate again (products raised "Could not run 'aten::view' with arguments from
    the 'SparseCPU' backend")."""
    return [(name, module, None) for name, module in model.named_modules()
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse]


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
def _switched_off(switches: List[Tuple[str, nn.Module, Any]]) -> Iterator[None]:
    """Switch the given modules for the duration of one loss evaluation: dropout off
    (recurrent layers and attention by their ``dropout`` attribute), sparse embeddings
    to dense gradients."""
    saved = []
    for _, module, _ in switches:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            saved.append((module, "sparse", module.sparse))
            module.sparse = False
        elif isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
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
