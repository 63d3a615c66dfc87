"""Zero-padded 1-d convolutions with stride 1: ``nn.Conv1d`` and ``F.conv1d``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.nn import functional

from deepmr_dist.ism.incremental.rules.base import Context, Extent, Gather, Inputs, Rule, bind, single
from deepmr_dist.ism.incremental.window import Conv


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

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> ConvRule | None:
        """The rule of a stride-1, zero-padded ``Conv1d`` module or ``conv1d`` call with constant weights."""
        module = context.module(node)
        if isinstance(module, nn.Conv1d) and not node.kwargs and len(node.args) == 1:
            if module.stride != (1,) or module.padding_mode != "zeros":
                return None
            weight, bias = module.weight, module.bias
            dilation, groups, padding = module.dilation[0], module.groups, module.padding
        elif node.op == "call_function" and node.target in (functional.conv1d, torch.conv1d):
            bound = bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"))
            if single(bound.get("stride", 1)) != 1 or any(
                isinstance(bound.get(k), fx.Node) and context.depends_on_input(bound[k]) for k in ("weight", "bias")
            ):
                return None
            weight = context.const(bound["weight"])
            bias = context.const(bound.get("bias"))
            dilation, groups = single(bound.get("dilation", 1)), bound.get("groups", 1)
            padding = bound.get("padding", 0)
        else:
            return None
        source = node.args[0]
        if not context.tracked(source):
            return None
        reach = dilation * (weight.shape[2] - 1)
        if padding == "valid":
            pad_left = 0
        elif padding == "same":
            pad_left = reach // 2
        else:
            pad_left = single(padding)
        first = source is context.x
        bias = None if bias is None else bias.detach()
        return cls(node, source, weight.detach(), bias, dilation, groups, pad_left, first)

    def _set_weights(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.bias = weight, bias
        self.conv = Conv(weight, bias, self.dilation, self.groups)
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
        change = functional.one_hot(batch.base, x.shape[1]).to(x.dtype) - x[batch.locus, :, batch.position]
        delta = (change @ self.delta_weight).view(batch.size, self.kernel, -1)
        rows[:, :: self.dilation] += delta
        return rows.transpose(1, 2)
