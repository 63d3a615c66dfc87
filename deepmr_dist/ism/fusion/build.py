"""Build: members of one architecture traced with torch.fx and merged node by node into one network.

The members are traced (:func:`~deepmr_dist.ism.incremental.trace.trace`,
leaf modules rewritten) and walked in lockstep; every node must be the same
operation with the same hyperparameters and the same shapes in every member.
Each value of the fused network has a *layout*:

- ``SHARED``: the same in every member (the input, and what is computed from it alone);
- ``CHANNEL``: the members' values ``(batch, C, ...)`` concatenated along axis 1,
  member after member, ``(batch, members * C, ...)``;
- ``META``: a Python value computed from shapes, equal in every member (on
  ``CHANNEL`` values it is computed from one member's slice, a view);
- ``CONST``: does not depend on the input; kept per member and merged where it is used.

Operations are merged as follows: convolutions grouped by member
(``groups = members * groups``; on the shared input, one convolution with every
member's filters), a batch norm right after a convolution folded into it,
others concatenated; linear layers as one batched product
(:class:`~.ops.GroupedLinear`); per-member constants of elementwise operations
concatenated along the channel axis; operations that treat channels alike
(activations, pooling and crops along the length, reductions over it) applied
as they are; channel concatenations interleaved member by member; reshapes of
one member's block done per member; any other batch-independent operation
run with the members folded into the batch axis. Anything else (per-member
Python values, recurrent state, a linear layer over the length) declines.
"""

from __future__ import annotations

import copy
import enum
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_aggregate, map_arg
from torch.nn import functional

from deepmr_dist.ism.fusion.ops import GroupedLinear
from deepmr_dist.ism.incremental.rules.base import bind
from deepmr_dist.ism.incremental.rules.elementwise import (
    ELEMENTWISE_FUNCTIONS,
    ELEMENTWISE_METHODS,
    ELEMENTWISE_MODULES,
)
from deepmr_dist.ism.incremental.trace import INPLACE_FUNCTIONS, Leaves, node_call, rewrite_leaves, run_example, trace
from deepmr_dist.ism.incremental.verify import tensor_leaves


class CannotFuse(Exception):
    """The members cannot be merged; the message says why."""


class Layout(enum.Enum):
    """Where a fused value keeps the members' values (see the module docstring)."""

    SHARED = "shared"
    CHANNEL = "channel"
    META = "meta"
    CONST = "const"


CHANNEL_FREE_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.LPPool1d,
    nn.ConstantPad1d, nn.ZeroPad1d, nn.ReflectionPad1d, nn.ReplicationPad1d, nn.CircularPad1d,
)  # fmt: skip
"""Parameter-free modules acting along the length, channel by channel."""

POOL_FUNCTIONS: frozenset[Any] = frozenset({
    functional.max_pool1d, functional.avg_pool1d, functional.adaptive_avg_pool1d, functional.adaptive_max_pool1d,
    functional.lp_pool1d, torch.max_pool1d, torch.avg_pool1d, torch.adaptive_avg_pool1d, torch.adaptive_max_pool1d,
})  # fmt: skip

DIM_OPERATIONS: frozenset[str] = frozenset({
    "mean", "sum", "amax", "amin", "max", "min", "logsumexp", "std", "var", "prod", "softmax", "log_softmax",
    "cumsum", "narrow", "flip", "cat", "concat", "concatenate", "stack",
})  # fmt: skip
"""Operations along the axes named by their ``dim`` argument; channel-free when those axes are >= 2."""

RESHAPES: frozenset[str] = frozenset({"view", "reshape", "flatten", "unsqueeze", "squeeze"})

CONCATENATIONS: frozenset[str] = frozenset({"cat", "concat", "concatenate"})


