"""Hypergradients through an inner optimum by the implicit function theorem."""

from __future__ import annotations

import inspect
import math
import warnings
from types import MappingProxyType
from typing import Any, Callable, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from .._operator import attainable_tol
from .._outcome import finish
from .._precision import plain_autograd, user_stacklevel
from .._products.api import hvp_fn, usable
from .._sharding import is_dtensor, whole
from .._types import Mode, Solver, Tree
from ..results import ConvergenceWarning, SolveResult, Status
from ..tree import check_tree, dot, leaves_with_paths, norm, sub
from .cg import cg
from .minres import minres
from .neumann import neumann

_SOLVERS = {"cg": cg, "minres": minres, "neumann": neumann}


def hypergradient(
    inner_loss: Callable[[Tree, Tree], Tensor],
    outer_loss: Callable[[Tree, Tree], Tensor],
    params: Tree,
    hparams: Tree,
    *,
    solver: Solver = "cg",
    mode: Mode = "auto",
    stationarity_tol: float = 1e-3,
    **solver_options: Any,
) -> Tuple[Tree, SolveResult]:
    """d outer / d hparams through the inner optimum w*(λ), by implicit differentiation.

    At a stationary point ∇_w L_in(w*, λ) = 0 the implicit function theorem gives
    dw*/dλ = −H⁻¹ ∂²L_in/∂w∂λ with H = ∂²L_in/∂w², hence

    .. math:: \\frac{d L_{out}}{d\\lambda} = \\frac{\\partial L_{out}}{\\partial\\lambda}
              - \\frac{\\partial^2 L_{in}}{\\partial\\lambda\\,\\partial w}\\,
              H^{-1} \\frac{\\partial L_{out}}{\\partial w}

    computed without any Jacobian: v = H⁻¹ ∂L_out/∂w by ``solver`` on the matvec
    ``hvp_fn(inner_loss, params, hparams)``, then the mixed term as one vector-Jacobian
    product of λ ↦ ⟨∇_w L_in(w, λ), v⟩.

    Args:
        inner_loss: ``inner_loss(params, hparams)``, a scalar (the training loss).
        outer_loss: ``outer_loss(params, hparams)``, a scalar (the validation loss); it
            need not depend on ``hparams``.
        params: the inner solution w, a pytree at (or near) a minimum of ``inner_loss``.
            Its leaves may be sharded DTensors (FSDP2): the losses then gather what they
            use (e.g. ``w.redistribute(mesh, [Replicate()]).to_local(grad_placements=
            [Partial("avg")])``), derivatives go through plain autograd (torch.func's
            transforms do not carry DTensors), ``mode="auto"`` is the reused graph, and
            the solve keeps each rank's shards.
        hparams: λ, a pytree of floating tensors.
        solver: ``"cg"`` (default; fast, and reports negative curvature), ``"minres"``
            (for an inner point that is not a strict minimum, where H is indefinite) or
            ``"neumann"`` (Lorraine et al.'s choice; reports divergence).
        mode: how the matvec computes products, as in :func:`hvpfunc.hvp_fn`.
        stationarity_tol: params must be within ``stationarity_tol · ‖params‖`` of a
            stationary point of ``inner_loss`` (the Newton distance along its gradient,
            one extra product); otherwise the result's ``message`` and a
            :class:`~hvpfunc.ConvergenceWarning` say the theorem does not apply (``status``
            stays the solve's), and ``stats`` holds ``inner_gradient_norm`` and
            ``distance_to_stationary``.
        **solver_options: passed to the solver: ``tol``, ``damping``, ``max_iters`` for
            CG and MINRES; ``alpha``, ``num_terms``, ``tol``, ``damping`` for Neumann.

    Returns:
        ``(hypergradient, solve_result)``: a tree shaped like ``hparams``, and the linear
        solve's :class:`~hvpfunc.SolveResult`. Parameters ``inner_loss`` does not use are
        held fixed (the inner problem does not move them; ``stats["held_fixed"]`` lists
        them). ``"inconsistent"`` means the inner Hessian is singular on directions the
        outer gradient needs (the inner optimum is not unique there). If the solve did not converge the result
        says so (and a :class:`~hvpfunc.ConvergenceWarning` was issued): the
        hypergradient is then only as good as that solve's ``x``, which is finite.

    Raises:
        ValueError: unknown solver, non-scalar losses, or a non-finite ∂L_out/∂w or
            ∂L_out/∂λ (the message names the leaf).

    Example:
        Ridge regression, inner optimum w* = (XᵀX + λI)⁻¹Xᵀy:

        >>> import torch, hvpfunc as hf
        >>> g = torch.Generator().manual_seed(0)
        >>> X, y = torch.randn(20, 3, generator=g).double(), torch.randn(20, generator=g).double()
        >>> Xv, yv = torch.randn(10, 3, generator=g).double(), torch.randn(10, generator=g).double()
        >>> inner = lambda w, lam: 0.5 * ((X @ w - y) ** 2).sum() + 0.5 * lam * (w ** 2).sum()
        >>> outer = lambda w, lam: 0.5 * ((Xv @ w - yv) ** 2).sum()
        >>> lam = torch.tensor(1.0, dtype=torch.float64)
        >>> w_star = lambda lam: torch.linalg.solve(X.T @ X + lam * torch.eye(3, dtype=torch.float64), X.T @ y)
        >>> hg, info = hf.hypergradient(inner, outer, w_star(lam), lam, tol=1e-10)
        >>> exact = torch.func.grad(lambda lam: outer(w_star(lam), lam))(lam)   # through the closed form
        >>> bool(torch.allclose(hg, exact)), info.status
        (True, <Status.CONVERGED: 'converged'>)

    References:
        Bengio, "Gradient-based optimization of hyperparameters", Neural Comput. 12
        (2000); Pedregosa, "Hyperparameter optimization with approximate gradient",
        ICML (2016); Lorraine, Vicol & Duvenaud, AISTATS (2020).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"solver must be one of {tuple(_SOLVERS)}, got {solver!r}")
    check_tree(params, name="params")
    check_tree(hparams, name="hparams")
    # raise a tolerance the parameters' precision cannot meet here, so that the warning
    # names hypergradient rather than the solver inside it
    eps = max(torch.finfo(leaf.dtype).eps for leaf in pytree.tree_leaves(params) if leaf.is_floating_point())
    default_tol = inspect.signature(_SOLVERS[solver]).parameters["tol"].default
    solver_options = {**solver_options, "tol": attainable_tol(solver_options.get("tol", default_tol), eps,
                                                              f"hypergradient(solver={solver!r})")}
    with plain_autograd():  # autograd refuses inference tensors (cloned out); no autocast
        params, hparams = usable(params), usable(hparams)
        grad, result = _hypergradient(inner_loss, outer_loss, params, hparams, solver, mode, stationarity_tol,
                                      solver_options)
    return grad, finish(result, f"hypergradient(solver={solver!r})")


def _hypergradient(inner_loss, outer_loss, params, hparams, solver, mode, stationarity_tol,
                                      solver_options):
    sharded = any(map(is_dtensor, pytree.tree_leaves(params)))
    if sharded and mode == "auto":
        mode = "reverse-over-reverse"  # a fixed choice: every rank must make the same collectives
    grad_out_w, grad_out_h = _gradients(outer_loss, params, hparams, sharded)
    _check_finite(grad_out_w, "d outer_loss / d params")
    _check_finite(grad_out_h, "d outer_loss / d hparams")
    # Parameters the inner loss does not use have zero rows and columns in H and no mixed
    # term: the inner problem does not move them (dw/dλ = 0 there), so the outer
    # gradient's part on them drops out of the solve instead of making it inconsistent.
    held = _unused_by(inner_loss, params, hparams)
    if held:
        grad_out_w = pytree.tree_unflatten(
            [torch.zeros_like(g) if unused else g for g, unused in zip(pytree.tree_leaves(grad_out_w), held)],
            pytree.tree_structure(grad_out_w),
        )
    matvec = hvp_fn(inner_loss, params, hparams, mode=mode)
    with warnings.catch_warnings():
        # hypergradient warns once, with its own message, for the solve's outcome
        warnings.simplefilter("ignore", ConvergenceWarning)
        result = _SOLVERS[solver](matvec, grad_out_w, **solver_options)
    if held:
        paths = [path for (path, _), unused in zip(leaves_with_paths(params)[0], held) if unused]
        result = result._replace(stats=MappingProxyType({**result.stats, "held_fixed": paths}))
    if result.status is Status.INCONSISTENT:
        result = result._replace(message=(
            "the inner Hessian is singular on directions the outer gradient needs: the inner "
            "optimum is not unique there (e.g. collinear features without regularization), so "
            "the hypergradient is not defined by the implicit function theorem. Regularize the "
            "inner loss, pass damping=..., or solver='minres' for the least-squares choice. "
            f"The solver said: {result.message}"
        ))
    g, mixed = _mixed(inner_loss, params, hparams, result.x, sharded)
    result = _check_stationary(g, matvec, params, stationarity_tol, result)
    return sub(grad_out_h, mixed), result


def _gradients(loss: Callable[[Tree, Tree], Tensor], params: Tree, hparams: Tree, sharded: bool) -> Tuple[Tree, Tree]:
    """(d loss / d params, d loss / d hparams): torch.func, or plain autograd for sharded
    (DTensor) parameters, which torch.func's transforms do not carry."""
    if not sharded:
        return torch.func.grad(loss, argnums=(0, 1))(params, hparams)
    (w, w_spec), (h, h_spec) = _inputs(params), _inputs(hparams)
    with torch.enable_grad():
        out = loss(pytree.tree_unflatten(w, w_spec), pytree.tree_unflatten(h, h_spec))
        grads = torch.autograd.grad(out, w + h, allow_unused=True, materialize_grads=True)
    return pytree.tree_unflatten(list(grads[: len(w)]), w_spec), pytree.tree_unflatten(list(grads[len(w):]), h_spec)


