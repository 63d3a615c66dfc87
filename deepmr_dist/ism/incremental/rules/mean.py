"""Mean or sum over the length (``AdaptiveAvgPool1d(1)`` included), computed as reference + change."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional

from deepmr_dist.ism.incremental.rules.base import Context, DeltaRule, Extent, Inputs, bind, single

REDUCTIONS: dict[Any, bool] = {torch.mean: True, torch.sum: False, "mean": True, "sum": False}
"""Reductions with a delta rule: target -> whether it divides by the length (mean)."""


class MeanRule(DeltaRule):
    """Mean or sum over the sequence axis: ``reference + (changed sum) / divisor``."""

    def __init__(self, node: fx.Node, source: fx.Node, divisor: int, keepdim: bool) -> None:
        self.node = node
        self.source = source
        self.divisor = divisor
        self.keepdim = keepdim

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> MeanRule | None:
        """The rule of a mean or sum over the last axis of a LOCAL value, or of a global average pool."""
        source = node.args[0] if node.args else None
        if not context.local(source) or len(node.all_input_nodes) != 1:
            return None
        length = context.value(source).shape[2]
        module = context.module(node)
        if isinstance(module, nn.AdaptiveAvgPool1d) or (
            node.op == "call_function" and node.target is functional.adaptive_avg_pool1d
        ):
            size = module.output_size if module is not None else bind(node, ("input", "output_size"))["output_size"]
            return cls(node, source, length, True) if single(size) == 1 else None
        key = node.target if node.op == "call_function" else str(node.target) if node.op == "call_method" else None
        if key not in REDUCTIONS:
            return None
        bound = bind(node, ("input", "dim", "keepdim"))
        if set(bound) - {"input", "dim", "keepdim"}:
            return None
        dim = bound.get("dim")
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if dims not in ((2,), (-1,)):
            return None
        divisor = length if REDUCTIONS[key] else 1
        return cls(node, source, divisor, bool(bound.get("keepdim", False)))

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        change = self.change(io, self.source, extent, length).sum(dim=1)
        if self.divisor != 1:
            change = change / self.divisor
        if self.keepdim:
            change = change.unsqueeze(-1)
        return io.reference_output(self.node)[io.batch.locus] + change
