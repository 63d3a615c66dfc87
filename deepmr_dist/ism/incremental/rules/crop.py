"""Channel selection and cropping along the length: indexing with slices, ``narrow``."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from deepmr_dist.ism.incremental.rules.base import Context, Extent, Gather, Inputs, Rule, bind


class CropRule(Rule):
    """Selection of channels and of a contiguous range ``[start, ...)`` of columns."""

    def __init__(self, node: fx.Node, source: fx.Node, channels: slice, start: int) -> None:
        self.node = node
        self.sources = (source,)
        self.channels = channels
        self.start = start

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> CropRule | None:
        """The rule of ``x[:, channels, start:stop]`` or ``x.narrow(2, start, length)`` on a tracked ``x``."""
        source = node.args[0] if node.args else None
        if not context.tracked(source):
            return None
        in_length = context.value(source).shape[2]
        if node.op == "call_function" and node.target is operator.getitem:
            index = map_arg(node.args[1], context.const)
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
            bound = map_arg(bind(node, ("input", "dim", "start", "length")), context.const)
            if bound.get("dim") not in (2, -1) or not isinstance(bound.get("start"), int):
                return None
            channels, start = slice(None), bound["start"] % in_length if bound["start"] < 0 else bound["start"]
        else:
            return None
        return cls(node, source, channels, start)

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


def _expand_index(index: tuple[Any, ...]) -> tuple[Any, Any, Any] | None:
    """A 3-d indexing tuple with ``...`` expanded; ``None`` if it adds or drops axes."""
    if any(i is None or isinstance(i, (int, torch.Tensor, list)) for i in index):
        return None
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (3 - len(index) + 1) + index[at + 1 :]
    index = index + (slice(None),) * (3 - len(index))
    return index if len(index) == 3 else None  # type: ignore[return-value]