def _mixed(inner_loss: Callable[[Tree, Tree], Tensor], params: Tree, hparams: Tree, x: Tree,
           sharded: bool) -> Tuple[Tree, Tree]:
    """(∇_w inner, (∂²inner / ∂λ∂w) x): the inner gradient and the mixed term, as a
    vector-Jacobian product of the inner gradient with respect to λ."""
    if not sharded:
        grad_in_w = torch.func.grad(inner_loss, argnums=0)
        (g, vjp_fn) = torch.func.vjp(lambda h: grad_in_w(params, h), hparams)
        return g, vjp_fn(x)[0]
    (w, w_spec), (h, h_spec) = _inputs(params), _inputs(hparams)
    with torch.enable_grad():
        out = inner_loss(pytree.tree_unflatten(w, w_spec), pytree.tree_unflatten(h, h_spec))
        g = torch.autograd.grad(out, w, create_graph=True, allow_unused=True, materialize_grads=True)
        mixed = torch.autograd.grad(g, h, pytree.tree_leaves(x), allow_unused=True, materialize_grads=True)
    return pytree.tree_unflatten([t.detach() for t in g], w_spec), pytree.tree_unflatten(list(mixed), h_spec)


def _inputs(tree: Tree) -> Tuple[list, Any]:
    leaves, spec = pytree.tree_flatten(tree)
    return [leaf.detach().requires_grad_(leaf.is_floating_point()) for leaf in leaves], spec


