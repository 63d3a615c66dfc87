"""Trace a member with torch.fx and plan how to run it on single-base mutants.

Every node of the traced graph gets a :class:`Kind`:

- ``CONST``: does not depend on the input; evaluated once, at planning.
- ``META``: Python values computed from shapes (``x.shape[2] - 10``);
  re-evaluated per call from the shapes the full activations would have.
- ``LOCAL``: an activation ``(batch, channels, length)`` computed as a window
  of changed columns per mutant (static :data:`Extent`), the rest being the
  reference of the mutant's locus.
- ``RANGE``: an activation computed in full for each mutant, but only over
  the columns ``[lo, hi)`` that later nodes read (e.g. before a crop).
- ``DELTA``: an output without a sequence axis computed from a window
  (mean over length, ``Flatten -> Linear``).
- ``FUSED``: a flattening whose only user is a ``Linear`` with a delta rule;
  computed for references only.
- ``PLAIN``: anything else that depends on the input; run as the model runs
  it, on full activations.

A node is LOCAL when a rule in :mod:`deepmr_dist.ism.incremental_rules`
covers it and all its sequence-axis inputs are LOCAL, and becomes RANGE once
its window would be as wide as the columns it must provide.
"""

from __future__ import annotations

import copy
import enum
import functools
import inspect
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from deepmr_dist.ism import incremental_rules as R
from deepmr_dist.models.ensemble import FrozenDropout

INPLACE_FUNCTIONS: dict[Any, Any] = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
    torch.relu_: torch.relu,
    F.relu_: F.relu,
}


class Kind(enum.Enum):
    """How a node is computed for mutants (see the module docstring)."""

    CONST = "const"
    META = "meta"
    LOCAL = "local"
    RANGE = "range"
    DELTA = "delta"
    FUSED = "fused"
    PLAIN = "plain"


@dataclass
class Step:
    """One node of the plan."""

    node: fx.Node
    kind: Kind
    call: Callable[..., Any] | None = None
    rule: R.Rule | None = None
    delta: R.DeltaRule | None = None
    length: int = 0
    extent: R.Extent = (0, 0)
    lo: int = 0
    hi: int = 0

    @property
    def tracked(self) -> bool:
        """Whether the node carries the sequence axis (LOCAL or RANGE)."""
        return self.kind in (Kind.LOCAL, Kind.RANGE)


@dataclass
class Plan:
    """The analysed graph of one member at one sequence length."""

    steps: dict[fx.Node, Step]
    x: fx.Node
    outputs: Any
    length: int
    consts: dict[fx.Node, Any]
    shapes: dict[fx.Node, torch.Tensor]
    """Meta tensors with the shape and dtype of each tracked node for a batch of two."""
    pads: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)
    finite: bool = False
    """Whether window columns outside the sequence always hold finite values (no log, exp, division...)."""

    def step(self, node: fx.Node) -> Step:
        """The step of ``node``."""
        return self.steps[node]


# --------------------------------------------------------------------------- tracing


def trace(member: nn.Module) -> fx.GraphModule | None:
    """Symbolically trace ``member``, binding optional forward arguments to their defaults.

    Returns ``None`` for TorchScript modules, forwards with a second required
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
    tracer = _Tracer()
    try:
        graph = tracer.trace(member, concrete_args=concrete or None)
    except Exception:  # noqa: BLE001 - any tracing failure means "not analysable"
        return None
    return fx.GraphModule(tracer.root, graph, type(member).__name__)


class _Tracer(fx.Tracer):
    """The default tracer, keeping :class:`FrozenDropout` whole (its mask depends on the input shape)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, FrozenDropout) or super().is_leaf_module(m, module_qualified_name)


