"""Trace: a member as a torch.fx graph, with its leaf modules rewritten into operations the rules know.

Module types the caller names as *leaves* are kept whole by the tracer
(e.g. a dropout whose frozen mask depends on the input shape, which cannot be
traced through); each may come with a :data:`LeafRewrite` that replaces its
calls, once an example shows their input shapes, by plain graph operations
(e.g. a product with the mask as a constant).
"""

from __future__ import annotations

import copy
import functools
import inspect
import operator
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.nn import functional

INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
    functional.relu_: functional.relu,
}

LeafRewrite = Callable[[fx.GraphModule, fx.Node, torch.Tensor], fx.Node]
"""Replaces one call of a leaf module: ``rewrite(gm, call, example_input) -> replacement``.

Called with the graph's insertion point before ``call`` and the value the
call's input has on the example; it adds the nodes computing the same
operation (registering any constants on ``gm``) and returns the node whose
value replaces the call's.
"""

Leaves = Mapping[type[nn.Module], LeafRewrite | None]
"""Module types kept whole by the tracer, each with the rewrite of its calls (``None``: left as calls)."""


def trace(member: nn.Module, leaves: Collection[type[nn.Module]] = ()) -> fx.GraphModule | None:
    """Symbolically trace ``member``, binding optional forward arguments to their defaults.

    Parameters
    ----------
    member
        The module to trace.
    leaves
        Module types to keep as single ``call_module`` nodes, in addition to
        torch's own leaves.

    Returns
    -------
    GraphModule or None
        ``None`` for TorchScript modules, forwards with a second required
        argument, and anything torch.fx cannot trace.
    """
    if isinstance(member, torch.jit.ScriptModule):
        return None
    try:
        parameters = list(inspect.signature(member.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if not parameters or parameters[0].kind not in (parameters[0].POSITIONAL_ONLY, parameters[0].POSITIONAL_OR_KEYWORD):
        return None
    concrete: dict[str, Any] = {}
    for p in parameters[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            return None
        concrete[p.name] = p.default
    tracer = _Tracer(tuple(leaves))
    try:
        graph = tracer.trace(member, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - any tracing failure means "not analysable"
        return None
    return fx.GraphModule(tracer.root, graph, type(member).__name__)


class _Tracer(fx.Tracer):
    """The default tracer, keeping instances of the ``leaves`` types whole."""

    def __init__(self, leaves: tuple[type[nn.Module], ...]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, module_qualified_name)


def rewrite_leaves(gm: fx.GraphModule, leaves: Leaves, example: torch.Tensor) -> None:
    """Replace each call of a leaf module that has a rewrite, in place.

    The rewrites see the value the call's input has on ``example`` (a batch,
    so a constant drawn for one example's shape is ``value.shape[1:]``).
    """
    rewrites = {kind: rewrite for kind, rewrite in leaves.items() if rewrite is not None}
    targets = []
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        rewrite = next((r for kind, r in rewrites.items() if isinstance(module, kind)), None)
        if rewrite is not None:
            targets.append((node, rewrite))
    if not targets:
        return
    calls = {n: node_call(gm, n) for n in gm.graph.nodes if n.op.startswith("call_")}
    values = run_example(gm, calls, example)
    for node, rewrite in targets:
        with gm.graph.inserting_before(node):
            replacement = rewrite(gm, node, values[node.args[0]])
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.recompile()


def node_call(gm: fx.GraphModule, node: fx.Node) -> Callable[..., Any]:
    """The operation of a call node, with in-place variants replaced by out-of-place ones.

    Cached reference activations must never be modified, so ``relu_``,
    ``ReLU(inplace=True)``, ``x += y`` etc. run out of place, and ``view``
    runs as ``reshape``.
    """
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if getattr(module, "inplace", False):
            module = copy.copy(module)
            module.inplace = False
        return module
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            name = name[:-1]
        # Activations may be channels-last; reshape is view's out-of-place equivalent.
        return _method("reshape" if name == "view" else name)
    target = INPLACE_FUNCTIONS.get(node.target, node.target)
    if node.kwargs.get("inplace"):
        return functools.partial(_without_inplace, target)
    return target


def _method(name: str) -> Callable[..., Any]:
    def call(obj: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(obj, name)(*args, **kwargs)

    return call


def _without_inplace(target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return target(*args, **{**kwargs, "inplace": False})


def attribute(gm: fx.GraphModule, path: str) -> Any:
    """The value of a ``get_attr`` target."""
    return functools.reduce(getattr, path.split("."), gm)


def run_example(gm: fx.GraphModule, calls: dict[fx.Node, Callable[..., Any]], x: torch.Tensor) -> dict[fx.Node, Any]:
    """Evaluate every node on ``x``, recording each value."""
    values: dict[fx.Node, Any] = {}
    first = True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            values[node] = x if first else (node.args[0] if node.args else None)
            first = False
        elif node.op == "get_attr":
            values[node] = attribute(gm, str(node.target))
        elif node.op == "output":
            values[node] = map_arg(node.args[0], values.__getitem__)
        else:
            args = map_arg(node.args, values.__getitem__)
            kwargs = map_arg(node.kwargs, values.__getitem__)
            values[node] = calls[node](*args, **kwargs)
    return values