def _check_stationary(g: Tree, matvec, params: Tree, tol: float, result: SolveResult) -> SolveResult:
    """The implicit function theorem holds at a stationary point only. The Newton
    distance along the inner gradient g, ‖g‖³ / gᵀHg (one product), says how far params
    is from one; beyond ``tol · ‖params‖`` the hypergradient is not the derivative of
    anything, and the result says so (its message, stats and a warning)."""
    g_norm = _number(norm(g))
    if g_norm == 0.0:
        return result
    curvature = _number(dot(g, matvec(g)))
    distance = g_norm**3 / curvature if curvature > 0 else math.inf
    stats = {**result.stats, "inner_gradient_norm": g_norm, "distance_to_stationary": distance}
    result = result._replace(stats=MappingProxyType(stats))
    if distance > tol * _number(norm(params)):
        said = (
            f"params is not a stationary point of inner_loss (‖∇_w inner‖ = {g_norm:.3g}, "
            f"about {distance:.3g} from one along the gradient, against ‖params‖ = {_number(norm(params)):.3g}): "
            "the implicit function theorem does not apply there, so the hypergradient is not the "
            "derivative of the outer loss through the inner optimum. Train the inner problem further, "
            "or raise stationarity_tol if an approximate hypergradient is what you want."
        )
        # in the result too: a caller that reads status and message, not warnings, must see it
        result = result._replace(message=f"{said} {result.message}".strip())
        if result.status is Status.CONVERGED:  # otherwise finish's warning carries the message
            warnings.warn(f"hypergradient: {said}", ConvergenceWarning, stacklevel=user_stacklevel())
    return result


def _unused_by(inner_loss: Callable[[Tree, Tree], Tensor], params: Tree, hparams: Tree) -> list:
    """For each leaf of params, whether inner_loss ignores it (autograd finds no path);
    an empty list when it uses them all."""
    leaves, spec = pytree.tree_flatten(params)
    inputs = [leaf.detach().requires_grad_(True) for leaf in leaves]
    with torch.enable_grad():
        out = inner_loss(pytree.tree_unflatten(inputs, spec), hparams)
        grads = torch.autograd.grad(out, inputs, allow_unused=True)
    unused = [g is None for g in grads]
    return unused if any(unused) else []


def _number(t: Tensor) -> float:
    """A 0-dim result as a float (a DTensor's over all ranks)."""
    return float(whole(t))


def _check_finite(tree: Tree, what: str) -> None:
    for path, leaf in leaves_with_paths(tree)[0]:
        if not _number(torch.isfinite(leaf).all()):
            raise ValueError(f"{what} is not finite at {path}; check the losses at params")