def freeze_masks(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Replace each :class:`FrozenDropout` call by a product with its mask, stored as a constant.

    The mask is drawn for the shape its input has on ``example`` (one example, batch excluded);
    as a constant with a length axis it is then read per window like any other.
    """
    calls = {n: node_call(gm, n) for n in gm.graph.nodes if n.op.startswith("call_")}
    values = run_example(gm, calls, example)
    for index, node in enumerate(list(gm.graph.nodes)):
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if not isinstance(module, FrozenDropout):
            continue
        source = values[node.args[0]]
        name = f"_frozen_dropout_mask_{index}"
        gm.register_buffer(name, module.mask(tuple(source.shape[1:]), source.device).to(source.dtype))
        with gm.graph.inserting_before(node):
            product = gm.graph.call_function(operator.mul, (node.args[0], gm.graph.get_attr(name)))
        node.replace_all_uses_with(product)
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


# --------------------------------------------------------------------------- analysis


class _Analysis:
    """Builds a :class:`Plan` from a traced graph and the values of one example run."""

    def __init__(
        self, gm: fx.GraphModule, length: int, example: torch.Tensor, outputs: Sequence[int] | None
    ) -> None:
        self.gm = gm
        self.length = length
        self.batch = example.shape[0]
        nodes = list(gm.graph.nodes)
        self.x = next(n for n in nodes if n.op == "placeholder")
        self.output = next(n for n in nodes if n.op == "output")
        self.outputs = _select_outputs(self.output.args[0], outputs)
        self.live = _ancestors(self.outputs)
        self.calls = {n: node_call(gm, n) for n in nodes if n.op.startswith("call_")}
        self.values = run_example(gm, self.calls, example)
        self.steps: dict[fx.Node, Step] = {}
        self.tainted: set[fx.Node] = set()

    # ------------------------------------------------------------------ classification

    def classify(self) -> None:
        """Assign every node its kind (before saturation)."""
        for node in self.gm.graph.nodes:
            if node not in self.live:
                continue
            if node is self.x or any(n in self.tainted for n in node.all_input_nodes):
                self.tainted.add(node)
            self.steps[node] = self._classify(node)

    def _classify(self, node: fx.Node) -> Step:
        call = self.calls.get(node)
        if node is self.x:
            return Step(node, Kind.LOCAL, length=self.length, extent=(0, 1))
        if node not in self.tainted:
            return Step(node, Kind.CONST, call)
        value = self.values[node]
        if not isinstance(value, torch.Tensor):
            has_tensor = isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
            return Step(node, Kind.PLAIN if has_tensor else Kind.META, call)
        rule = self._rule(node) if self._is_sequence(value) else None
        if rule is not None and self._only_inputs(node, rule.sources):
            kinds = {self.steps[s].kind for s in rule.sources}
            if kinds == {Kind.LOCAL}:
                extent = rule.extent([self.steps[s].extent for s in rule.sources])
                return Step(node, Kind.LOCAL, call, rule=rule, length=value.shape[2], extent=extent)
            return Step(node, Kind.RANGE, call, rule=rule, length=value.shape[2])
        if self._is_fused_flatten(node):
            return Step(node, Kind.FUSED, call)
        delta = self._delta(node)
        if delta is not None:
            return Step(node, Kind.DELTA, call, delta=delta)
        return Step(node, Kind.PLAIN, call)

    def _is_sequence(self, value: torch.Tensor) -> bool:
        return value.ndim == 3 and value.shape[0] == self.batch

    def _tracked(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.steps and self.steps[arg].tracked

    def _only_inputs(self, node: fx.Node, sources: tuple[fx.Node, ...]) -> bool:
        """Every input depending on x is a source or a shape value."""
        return all(
            n in sources or self.steps[n].kind in (Kind.META, Kind.CONST) for n in node.all_input_nodes
        ) and all(self._tracked(s) for s in sources)

    # ------------------------------------------------------------------ rules

    def _rule(self, node: fx.Node) -> R.Rule | None:
        return (
            self._conv(node)
            or self._folded_norm(node)
            or self._fused_relu(node)
            or self._crop(node)
            or self._cat(node)
            or self._elementwise(node)
        )

    def _fused_relu(self, node: fx.Node) -> R.Rule | None:
        """A ReLU whose input is a convolution (possibly through folded norms) used only by it."""
        source = node.args[0] if node.args else None
        if not self._is_relu(node) or len(node.args) != 1 or not self._tracked(source):
            return None
        producer = source
        while isinstance(self.steps[producer].rule, R.ElementwiseRule) and self.steps[producer].rule.folded:
            if len(producer.users) != 1:
                return None
            producer = producer.args[0]
        conv = self.steps[producer].rule
        if not isinstance(conv, R.ConvRule) or conv.first_layer or conv.relu or len(producer.users) != 1:
            return None
        if len(source.users) != 1:
            return None
        conv.fuse_relu()
        return R.ElementwiseRule(node, R.identity, [source], [])

    def _is_relu(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self._module(node), nn.ReLU)
        if node.op == "call_method":
            return node.target in ("relu", "relu_")
        return node.op == "call_function" and node.target in R.RELU_FUNCTIONS

    def _folded_norm(self, node: fx.Node) -> R.Rule | None:
        """An eval-mode ``BatchNorm1d`` that is the only user of a convolution: folded into it."""
        module = self._module(node)
        source = node.args[0] if node.args else None
        if not isinstance(module, nn.BatchNorm1d) or module.training or module.running_var is None:
            return None
        if not self._tracked(source) or len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
            return None
        conv = self.steps[source].rule
        if not isinstance(conv, R.ConvRule):
            return None
        scale = torch.rsqrt(module.running_var + module.eps)
        shift = -module.running_mean * scale
        if module.affine:
            scale, shift = scale * module.weight, shift * module.weight + module.bias
        conv.fold(scale.detach(), shift.detach())
        return R.ElementwiseRule(node, R.identity, [source], [])

    def _module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def _conv(self, node: fx.Node) -> R.Rule | None:
        module = self._module(node)
        if isinstance(module, nn.Conv1d) and not node.kwargs and len(node.args) == 1:
            if module.stride != (1,) or module.padding_mode != "zeros":
                return None
            weight, bias = module.weight, module.bias
            dilation, groups, padding = module.dilation[0], module.groups, module.padding
        elif node.op == "call_function" and node.target in (F.conv1d, torch.conv1d):
            bound = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
            if _one(bound.get("stride", 1)) != 1 or any(
                isinstance(bound.get(k), fx.Node) and bound[k] in self.tainted for k in ("weight", "bias")
            ):
                return None
            weight = self._const(bound["weight"])
            bias = self._const(bound.get("bias"))
            dilation, groups = _one(bound.get("dilation", 1)), bound.get("groups", 1)
            padding = bound.get("padding", 0)
        else:
            return None
        source = node.args[0]
        if not self._tracked(source):
            return None
        reach = dilation * (weight.shape[2] - 1)
        if padding == "valid":
            pad_left = 0
        elif padding == "same":
            pad_left = reach // 2
        else:
            pad_left = _one(padding)
        first = source is self.x
        bias = None if bias is None else bias.detach()
        return R.ConvRule(node, source, weight.detach(), bias, dilation, groups, pad_left, first)

    def _const(self, arg: Any) -> Any:
        return self.values[arg] if isinstance(arg, fx.Node) else arg

    def _elementwise(self, node: fx.Node) -> R.Rule | None:
        if not self._is_elementwise(node):
            return None
        out_length = self.values[node].shape[2]
        sources, consts = [], []
        for n in node.all_input_nodes:
            value = self.values[n]
            if n in self.tainted:
                if self._tracked(n):
                    if self.values[n].shape[2] != out_length:
                        return None
                    sources.append(n)
                continue
            if isinstance(value, torch.Tensor):
                if value.ndim > 3 or (value.ndim == 3 and value.shape[0] != 1):
                    return None
                if value.ndim >= 1 and value.shape[-1] != 1:
                    if value.shape[-1] != out_length:
                        return None
                    consts.append(n)
        if not sources:
            return None
        return R.ElementwiseRule(node, self.calls[node], sources, consts)

    def _is_elementwise(self, node: fx.Node) -> bool:
        module = self._module(node)
        if module is not None:
            if module.training:
                return False
            if isinstance(module, R.ELEMENTWISE_MODULES):
                return True
            if isinstance(module, nn.BatchNorm1d):
                return module.running_mean is not None and module.track_running_stats
            if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
                return module.dim in (1, -2)
            return False
        if node.op == "call_method":
            name = str(node.target).rstrip("_")
            if name in R.CHANNEL_METHODS:
                return _dim_arg(node) in (1, -2)
            return name in R.ELEMENTWISE_METHODS
        if node.op != "call_function":
            return False
        target = INPLACE_FUNCTIONS.get(node.target, node.target)
        if target in R.CHANNEL_FUNCTIONS:
            return _dim_arg(node) in (1, -2)
        if target in R.DROPOUT_FUNCTIONS:
            bound = _bind(node, ("input", "p", "training", "inplace"))
            return bound.get("training", True) is False
        if target is F.batch_norm:
            bound = _bind(node, ("input", "running_mean", "running_var", "weight", "bias", "training"))
            return bound.get("training", False) is False and bound["running_mean"] is not None
        return target in R.ELEMENTWISE_FUNCTIONS

    def _cat(self, node: fx.Node) -> R.Rule | None:
        if node.op != "call_function" or node.target not in R.CAT_FUNCTIONS:
            return None
        bound = _bind(node, ("tensors", "dim"))
        tensors = bound["tensors"]
        if bound.get("dim", 0) not in (1, -2) or not all(self._tracked(t) for t in tensors):
            return None
        lengths = {self.values[t].shape[2] for t in tensors}
        if lengths != {self.values[node].shape[2]}:
            return None
        return R.ElementwiseRule(node, self.calls[node], tensors, [])

    def _crop(self, node: fx.Node) -> R.Rule | None:
        source = node.args[0] if node.args else None
        if not self._tracked(source):
            return None
        in_length = self.values[source].shape[2]
        if node.op == "call_function" and node.target is operator.getitem:
            index = map_arg(node.args[1], self._const)
            index = _expand_index(index if isinstance(index, tuple) else (index,))
            if index is None or index[0] != slice(None):
                return None
            channels, columns = index[1], index[2]
            if not isinstance(channels, slice) or not isinstance(columns, slice) or columns.step not in (None, 1):
                return None
            start = columns.indices(in_length)[0]
        elif (node.op == "call_method" and node.target == "narrow") or (
            node.op == "call_function" and node.target is torch.narrow
        ):
            bound = map_arg(_bind(node, ("input", "dim", "start", "length")), self._const)
            if bound.get("dim") not in (2, -1) or not isinstance(bound.get("start"), int):
                return None
            channels, start = slice(None), bound["start"] % in_length if bound["start"] < 0 else bound["start"]
        else:
            return None
        return R.CropRule(node, source, channels, start)

    # ------------------------------------------------------------------ delta rules

    def _delta(self, node: fx.Node) -> R.DeltaRule | None:
        return self._mean(node) or self._linear(node)

    def _local(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.steps and self.steps[arg].kind is Kind.LOCAL

    def _mean(self, node: fx.Node) -> R.DeltaRule | None:
        source = node.args[0] if node.args else None
        if not self._local(source) or len(node.all_input_nodes) != 1:
            return None
        length = self.values[source].shape[2]
        module = self._module(node)
        if isinstance(module, nn.AdaptiveAvgPool1d) or (
            node.op == "call_function" and node.target is F.adaptive_avg_pool1d
        ):
            size = module.output_size if module is not None else _bind(node, ("input", "output_size"))["output_size"]
            return R.MeanRule(node, source, length, True) if _one(size) == 1 else None
        key = node.target if node.op == "call_function" else str(node.target) if node.op == "call_method" else None
        if key not in R.REDUCTIONS:
            return None
        bound = _bind(node, ("input", "dim", "keepdim"))
        if set(bound) - {"input", "dim", "keepdim"}:
            return None
        dim = bound.get("dim")
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if dims not in ((2,), (-1,)):
            return None
        divisor = length if R.REDUCTIONS[key] else 1
        return R.MeanRule(node, source, divisor, bool(bound.get("keepdim", False)))

    def _flatten_source(self, node: fx.Node) -> fx.Node | None:
        """The (batch, channels, length) source of a flattening to (batch, channels * length)."""
        source = node.args[0] if node.args else None
        if not self._local(source) or len(node.all_input_nodes) > 1 and not all(
            n is source or self.steps[n].kind is Kind.META for n in node.all_input_nodes
        ):
            return None
        shape = self.values[source].shape
        out = self.values[node]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], shape[1] * shape[2]):
            return None
        module = self._module(node)
        if isinstance(module, nn.Flatten):
            return source if module.start_dim == 1 and module.end_dim == -1 else None
        if node.op == "call_function" and node.target is torch.flatten:
            return source
        if node.op == "call_method" and node.target in ("flatten", "view", "reshape"):
            return source
        return None

    def _linear_weight(self, node: fx.Node) -> torch.Tensor | None:
        module = self._module(node)
        if isinstance(module, nn.Linear) and len(node.args) == 1 and not node.kwargs:
            return module.weight.detach()
        if node.op == "call_function" and node.target is F.linear:
            weight = _bind(node, ("input", "weight", "bias")).get("weight")
            if isinstance(weight, fx.Node) and weight not in self.tainted:
                return self.values[weight].detach()
        return None

    def _is_fused_flatten(self, node: fx.Node) -> bool:
        users = list(node.users)
        return (
            len(users) == 1
            and self._flatten_source(node) is not None
            and self._linear_weight(users[0]) is not None
            and users[0].args[0] is node
        )

    def _linear(self, node: fx.Node) -> R.DeltaRule | None:
        flat = node.args[0] if node.args else None
        if not isinstance(flat, fx.Node) or self.steps.get(flat, Step(flat, Kind.PLAIN)).kind is not Kind.FUSED:
            return None
        weight = self._linear_weight(node)
        source = flat.args[0]
        _, channels, length = self.values[source].shape
        return R.LinearRule(node, source, weight, channels, length)

    # ------------------------------------------------------------------ ranges

    def demand(self) -> None:
        """Set ``lo, hi`` of each tracked node: the columns its users read."""
        for node in reversed(list(self.steps)):
            step = self.steps[node]
            if not step.tracked:
                continue
            ranges = []
            for user in node.users:
                user_step = self.steps.get(user)
                if user is not self.output and (user_step is None or user_step.kind is Kind.META):
                    continue
                if user_step is not None and user_step.tracked:
                    rule = user_step.rule
                    assert rule is not None
                    ranges += [
                        rule.input_range(i, user_step.lo, user_step.hi) for i, s in enumerate(rule.sources) if s is node
                    ]
                else:
                    ranges.append((0, step.length))
            lo = max(0, min((r[0] for r in ranges), default=0))
            hi = min(step.length, max((r[1] for r in ranges), default=step.length))
            step.lo, step.hi = (lo, hi) if lo < hi else (0, step.length)

    def saturate(self) -> None:
        """Turn windows as wide as their demanded columns into ranges, and follow the change downstream."""
        for node, step in self.steps.items():
            if step.kind is Kind.LOCAL and node is not self.x:
                assert step.rule is not None
                after_range = any(self.steps[s].kind is Kind.RANGE for s in step.rule.sources)
                if after_range or step.extent[1] >= step.hi - step.lo:
                    step.kind = Kind.RANGE
            elif step.kind is Kind.FUSED and self.steps[node.args[0]].kind is not Kind.LOCAL:
                step.kind = Kind.PLAIN
            elif step.kind is Kind.DELTA:
                assert step.delta is not None
                fused = not isinstance(step.delta, R.LinearRule) or self.steps[node.args[0]].kind is Kind.FUSED
                if self.steps[step.delta.source].kind is not Kind.LOCAL or not fused:
                    step.kind = Kind.PLAIN

    def pads(self) -> dict[fx.Node, tuple[int, int]]:
        """Zero padding each cached reference needs so that every gather stays in range."""
        pads: dict[fx.Node, tuple[int, int]] = {}

        def need(node: fx.Node, lo: int, hi: int) -> None:
            length = self._length(node)
            left, right = pads.get(node, (0, 0))
            pads[node] = (max(left, -lo), max(right, hi - length))

        def relative(node: fx.Node, left: int, width: int) -> None:
            need(node, left, self.length - 1 + left + width)

        for node, step in self.steps.items():
            if step.kind is Kind.LOCAL and step.rule is not None:
                extents = [self.steps[s].extent for s in step.rule.sources]
                for gathered, left, width in step.rule.gathers(extents, step.extent):
                    relative(gathered, left, width)
                for const in getattr(step.rule, "length_consts", ()):
                    relative(const, *step.extent)
            elif step.kind is Kind.DELTA:
                assert step.delta is not None
                relative(step.delta.source, *self.steps[step.delta.source].extent)
            if step.kind is Kind.LOCAL and self._materialized(node):
                need(node, step.lo, step.hi + 1)
        return pads

    def _length(self, node: fx.Node) -> int:
        return int(self.values[node].shape[-1])

    def _materialized(self, node: fx.Node) -> bool:
        """Whether some user reads full columns of the LOCAL ``node``."""
        for user in node.users:
            if user is self.output or (user in self.steps and self.steps[user].kind in (Kind.RANGE, Kind.PLAIN)):
                return True
        return False

    def plan(self) -> Plan:
        """Run the analysis."""
        self.classify()
        self.demand()
        self.saturate()
        pads = self.pads()
        for step in self.steps.values():
            if step.kind is Kind.DELTA and isinstance(step.delta, R.LinearRule):
                step.delta.prepare(self.steps[step.delta.source].extent, self.length)
        consts = {n: self.values[n] for n, s in self.steps.items() if s.kind is Kind.CONST}
        finite = not any(_may_overflow(s.node) for s in self.steps.values() if s.kind is Kind.LOCAL)
        shapes = {n: self.values[n].to("meta") for n, s in self.steps.items() if s.tracked}
        return Plan(self.steps, self.x, self.outputs, self.length, consts, shapes, pads, finite)


def analyse(
    gm: fx.GraphModule, length: int, example: torch.Tensor, outputs: Sequence[int] | None = None
) -> Plan:
    """Plan the incremental computation of ``gm`` on sequences of ``length``.

    Parameters
    ----------
    gm
        The traced member.
    length
        Sequence length L.
    example
        A one-hot batch ``(batch, alphabet, length)`` with batch > 1, on the member's device.
    outputs
        For a member returning a tuple or list: the elements to compute; the
        others are returned as ``None`` and nothing that only they need is run.
        ``None`` computes everything.
    """
    freeze_masks(gm, example)
    return _Analysis(gm, length, example, outputs).plan()


def _select_outputs(structure: Any, outputs: Sequence[int] | None) -> Any:
    """The output structure with unselected top-level elements replaced by ``None``."""
    if outputs is None:
        return structure
    if not isinstance(structure, (tuple, list)):
        raise ValueError(f"outputs {tuple(outputs)} were selected, but the member returns a single value")
    n = len(structure)
    wanted = {i % n for i in outputs if -n <= i < n}
    if len(wanted) != len(set(outputs)):
        raise ValueError(f"outputs {tuple(outputs)} out of range for a member returning {n} values")
    return type(structure)(v if i in wanted else None for i, v in enumerate(structure))


def _ancestors(structure: Any) -> set[fx.Node]:
    """Every node the output structure depends on."""
    live: set[fx.Node] = set()
    stack: list[fx.Node] = []
    map_arg(structure, stack.append)
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


# --------------------------------------------------------------------------- argument helpers


def _may_overflow(node: fx.Node) -> bool:
    """Whether an operation can turn finite inputs into inf or NaN."""
    if node.op == "call_method":
        return str(node.target).rstrip("_") in R.NON_FINITE_METHODS
    return node.op == "call_function" and INPLACE_FUNCTIONS.get(node.target, node.target) in R.NON_FINITE_FUNCTIONS


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Arguments of a call by name (positional ones named in order)."""
    bound = dict(zip(names, node.args, strict=False))
    bound.update(node.kwargs)
    return bound


def _one(value: Any) -> Any:
    """An int from an int or a one-element sequence."""
    if isinstance(value, (tuple, list)):
        return value[0] if len(value) == 1 else None
    return value


def _dim_arg(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _expand_index(index: tuple[Any, ...]) -> tuple[Any, Any, Any] | None:
    """A 3-d indexing tuple with ``...`` expanded; ``None`` if it adds or drops axes."""
    if any(i is None or isinstance(i, (int, torch.Tensor, list)) for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (3 - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (3 - len(index))
    return index if len(index) == 3 else None  # type: ignore[return-value]