@dataclass
class Fused:
    """A network computing every member at once.

    Attributes
    ----------
    module
        Maps one-hot ``(batch, 4, L)`` to the members' output structure, each
        tensor holding the members' tensors concatenated along axis 1.
    n_members
        Number of members.
    """

    module: fx.GraphModule
    n_members: int

    def split(self, raw: Any) -> list[Any]:
        """The fused output as one output per member (views, no copies)."""
        return [map_aggregate(raw, lambda t, m=m: self._member(t, m)) for m in range(self.n_members)]

    def _member(self, value: Any, member: int) -> Any:
        if isinstance(value, torch.Tensor):
            return value.unflatten(1, (self.n_members, -1))[:, member]
        return value


@dataclass
class _Value:
    """A member node's counterpart in the fused graph."""

    layout: Layout
    node: fx.Node | None = None
    """The fused node (``None`` for CONST values, which are merged where they are used)."""


def fuse(members: Sequence[nn.Module], example: torch.Tensor, leaves: Leaves) -> Fused:
    """Merge ``members`` into one :class:`Fused` network.

    Parameters
    ----------
    members
        Two or more eval-mode modules of one architecture on one device.
    example
        A one-hot batch ``(batch, alphabet, L)``, batch > 1, at the length the network will run at.
    leaves
        Module types the tracer keeps whole, with their rewrites.

    Raises
    ------
    CannotFuse
        Saying why (a member cannot be traced, the members differ, an operation has no fused form).
    """
    if len(members) < 2:
        raise CannotFuse("fewer than two members")
    graphs = []
    for member in members:
        gm = trace(member, leaves)
        if gm is None:
            raise CannotFuse(f"{type(member).__name__} cannot be traced")
        with torch.inference_mode():
            rewrite_leaves(gm, leaves, example)
            values = run_example(gm, {n: node_call(gm, n) for n in gm.graph.nodes if n.op.startswith("call_")}, example)
        graphs.append(_Member(gm, values))
    with torch.no_grad():  # not inference mode: the fused parameters are used (and folded) outside it
        return _Fuser(graphs, example).fuse()


