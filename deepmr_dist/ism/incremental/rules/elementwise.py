"""Operations applied column by column: activations, arithmetic, eval-mode normalisation and dropout."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg
from torch.nn import functional

from deepmr_dist.ism.incremental.rules.base import Context, Extent, Inputs, Rule, bind, union
from deepmr_dist.ism.incremental.trace import INPLACE_FUNCTIONS

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip

ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, functional.relu, torch.sigmoid, functional.sigmoid, torch.tanh, functional.tanh, torch.exp,
    torch.log, torch.log1p, torch.expm1, torch.abs, torch.neg, torch.square, torch.sqrt, torch.rsqrt, torch.sin,
    torch.cos, torch.erf, torch.clamp, torch.clip, torch.nan_to_num, functional.gelu, functional.silu,
    functional.elu, functional.selu, functional.celu, functional.leaky_relu, functional.softplus, functional.relu6,
    functional.hardtanh, functional.hardswish, functional.hardsigmoid, functional.mish, functional.logsigmoid,
    functional.softsign, operator.neg, operator.pos, operator.abs, operator.add, operator.sub, operator.mul,
    operator.truediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow,
    torch.maximum, torch.minimum, torch.where,
})  # fmt: skip

ELEMENTWISE_METHODS: frozenset[str] = frozenset({
    "relu", "sigmoid", "tanh", "exp", "log", "log1p", "expm1", "abs", "neg", "square", "sqrt",
    "rsqrt", "clamp", "clip", "add", "sub", "mul", "div", "pow", "float", "contiguous", "clone",
})  # fmt: skip

CHANNEL_FUNCTIONS: frozenset[Any] = frozenset(
    {functional.softmax, functional.log_softmax, torch.softmax, torch.log_softmax}
)
"""Operations along one axis, local when that axis is the channel axis."""

CHANNEL_METHODS: frozenset[str] = frozenset({"softmax", "log_softmax"})

NON_FINITE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.exp, torch.expm1, torch.div, torch.true_divide,
    operator.truediv, torch.pow, operator.pow,
})  # fmt: skip
"""Elementwise operations that can turn finite values into inf or NaN."""

NON_FINITE_METHODS: frozenset[str] = frozenset({"log", "log1p", "sqrt", "rsqrt", "exp", "expm1", "div", "pow"})

DROPOUT_FUNCTIONS: frozenset[Any] = frozenset(
    {functional.dropout, functional.dropout1d, functional.alpha_dropout, functional.feature_alpha_dropout}
)


def identity(x: torch.Tensor) -> torch.Tensor:
    """The operation of a node whose work was folded into the node before it."""
    return x


class ElementwiseRule(Rule):
    """An operation applied column by column: activations, arithmetic, eval-mode normalisation.

    ``call`` is the operation; ``length_consts`` are constant tensor arguments
    whose last axis runs along the sequence (e.g. a frozen dropout mask).
    """

    def __init__(
        self,
        node: fx.Node,
        call: Callable[..., Any],
        sources: Sequence[fx.Node],
        length_consts: Sequence[fx.Node],
    ) -> None:
        self.node = node
        self.call = call
        self.sources = tuple(dict.fromkeys(sources))
        self.length_consts = frozenset(length_consts)

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> ElementwiseRule | None:
        """The rule of a columnwise operation on tracked values, scalars and broadcastable constants."""
        if not _is_elementwise(node, context):
            return None
        out_length = context.value(node).shape[2]
        sources, consts = [], []
        for n in node.all_input_nodes:
            value = context.value(n)
            if context.depends_on_input(n):
                if context.tracked(n):
                    if context.value(n).shape[2] != out_length:
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
        return cls(node, context.call(node), sources, consts)

    @property
    def folded(self) -> bool:
        """Whether the operation was folded into its source (the node is an alias)."""
        return self.call is identity

    def extent(self, extents: Sequence[Extent]) -> Extent:
        return union(extents)

    def may_overflow(self) -> bool:
        node = self.node
        if node.op == "call_method":
            return str(node.target).rstrip("_") in NON_FINITE_METHODS
        return node.op == "call_function" and INPLACE_FUNCTIONS.get(node.target, node.target) in NON_FINITE_FUNCTIONS

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        return self._apply(io, lambda n: io.window(n, extent), lambda n: io.const_window(n, extent))

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        return self._apply(io, lambda n: io.columns(n, lo, hi), lambda n: io.columns(n, lo, hi))

    def _apply(self, io: Inputs, source: Callable[[fx.Node], Any], const: Callable[[fx.Node], Any]) -> torch.Tensor:
        def resolve(n: fx.Node) -> Any:
            if n in self.sources:
                return source(n)
            if n in self.length_consts:
                return const(n)
            return io.value(n)

        args = map_arg(self.node.args, resolve)
        kwargs = map_arg(self.node.kwargs, resolve)
        return self.call(*args, **kwargs)


def _is_elementwise(node: fx.Node, context: Context) -> bool:
    module = context.module(node)
    if module is not None:
        if module.training:
            return False
        if isinstance(module, ELEMENTWISE_MODULES):
            return True
        if isinstance(module, nn.BatchNorm1d):
            return module.running_mean is not None and module.track_running_stats
        if isinstance(module, (nn.Softmax, nn.LogSoftmax)):
            return module.dim in (1, -2)
        return False
    if node.op == "call_method":
        name = str(node.target).rstrip("_")
        if name in CHANNEL_METHODS:
            return _dim_arg(node) in (1, -2)
        return name in ELEMENTWISE_METHODS
    if node.op != "call_function":
        return False
    target = INPLACE_FUNCTIONS.get(node.target, node.target)
    if target in CHANNEL_FUNCTIONS:
        return _dim_arg(node) in (1, -2)
    if target in DROPOUT_FUNCTIONS:
        bound = bind(node, ("input", "p", "training", "inplace"))
        return bound.get("training", True) is False
    if target is functional.batch_norm:
        bound = bind(node, ("input", "running_mean", "running_var", "weight", "bias", "training"))
        return bound.get("training", False) is False and bound["running_mean"] is not None
    return target in ELEMENTWISE_FUNCTIONS


def _dim_arg(node: fx.Node) -> Any:
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
