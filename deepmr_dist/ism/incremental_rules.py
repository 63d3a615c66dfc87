"""Position-local operations and how to compute them on windows of columns.

A *rule* describes one operation of a traced model whose output column ``j``
depends only on a bounded range of input columns (its *sources* are the
inputs carrying the sequence axis). It answers:

- :meth:`Rule.extent`: given where a mutation can change each source (a static
  interval relative to the mutated position), where can it change the output?
- :meth:`Rule.input_range`: which source columns produce output columns ``[lo, hi)``?
- :meth:`Rule.run_local` / :meth:`Rule.run_range`: compute the output on a
  window of changed columns per mutant, or on a fixed range of columns.
- :meth:`Rule.gathers`: which reference columns :meth:`Rule.run_local` reads.

*Delta rules* map a windowed input to an output without a sequence axis
(mean over length; ``Flatten -> Linear``) as ``reference output + effect of
the changed columns``.

Rules read their inputs through :class:`Inputs`, supplied by the runner.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from deepmr_dist.ism import window as W

Extent = tuple[int, int]
"""``(left, width)``: a mutation at ``p`` can change columns ``[p + left, p + left + width)``."""

Gather = tuple[fx.Node, int, int]
"""``(node, left, width)``: reference columns ``[p + left, p + left + width)`` of ``node`` are read."""


class Inputs(Protocol):
    """What a rule may read while it runs (implemented by the runner)."""

    batch: W.Batch
    finite: bool
    """Whether window columns outside the sequence are known to hold finite values."""

    def window(self, node: fx.Node, extent: Extent, zero_pad: bool = False) -> torch.Tensor:
        """A local source's window, widened with reference columns to ``extent``.

        With ``zero_pad``, columns outside the source's length are zero.
        """

    def columns(self, node: fx.Node, lo: int, hi: int) -> torch.Tensor:
        """Columns ``[lo, hi)`` of a source or length-wise constant; zero outside its length."""

    def const_window(self, node: fx.Node, extent: Extent) -> torch.Tensor:
        """Columns ``p + left + arange(width)`` of a length-wise constant, per mutant."""

    def value(self, node: fx.Node) -> Any:
        """The value of any other node (constant, shape arithmetic, untracked tensor)."""

    def length(self, node: fx.Node) -> int:
        """The sequence length of a tracked node."""

    def reference(self, node: fx.Node) -> W.PaddedRef:
        """The padded reference activation of a local node."""

    def reference_output(self, node: fx.Node) -> torch.Tensor:
        """The reference value of a delta-rule node."""


class Rule:
    """A position-local operation of ``node`` whose sequence-axis inputs are ``sources``."""

    node: fx.Node
    sources: tuple[fx.Node, ...]

    def extent(self, extents: Sequence[Extent]) -> Extent:
        """Output extent from the extents of ``sources``."""
        raise NotImplementedError

    def input_range(self, index: int, lo: int, hi: int) -> tuple[int, int]:
        """Columns of ``sources[index]`` needed for output columns ``[lo, hi)``."""
        return lo, hi

    def gathers(self, extents: Sequence[Extent], extent: Extent) -> list[Gather]:
        """Reference columns read by :meth:`run_local`, given the source and output extents."""
        return [(s, *extent) for s, e in zip(self.sources, extents, strict=True) if e != extent]

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        """The output window at ``extent`` for every mutant of ``io.batch``."""
        raise NotImplementedError

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        """Output columns ``[lo, hi)`` of every row (mutants, or references)."""
        raise NotImplementedError


def union(extents: Sequence[Extent]) -> Extent:
    """The smallest extent holding every extent."""
    left = min(e[0] for e in extents)
    return left, max(e[0] + e[1] for e in extents) - left


# --------------------------------------------------------------------------- convolution


class ConvRule(Rule):
    """Zero-padded ``Conv1d`` with stride 1 (any padding, dilation and groups).

    On the model input itself (``first_layer``), a mutant's window is the
    reference output plus the weights times the change of one one-hot column,
    with no convolution at all. An eval-mode batch norm right after the
    convolution can be folded into its weights (:meth:`fold`), and a ReLU
    after it applied in place (:meth:`fuse_relu`).
    """

    def __init__(
        self,
        node: fx.Node,
        source: fx.Node,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        dilation: int,
        groups: int,
        pad_left: int,
        first_layer: bool,
    ) -> None:
        self.node = node
        self.sources = (source,)
        self.kernel = weight.shape[2]
        self.dilation = dilation
        self.groups = groups
        self.pad_left = pad_left
        self.reach = dilation * (self.kernel - 1)
        self.first_layer = first_layer and groups == 1
        self.relu = False
        self._set_weights(weight, bias)

    def _set_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.conv = W.Conv(weight, bias, self.dilation, self.groups)
        # Row c of a one-hot change maps to window columns j = 0, d, ..., reach,
        # column j taking kernel tap (kernel - 1 - j / dilation).
        flipped = weight.flip(2).permute(1, 2, 0)  # (in, kernel, out)
        self.delta_weight = flipped.reshape(weight.shape[1], -1).contiguous()

    def fuse_relu(self) -> None:
        """Apply ReLU in place on the convolution's output (not on a first layer: its delta needs pre-activations)."""
        assert not self.first_layer
        self.relu = True

    def fold(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Apply ``out * scale + shift`` (per output channel) inside the convolution."""
        bias = shift if self.bias is None else self.bias * scale + shift
        self._set_weights(self.weight * scale[:, None, None], bias)

    def extent(self, extents: Sequence[Extent]) -> Extent:
        left, width = extents[0]
        return left + self.pad_left - self.reach, width + self.reach

    def input_range(self, index: int, lo: int, hi: int) -> tuple[int, int]:
        return lo - self.pad_left, hi - self.pad_left + self.reach

    def gathers(self, extents: Sequence[Extent], extent: Extent) -> list[Gather]:
        if self.first_layer:
            return [(self.node, *extent)]
        left, width = extents[0]
        return [(self.sources[0], left - self.reach, width + 2 * self.reach)]

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        if self.first_layer:
            return self._first_layer(io, extent)
        source_left = extent[0] - self.pad_left
        data = io.window(self.sources[0], (source_left, extent[1] + self.reach), zero_pad=self.pad_left > 0)
        return self._activate(self.conv(data))

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        need_lo, need_hi = self.input_range(0, lo, hi)
        # Zero columns needed on both sides are left to the convolution's own padding.
        padding = max(0, min(-need_lo, need_hi - io.length(self.sources[0])))
        data = io.columns(self.sources[0], need_lo + padding, need_hi - padding)
        return self._activate(self.conv(data, padding))

    def _activate(self, out: torch.Tensor) -> torch.Tensor:
        return out.relu_() if self.relu else out

    def _first_layer(self, io: Inputs, extent: Extent) -> torch.Tensor:
        batch = io.batch
        rows = io.reference(self.node).gather_rows(batch, extent[0], extent[1])
        x = batch.x
        change = F.one_hot(batch.base, x.shape[1]).to(x.dtype) - x[batch.locus, :, batch.position]
        delta = (change @ self.delta_weight).view(batch.size, self.kernel, -1)
        rows[:, :: self.dilation] += delta
        return rows.transpose(1, 2)


# --------------------------------------------------------------------------- elementwise and friends


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

    @property
    def folded(self) -> bool:
        """Whether the operation was folded into its source (the node is an alias)."""
        return self.call is identity

    def extent(self, extents: Sequence[Extent]) -> Extent:
        return union(extents)

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


class CropRule(Rule):
    """Selection of channels and of a contiguous range ``[start, ...)`` of columns."""

    def __init__(self, node: fx.Node, source: fx.Node, channels: slice, start: int) -> None:
        self.node = node
        self.sources = (source,)
        self.channels = channels
        self.start = start

    def extent(self, extents: Sequence[Extent]) -> Extent:
        left, width = extents[0]
        return left - self.start, width

    def input_range(self, index: int, lo: int, hi: int) -> tuple[int, int]:
        return lo + self.start, hi + self.start

    def gathers(self, extents: Sequence[Extent], extent: Extent) -> list[Gather]:
        return []

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        data = io.window(self.sources[0], (extent[0] + self.start, extent[1]))
        return data[:, self.channels]

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        return io.columns(self.sources[0], lo + self.start, hi + self.start)[:, self.channels]


# --------------------------------------------------------------------------- delta rules


class DeltaRule:
    """An operation from a windowed input to an output without a sequence axis."""

    node: fx.Node
    source: fx.Node

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        """The output for every mutant, from the source's window at ``extent``."""
        raise NotImplementedError

    @staticmethod
    def change(io: Inputs, source: fx.Node, extent: Extent, length: int, mask: bool = True) -> torch.Tensor:
        """``mutant - reference`` over the window, as rows ``(n, width, channels)``.

        With ``mask``, columns outside the sequence are zero; otherwise they hold whatever the window held there.
        """
        batch = io.batch
        ref = io.reference(source).gather_rows(batch, *extent)
        rows = torch.sub(io.window(source, extent).transpose(1, 2), ref, out=ref)
        if mask:
            W.zero_outside(rows, batch.valid(extent[0], extent[1], length), io.finite)
        return rows


class MeanRule(DeltaRule):
    """Mean or sum over the sequence axis: ``reference + (changed sum) / divisor``."""

    def __init__(self, node: fx.Node, source: fx.Node, divisor: int, keepdim: bool) -> None:
        self.node = node
        self.source = source
        self.divisor = divisor
        self.keepdim = keepdim

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        change = self.change(io, self.source, extent, length).sum(dim=1)
        if self.divisor != 1:
            change = change / self.divisor
        if self.keepdim:
            change = change.unsqueeze(-1)
        return io.reference_output(self.node)[io.batch.locus] + change


class LinearRule(DeltaRule):
    """``Linear`` over the flattened ``(channels, length)`` activation.

    Only the weight rows under a mutant's window see a change: mutants are
    bucketed by position and each bucket multiplies its changes by its own
    slice of the weight (one batched matrix product).
    """

    MAX_STACK = 1 << 26
    """Largest number of elements of the pre-sliced weight stack; above it, slices are strided views."""

    def __init__(self, node: fx.Node, source: fx.Node, weight: torch.Tensor, channels: int, length: int) -> None:
        self.node = node
        self.source = source
        out = weight.shape[0]
        # (length, channels, out): row l holds the weights of column l, channels-last like the windows.
        self.weight = weight.view(out, channels, length).permute(2, 1, 0).contiguous()
        self.stack = self.weight.view(length, 1, -1)
        self.first = 0

    def prepare(self, extent: Extent, positions: int) -> None:
        """Stack the weight slices seen by windows at ``extent`` for positions ``0 .. positions - 1``.

        Rows outside the sequence get zero weights.
        """
        left, width = extent
        length, channels, out = self.weight.shape
        pad_left, pad_right = max(0, -left), max(0, positions - 1 + left + width - length)
        padded = self.weight.new_zeros((pad_left + length + pad_right, channels, out))
        padded[pad_left : pad_left + length] = self.weight
        stack = padded.as_strided((padded.shape[0] - width + 1, width * channels, out), (channels * out, out, 1))
        self.stack = stack.contiguous() if stack.numel() <= self.MAX_STACK else stack
        self.first = left + pad_left

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        batch = io.batch
        # Columns outside the sequence meet zero weights, so finite garbage there needs no mask.
        change = self.change(io, self.source, extent, length, mask=not io.finite).view(batch.size, -1)
        low = int(batch.position.min())
        bucket = batch.position - low
        slot = _rank_within(bucket)
        n_buckets = int(bucket.max()) + 1
        rows = change.new_zeros((n_buckets, int(slot.max()) + 1, change.shape[1]))
        rows[bucket, slot] = change
        start = low + self.first
        out = torch.bmm(rows, self.stack[start : start + n_buckets])
        return torch.add(io.reference_output(self.node)[batch.locus], out[bucket, slot])


def _rank_within(groups: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements share its group."""
    order = torch.argsort(groups, stable=True)
    ordered = groups[order]
    index = torch.arange(groups.shape[0], device=groups.device)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(first, index, 0), dim=0).values
    return torch.empty_like(index).index_put_((order,), index - run_start)


# --------------------------------------------------------------------------- operation tables

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.PReLU,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip

ELEMENTWISE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, torch.exp, torch.log,
    torch.log1p, torch.expm1, torch.abs, torch.neg, torch.square, torch.sqrt, torch.rsqrt,
    torch.sin, torch.cos, torch.erf, torch.clamp, torch.clip, torch.nan_to_num, F.gelu, F.silu,
    F.elu, F.selu, F.celu, F.leaky_relu, F.softplus, F.relu6, F.hardtanh, F.hardswish,
    F.hardsigmoid, F.mish, F.logsigmoid, F.softsign, operator.neg, operator.pos, operator.abs,
    operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add,
    torch.sub, torch.mul, torch.div, torch.true_divide, torch.pow, torch.maximum, torch.minimum,
    torch.where,
})  # fmt: skip

ELEMENTWISE_METHODS: frozenset[str] = frozenset({
    "relu", "sigmoid", "tanh", "exp", "log", "log1p", "expm1", "abs", "neg", "square", "sqrt",
    "rsqrt", "clamp", "clip", "add", "sub", "mul", "div", "pow", "float", "contiguous", "clone",
})  # fmt: skip

CHANNEL_FUNCTIONS: frozenset[Any] = frozenset({F.softmax, F.log_softmax, torch.softmax, torch.log_softmax})
"""Operations along one axis, local when that axis is the channel axis."""

CHANNEL_METHODS: frozenset[str] = frozenset({"softmax", "log_softmax"})

NON_FINITE_FUNCTIONS: frozenset[Any] = frozenset({
    torch.log, torch.log1p, torch.sqrt, torch.rsqrt, torch.exp, torch.expm1, torch.div, torch.true_divide,
    operator.truediv, torch.pow, operator.pow,
})  # fmt: skip
"""Elementwise operations that can turn finite values into inf or NaN."""

NON_FINITE_METHODS: frozenset[str] = frozenset({"log", "log1p", "sqrt", "rsqrt", "exp", "expm1", "div", "pow"})

DROPOUT_FUNCTIONS: frozenset[Any] = frozenset({F.dropout, F.dropout1d, F.alpha_dropout, F.feature_alpha_dropout})

REDUCTIONS: dict[Any, bool] = {torch.mean: True, torch.sum: False, "mean": True, "sum": False}
"""Reductions with a delta rule: target -> whether it divides by the length (mean)."""

CAT_FUNCTIONS: frozenset[Any] = frozenset({torch.cat, torch.concat, torch.concatenate})

RELU_FUNCTIONS: frozenset[Any] = frozenset({torch.relu, F.relu, torch.relu_, F.relu_})