@dataclass
class _Member:
    gm: fx.GraphModule
    values: dict[fx.Node, Any]

    def __post_init__(self) -> None:
        self.nodes = list(self.gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        placeholder = next(n for n in self.nodes if n.op == "placeholder")
        self.tainted: set[fx.Node] = set()
        for n in self.nodes:
            if n is placeholder or any(a in self.tainted for a in n.all_input_nodes):
                self.tainted.add(n)

    def module(self, node: fx.Node) -> nn.Module:
        return self.gm.get_submodule(str(node.target))


class _Fuser:
    """Walks the members' graphs in lockstep and emits the fused graph."""

    def __init__(self, members: list[_Member], example: torch.Tensor) -> None:
        self.members = members
        self.n = len(members)
        self.batch = example.shape[0]
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[int, _Value] = {}
        self.views: dict[fx.Node, fx.Node] = {}
        self.convs: dict[fx.Node, nn.Conv1d] = {}
        self.count = 0

    # ------------------------------------------------------------------ driver

    def fuse(self) -> Fused:
        lengths = {len(m.nodes) for m in self.members}
        if len(lengths) != 1:
            raise CannotFuse(f"the members' graphs differ in size ({sorted(lengths)} nodes)")
        first = self.members[0]
        placeholder_seen = False
        for i, node in enumerate(first.nodes):
            self._check_same(i)
            if node.op == "placeholder":
                if not placeholder_seen:
                    self.env[i] = _Value(Layout.SHARED, self.graph.placeholder(node.name))
                    placeholder_seen = True
                else:
                    default = node.args[0] if node.args else None
                    self.env[i] = _Value(Layout.META, self.graph.placeholder(node.name, default_value=default))
            elif node.op == "output":
                self.graph.output(map_arg(node.args[0], self._output))
            elif node not in first.tainted:
                self.env[i] = _Value(Layout.CONST)
            else:
                self.env[i] = self._emit(i)
        return Fused(fx.GraphModule(self.root, self.graph, "FusedEnsemble"), self.n)

    def _check_same(self, i: int) -> None:
        """Every member's node ``i`` is the same operation on the same inputs, with the same shapes."""
        first = self.members[0]
        node = first.nodes[i]
        for member in self.members[1:]:
            other = member.nodes[i]
            if other.op != node.op or _arg_key(first, node.args) != _arg_key(member, other.args):
                raise CannotFuse(f"the members' graphs differ at {node.name} ({node.op} {node.target})")
            if _arg_key(first, node.kwargs) != _arg_key(member, other.kwargs):
                raise CannotFuse(f"the members' graphs differ at {node.name}: other keyword arguments")
            if node.op == "call_module":
                a, b = first.module(node), member.module(other)
                if type(a) is not type(b) or a.extra_repr() != b.extra_repr() or a.training != b.training:
                    raise CannotFuse(f"the members' modules differ at {node.name}: {a} and {b}")
            elif node.op in ("call_function", "call_method") and node.target != other.target:
                raise CannotFuse(f"the members' graphs differ at {node.name}: {node.target} and {other.target}")
            if node.op != "output" and _shape_key(first.values[node]) != _shape_key(member.values[other]):
                raise CannotFuse(f"the members' values differ in shape at {node.name}")
            if node.op != "output" and (node in first.tainted) != (other in member.tainted):
                raise CannotFuse(f"the members' graphs differ at {node.name}")

    # ------------------------------------------------------------------ helpers

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}_{self.count}"

    def _add_module(self, stem: str, module: nn.Module) -> str:
        name = self._name(stem)
        self.root.add_module(name, module)
        return name

    def _add_const(self, tensor: torch.Tensor) -> fx.Node:
        name = self._name("const")
        self.root.register_buffer(name, tensor)
        return self.graph.get_attr(name)

    def _values(self, i: int) -> list[Any]:
        """The example value of node ``i`` in every member."""
        return [m.values[m.nodes[i]] for m in self.members]

    def _member_values(self, arg: fx.Node) -> list[Any]:
        return self._values(self.members[0].index[arg])

    def _layout(self, arg: fx.Node) -> Layout:
        return self.env[self.members[0].index[arg]].layout

    def _fused_node(self, arg: fx.Node) -> fx.Node:
        value = self.env[self.members[0].index[arg]]
        assert value.node is not None
        return value.node

    def _member_view(self, node: fx.Node) -> fx.Node:
        """One member's slice of a CHANNEL value (a view): shapes read from it are the members'."""
        if node not in self.views:
            split = self.graph.call_method("unflatten", (node, 1, (self.n, -1)))
            self.views[node] = self.graph.call_method("select", (split, 1, 0))
        return self.views[node]

    def _to_channel(self, node: fx.Node, ndim: int) -> fx.Node:
        """A SHARED tensor as CHANNEL: the same value for every member, repeated along axis 1."""
        return self.graph.call_method("repeat", (node, (1, self.n, *([1] * (ndim - 2)))))

    def _same_const(self, arg: fx.Node) -> Any:
        """A CONST argument equal in every member, or raise."""
        values = self._member_values(arg)
        if not all(_equal(values[0], v) for v in values[1:]):
            raise CannotFuse(f"{arg.name} differs between members where it cannot be merged")
        return values[0]

    def _const_tensor(self, arg: fx.Node) -> fx.Node | Any:
        """A CONST argument equal in every member, as a literal or (for tensors) a buffer."""
        value = self._same_const(arg)
        return self._add_const(value.detach().clone()) if isinstance(value, torch.Tensor) else value

    # ------------------------------------------------------------------ emission

    def _emit(self, i: int) -> _Value:
        first = self.members[0]
        node = first.nodes[i]
        value = first.values[node]
        if not _has_tensor(value):
            return self._emit_meta(node)
        module = first.module(node) if node.op == "call_module" else None
        inputs = [self._layout(a) for a in node.all_input_nodes]
        differing = self._differing(i, node, module)
        if Layout.CHANNEL not in inputs and not differing:
            return _Value(Layout.SHARED, self._replicate(node, module))
        if isinstance(module, nn.Conv1d) or _is_function(node, functional.conv1d, torch.conv1d):
            return self._conv(i, node, module)
        if isinstance(module, nn.BatchNorm1d):
            return self._batchnorm(i, node)
        if isinstance(module, nn.Linear) or _is_function(node, functional.linear):
            return self._linear(i, node, module)
        if _is_elementwise(node, module):
            return self._elementwise(node, module)
        if differing:
            raise CannotFuse(f"{node.name} ({node.target}) has per-member parameters and no fused form")
        for value_ in tensor_leaves(value):
            if value_.ndim < 2:
                raise CannotFuse(f"{node.name} has a value without a channel axis")
        if _is_reshape(node, module):
            return self._reshape(i, node)
        if _is_channel_concat(node, first.values):
            return self._channel_concat(node)
        if _is_channel_free(node, module, first.values):
            return _Value(Layout.CHANNEL, self._apply(node, module, channel=True))
        return _Value(Layout.CHANNEL, self._fold(node, module))

    def _differing(self, i: int, node: fx.Node, module: nn.Module | None) -> bool:
        """Whether node ``i`` reads per-member constants or parameters that differ."""
        for arg in node.all_input_nodes:
            if self._layout(arg) is Layout.CONST:
                values = self._member_values(arg)
                if not all(_equal(values[0], v) for v in values[1:]):
                    return True
        if module is None:
            return False
        states = [list(m.module(m.nodes[i]).state_dict().values()) for m in self.members]
        return any(not all(_equal(a, b) for a, b in zip(states[0], s, strict=True)) for s in states[1:])

    def _resolve(self, arg: fx.Node, *, channel: bool, ndim: int | None = None) -> Any:
        """A member-graph argument in the fused graph; ``channel``: SHARED tensors become CHANNEL."""
        layout = self._layout(arg)
        if layout is Layout.CONST:
            return self._const_tensor(arg)
        node = self._fused_node(arg)
        if channel and layout is Layout.SHARED and isinstance(self._member_values(arg)[0], torch.Tensor):
            return self._to_channel(node, self._member_values(arg)[0].ndim if ndim is None else ndim)
        return node

    def _emit_call(self, node: fx.Node, module: nn.Module | None, args: Any, kwargs: Any) -> fx.Node:
        """The member's operation on fused arguments, run out of place."""
        if node.op == "call_module":
            assert module is not None
            if getattr(module, "inplace", False):
                module = copy.copy(module)
                module.inplace = False
            return self.graph.call_module(self._add_module("module", module), args, kwargs)
        if node.op == "call_method":
            name = str(node.target)
            if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
                name = name[:-1]
            return self.graph.call_method(name, args, kwargs)
        target = INPLACE_FUNCTIONS.get(node.target, node.target)
        if kwargs.get("inplace"):
            kwargs = {**kwargs, "inplace": False}
        return self.graph.call_function(target, args, kwargs)

    def _apply(self, node: fx.Node, module: nn.Module | None, *, channel: bool) -> fx.Node:
        args = map_arg(node.args, lambda a: self._resolve(a, channel=channel))
        kwargs = map_arg(node.kwargs, lambda a: self._resolve(a, channel=channel))
        return self._emit_call(node, module, args, kwargs)

    def _replicate(self, node: fx.Node, module: nn.Module | None) -> fx.Node:
        """An operation whose inputs and parameters are the same in every member: computed once."""
        return self._apply(node, module, channel=False)

    def _emit_meta(self, node: fx.Node) -> _Value:
        def resolve(arg: fx.Node) -> Any:
            layout = self._layout(arg)
            if layout is Layout.CONST:
                return self._const_tensor(arg)
            if layout is Layout.CHANNEL:
                return self._member_view(self._fused_node(arg))
            return self._fused_node(arg)

        args = map_arg(node.args, resolve)
        kwargs = map_arg(node.kwargs, resolve)
        module = self.members[0].module(node) if node.op == "call_module" else None
        return _Value(Layout.META, self._emit_call(node, module, args, kwargs))

    # ------------------------------------------------------------------ layers with parameters

    def _module_parameters(self, i: int, node: fx.Node, what: str) -> tuple[list[Any], list[Any]]:
        """Every member's ``weight`` and ``bias`` of a layer module (node ``i``) called on its input alone.

        Raises
        ------
        CannotFuse
            If the call has other arguments.
        """
        if node.kwargs or len(node.args) != 1:
            raise CannotFuse(f"{node.name}: a {what} called with extra arguments")
        layers = [m.module(m.nodes[i]) for m in self.members]
        return [layer.weight for layer in layers], [layer.bias for layer in layers]

    def _const_parameters(self, node: fx.Node, bound: dict[str, Any], what: str) -> tuple[list[Any], list[Any]]:
        """Every member's ``weight`` and ``bias`` (``None`` without one) of a functional layer's bound arguments.

        Raises
        ------
        CannotFuse
            If either is computed from the input.
        """
        for key in ("weight", "bias"):
            if isinstance(bound.get(key), fx.Node) and self._layout(bound[key]) is not Layout.CONST:
                raise CannotFuse(f"{node.name}: {what} weights computed from the input")
        weights = _const_values(self, bound["weight"])
        biases = _const_values(self, bound.get("bias")) if bound.get("bias") is not None else [None] * self.n
        return weights, biases

    def _conv(self, i: int, node: fx.Node, module: nn.Module | None) -> _Value:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        if module is not None:
            weights, biases = self._module_parameters(i, node, "Conv1d")
            stride, padding, dilation, groups = module.stride, module.padding, module.dilation, module.groups
            padding_mode = module.padding_mode
        else:
            bound = bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
            weights, biases = self._const_parameters(node, bound, "convolution")
            stride, padding = bound.get("stride", 1), bound.get("padding", 0)
            dilation, groups, padding_mode = bound.get("dilation", 1), bound.get("groups", 1), "zeros"
        if any(not isinstance(v, torch.Tensor) for v in (*weights, *[b for b in biases if b is not None])):
            raise CannotFuse(f"{node.name}: convolution weights are not tensors")
        if len({b is None for b in biases}) != 1:
            raise CannotFuse(f"{node.name}: some members' convolutions have a bias and others not")
        weight = torch.cat([w.detach() for w in weights], dim=0)
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases], dim=0)
        input_node = self._fused_node(source)
        shared = self._layout(source) is Layout.SHARED
        if shared and groups != 1:
            input_node, shared = self._to_channel(input_node, 3), False
        in_channels = weights[0].shape[1] * groups * (1 if shared else self.n)
        fused = nn.Conv1d(
            in_channels, weight.shape[0], weight.shape[2], stride=stride, padding=padding, dilation=dilation,
            groups=groups if shared else groups * self.n, bias=bias is not None, padding_mode=padding_mode,
            device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        fused.weight.data.copy_(weight)
        if bias is not None:
            fused.bias.data.copy_(bias)
        fused.eval().requires_grad_(False)
        out = self.graph.call_module(self._add_module("conv", fused), (input_node,))
        if len(self.members[0].nodes[i].users) == 1:
            self.convs[out] = fused
        return _Value(Layout.CHANNEL, out)

    def _batchnorm(self, i: int, node: fx.Node) -> _Value:
        norms = [m.module(m.nodes[i]) for m in self.members]
        first = norms[0]
        source = node.args[0]
        if first.training or first.running_mean is None or len(node.args) != 1 or node.kwargs:
            raise CannotFuse(f"{node.name}: a batch norm in training mode or without running statistics")
        assert isinstance(source, fx.Node)
        scale = torch.cat([torch.rsqrt(b.running_var + b.eps) * (b.weight if b.affine else 1) for b in norms])
        shift = torch.cat([(b.bias if b.affine else 0) - b.running_mean * s for b, s in zip(
            norms, scale.split(first.num_features), strict=True)])  # fmt: skip
        conv = self.convs.pop(self._fused_node(source), None) if self._layout(source) is Layout.CHANNEL else None
        if conv is not None and self._member_values(source)[0].ndim == 3:
            # the convolution's only user: fold the norm into its filters (and a next norm, if this one's only user)
            conv.weight.data.mul_(scale[:, None, None])
            conv.bias = nn.Parameter(shift if conv.bias is None else conv.bias * scale + shift, requires_grad=False)
            if len(node.users) == 1:
                self.convs[self._fused_node(source)] = conv
            return _Value(Layout.CHANNEL, self._fused_node(source))
        fused = nn.BatchNorm1d(first.num_features * self.n, eps=first.eps, affine=first.affine)
        fused.to(device=first.running_mean.device, dtype=first.running_mean.dtype).eval()
        fused.running_mean.copy_(torch.cat([b.running_mean for b in norms]))
        fused.running_var.copy_(torch.cat([b.running_var for b in norms]))
        if first.affine:
            fused.weight.data.copy_(torch.cat([b.weight for b in norms]))
            fused.bias.data.copy_(torch.cat([b.bias for b in norms]))
        fused.requires_grad_(False)
        input_node = self._resolve(source, channel=True)
        return _Value(Layout.CHANNEL, self.graph.call_module(self._add_module("norm", fused), (input_node,)))

    def _linear(self, i: int, node: fx.Node, module: nn.Module | None) -> _Value:
        source = node.args[0]
        assert isinstance(source, fx.Node)
        if module is not None:
            weights, biases = self._module_parameters(i, node, "Linear")
        else:
            weights, biases = self._const_parameters(node, bind(node, ("input", "weight", "bias")), "linear")
        if self._member_values(source)[0].ndim != 2:
            raise CannotFuse(f"{node.name}: a linear layer over an axis other than the features")
        if len({b is None for b in biases}) != 1:
            raise CannotFuse(f"{node.name}: some members' linear layers have a bias and others not")
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
        if self._layout(source) is Layout.SHARED:
            weight = torch.cat([w.detach() for w in weights])
            fused: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, weight.device, weight.dtype)
            fused.weight.data.copy_(weight)
            if bias is not None:
                fused.bias.data.copy_(bias)
            fused.requires_grad_(False)
        else:
            fused = GroupedLinear(torch.stack([w.detach() for w in weights]), bias)
        return _Value(Layout.CHANNEL, self.graph.call_module(self._add_module("linear", fused), (self._fused_node(source),)))

    # ------------------------------------------------------------------ parameter-free operations

    def _elementwise(self, node: fx.Node, module: nn.Module | None) -> _Value:
        """A broadcasting columnwise operation; per-member constants concatenated along the channel axis."""
        first = self.members[0]
        ndim = first.values[node].ndim
        if ndim < 2:
            raise CannotFuse(f"{node.name} has a value without a channel axis")
        channels = first.values[node].shape[1]

        def resolve(arg: fx.Node) -> Any:
            layout = self._layout(arg)
            value = first.values[arg]
            if layout is Layout.CHANNEL:
                if value.ndim != ndim:
                    raise CannotFuse(f"{node.name} broadcasts values of different ranks")
                return self._fused_node(arg)
            if not isinstance(value, torch.Tensor):
                return self._const_tensor(arg) if layout is Layout.CONST else self._fused_node(arg)
            axis = value.ndim - (ndim - 1)  # the operand's axis aligned with the channel axis
            if layout is Layout.SHARED:
                node_ = self._fused_node(arg)
                if axis < 0 or value.shape[axis] == 1:
                    return node_
                return self.graph.call_method("repeat", (node_, tuple(self.n if d == axis else 1 for d in range(value.ndim))))
            values = self._member_values(arg)
            if (axis < 0 or value.shape[axis] == 1) and all(_equal(values[0], v) for v in values[1:]):
                return self._add_const(value.detach().clone())
            if value.ndim == ndim and value.shape[0] != 1:
                raise CannotFuse(f"{node.name}: a constant with a batch axis")
            full = [v.reshape((1,) * (ndim - v.ndim) + tuple(v.shape)) for v in values]
            full = [v.expand(*v.shape[:1], channels, *v.shape[2:]) for v in full]
            return self._add_const(torch.cat(full, dim=1).contiguous())

        args = map_arg(node.args, resolve)
        kwargs = map_arg(node.kwargs, resolve)
        return _Value(Layout.CHANNEL, self._emit_call(node, module, args, kwargs))

    def _reshape(self, i: int, node: fx.Node) -> _Value:
        """A reshape keeping the batch axis, done on each member's block."""
        first = self.members[0]
        source = node.args[0]
        assert isinstance(source, fx.Node)
        if first.values[source].shape[0] != self.batch or first.values[node].shape[0] != self.batch:
            raise CannotFuse(f"{node.name}: a reshape across the batch axis")
        before = tuple(first.values[source].shape[1:])
        after = tuple(first.values[node].shape[1:])
        fused = self._resolve(source, channel=True)
        if before == after:
            return _Value(Layout.CHANNEL, fused)
        if len(after) == 1:
            return _Value(Layout.CHANNEL, self.graph.call_function(torch.flatten, (fused, 1)))
        blocks = self.graph.call_method("unflatten", (fused, 1, (self.n, before[0])))
        flat = self.graph.call_method("flatten", (blocks, 2))
        shaped = self.graph.call_method("unflatten", (flat, 2, after))
        return _Value(Layout.CHANNEL, self.graph.call_method("flatten", (shaped, 1, 2)))

    def _channel_concat(self, node: fx.Node) -> _Value:
        """Concatenation along channels: each member's channels of every input, member after member."""
        first = self.members[0]
        tensors = node.args[0]
        assert isinstance(tensors, (list, tuple))
        pieces = []
        fused = [self._resolve(t, channel=True) for t in tensors]
        sizes = [first.values[t].shape[1] for t in tensors]
        for m in range(self.n):
            for f, size in zip(fused, sizes, strict=True):
                index = (slice(None), slice(m * size, (m + 1) * size))
                pieces.append(self.graph.call_function(operator.getitem, (f, index)))
        return _Value(Layout.CHANNEL, self.graph.call_function(torch.cat, (pieces,), {"dim": 1}))

    def _fold(self, node: fx.Node, module: nn.Module | None) -> fx.Node:
        """A batch-independent operation run with the members folded into the batch axis."""

        def resolve(arg: fx.Node) -> Any:
            layout = self._layout(arg)
            if layout is Layout.CONST:
                return self._const_tensor(arg)
            fused = self._fused_node(arg)
            if layout is Layout.CHANNEL:
                blocks = self.graph.call_method("unflatten", (fused, 1, (self.n, -1)))
                return self.graph.call_method("flatten", (blocks, 0, 1))
            if layout is Layout.SHARED and isinstance(self.members[0].values[arg], torch.Tensor):
                return self.graph.call_method("repeat_interleave", (fused, self.n), {"dim": 0})
            return fused

        if not isinstance(self.members[0].values[node], torch.Tensor):
            raise CannotFuse(f"{node.name} returns several values and has no fused form")
        args = map_arg(node.args, resolve)
        kwargs = map_arg(node.kwargs, resolve)
        out = self._emit_call(node, module, args, kwargs)
        rows = self.graph.call_method("unflatten", (out, 0, (-1, self.n)))
        return self.graph.call_method("flatten", (rows, 1, 2))

    def _output(self, arg: fx.Node) -> fx.Node:
        value = self.env[self.members[0].index[arg]]
        if value.layout is Layout.CHANNEL:
            assert value.node is not None
            return value.node
        if value.layout is Layout.SHARED and isinstance(self.members[0].values[arg], torch.Tensor):
            assert value.node is not None
            return self._to_channel(value.node, self.members[0].values[arg].ndim)
        raise CannotFuse(f"output {arg.name} is not a tensor computed from the input")


