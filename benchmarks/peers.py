"""Adapters for the peers, each optional: PyHessian, hessian-eigenthings, curvlinops.

Every adapter returns None when its package is not installed; ``pip install
'hvpfunc[bench]'`` brings all three.
"""

from __future__ import annotations

import copy
import warnings
from typing import Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

Batch = Tuple[Tensor, Tensor]


def installed() -> Dict[str, bool]:
    found = {}
    for name, module in (("PyHessian", "pyhessian"), ("hessian-eigenthings", "hessian_eigenthings"), ("curvlinops", "curvlinops")):
        try:
            __import__(module)
            found[name] = True
        except ImportError:
            found[name] = False
    return found


def pyhessian(model: nn.Module, batch: Batch):
    """PyHessian's ``hessian`` object (its graph built once, reused by every product)."""
    try:
        from pyhessian import hessian
    except ImportError:
        return None
    model = copy.deepcopy(model)
    with warnings.catch_warnings():  # its backward(create_graph=True) warns about cycles
        warnings.simplefilter("ignore", UserWarning)
        return hessian(model, nn.CrossEntropyLoss(), data=batch, cuda=batch[0].is_cuda)


def pyhessian_matvec(h) -> Callable[[List[Tensor]], Tuple[Tensor, ...]]:
    from pyhessian.utils import hessian_vector_product

    return lambda v: hessian_vector_product(h.gradsH, h.params, v)


def eigenthings_operator(model: nn.Module, batch: Batch):
    """hessian-eigenthings' ``HessianOperator``: double backward recomputed per product."""
    try:
        from hessian_eigenthings import HessianOperator
    except ImportError:
        return None

    def loss_fn(m: nn.Module, b: Batch) -> Tensor:
        return nn.functional.cross_entropy(m(b[0]), b[1])

    return HessianOperator(model, [batch], loss_fn)


def curvlinops_operator(model: nn.Module, batch: Batch):
    """curvlinops' ``HessianLinearOperator`` (``jvp(jacrev)``, vmapped over columns)."""
    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    return HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch], check_deterministic=False)


def counted(fn: Callable, counter: Dict[str, int], key: str = "n", per_call: Optional[Callable] = None) -> Callable:
    """Wrap ``fn`` to count its calls (or ``per_call(args)`` products per call)."""

    def wrapped(*args, **kwargs):
        counter[key] = counter.get(key, 0) + (per_call(*args) if per_call else 1)
        return fn(*args, **kwargs)

    return wrapped