# ---------------------------------------------------------------------- node predicates


def _is_function(node: fx.Node, *targets: Callable[..., Any]) -> bool:
    return node.op == "call_function" and node.target in targets


def _is_elementwise(node: fx.Node, module: nn.Module | None) -> bool:
    if module is not None:
        return isinstance(module, ELEMENTWISE_MODULES) and not list(module.parameters()) and not module.training
    if node.op == "call_method":
        return str(node.target).rstrip("_") in ELEMENTWISE_METHODS
    if node.op == "call_function":
        return INPLACE_FUNCTIONS.get(node.target, node.target) in ELEMENTWISE_FUNCTIONS
    return False


def _is_reshape(node: fx.Node, module: nn.Module | None) -> bool:
    if isinstance(module, nn.Flatten):
        return True
    if node.op == "call_method":
        return str(node.target).rstrip("_") in RESHAPES
    return node.op == "call_function" and node.target in (torch.flatten, torch.reshape, torch.unsqueeze, torch.squeeze)


def _operation_name(node: fx.Node) -> str | None:
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", None)
    return None


def _dims(node: fx.Node, ndim: int) -> tuple[int, ...] | None:
    """The axes a DIM_OPERATIONS call acts on, non-negative; ``None`` if absent (the whole tensor)."""
    name = _operation_name(node)
    dim = node.kwargs.get("dim", node.kwargs.get("dims", node.args[1] if len(node.args) > 1 else None))
    if name == "stack":
        ndim += 1
    if dim is None or isinstance(dim, fx.Node):
        return None
    dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
    if not all(isinstance(d, int) for d in dims):
        return None
    return tuple(d % ndim for d in dims)


def _is_channel_concat(node: fx.Node, values: dict[fx.Node, Any]) -> bool:
    if _operation_name(node) not in CONCATENATIONS or node.op != "call_function":
        return False
    tensors = node.args[0]
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return False
    ndim = values[node].ndim
    return _dims(node, ndim) == (1,)


def _is_channel_free(node: fx.Node, module: nn.Module | None, values: dict[fx.Node, Any]) -> bool:
    """Whether the operation treats channels alike and independently (and the batch rows too)."""
    if module is not None:
        return isinstance(module, CHANNEL_FREE_MODULES)
    source = node.args[0] if node.args else None
    first = source[0] if isinstance(source, (list, tuple)) and source else source
    if not isinstance(first, fx.Node):
        return False
    value = values[first]
    if node.op == "call_function" and node.target in POOL_FUNCTIONS:
        return True
    if node.op == "call_function" and node.target in (operator.getitem, getattr):
        return not isinstance(value, torch.Tensor) or _index_is_channel_free(node.args[1], value.ndim)
    if not isinstance(value, torch.Tensor):
        return False
    if node.op == "call_function" and node.target is functional.pad:
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        return isinstance(pad, (tuple, list)) and all(p == 0 for p in pad[2 * (value.ndim - 2) :])
    name = _operation_name(node)
    if name in DIM_OPERATIONS:
        dims = _dims(node, value.ndim)
        return dims is not None and min(dims) >= 2
    return False


def _index_is_channel_free(index: Any, ndim: int) -> bool:
    """Whether ``value[index]`` keeps the batch and channel axes whole."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(item is None or isinstance(item, (fx.Node, torch.Tensor, list)) for item in items):
        return False
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = items[:at] + [slice(None)] * (ndim - len(items) + 1) + items[at + 1 :]
    whole = slice(None)
    return all(isinstance(item, slice) and item == whole for item in items[:2])


# ---------------------------------------------------------------------- values


def _has_tensor(value: Any) -> bool:
    return bool(tensor_leaves(value))


def _shape_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)):
        return tuple(_shape_key(v) for v in value)
    if isinstance(value, (int, float, bool, str, type(None), torch.Size)):
        return value
    return type(value).__name__


def _arg_key(member: _Member, args: Any) -> Any:
    """Arguments with nodes replaced by their positions in the graph (to compare members)."""
    return repr(map_arg(args, lambda n: f"%{member.index[n]}"))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _const_values(fuser: _Fuser, arg: Any) -> list[Any]:
    """A CONST argument's value in every member (a literal: the same for all)."""
    if isinstance(arg, fx.Node):
        return fuser._member_values(arg)
    return [arg] * fuser.n

