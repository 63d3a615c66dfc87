"""``Flatten`` / ``view`` / ``reshape`` followed by ``Linear``, computed as reference + change.

The flattening is FUSED (computed for references only); the ``Linear`` (or
the :class:`~deepmr_dist.ism.fusion.ops.GroupedLinear` of a fused ensemble,
one linear layer per block of channels) gets a :class:`LinearRule` that
multiplies each mutant's changed columns by the weight rows under its window.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn import functional

from deepmr_dist.ism.fusion.ops import GroupedLinear
from deepmr_dist.ism.incremental.rules.base import Context, DeltaRule, Extent, Inputs, bind


class LinearRule(DeltaRule):
    """``Linear`` over the flattened ``(channels, length)`` activation, in ``groups`` blocks of channels.

    Only the weight rows under a mutant's window see a change: mutants are
    bucketed by position and each bucket multiplies its changes by its own
    slice of the weight (one batched matrix product, per group).
    """

    MAX_STACK = 1 << 26
    """Largest number of elements of the pre-sliced weight stack; above it, slices are strided views."""

    def __init__(
        self, node: fx.Node, flat: fx.Node, source: fx.Node, weight: torch.Tensor, channels: int, length: int
    ) -> None:
        self.node = node
        self.fused_input = flat
        self.source = source
        self.groups, out = weight.shape[0], weight.shape[1]
        self.channels = channels // self.groups
        # (groups, length, channels, out): row l of a group holds the weights of its column l, channels-last.
        self.weight = weight.view(self.groups, out, self.channels, length).permute(0, 3, 2, 1).contiguous()
        self.stack = self.weight.view(self.groups, length, -1, out).transpose(0, 1)
        self.first = 0

    @property
    def per_column(self) -> int:
        """Multiply-adds per input column."""
        return self.groups * self.channels * self.weight.shape[3]

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> LinearRule | None:
        """The rule of a ``Linear`` whose input is a FUSED flattening (see :func:`fuses_flatten`)."""
        flat = node.args[0] if node.args else None
        if not context.fused(flat):
            return None
        weight = _linear_weight(node, context)
        source = flat.args[0]
        _, channels, length = context.value(source).shape
        return cls(node, flat, source, weight, channels, length)

    def prepare(self, extent: Extent, positions: int) -> None:
        """Stack the weight slices seen by windows at ``extent`` for positions ``0 .. positions - 1``.

        Rows outside the sequence get zero weights.
        """
        left, width = extent
        groups, length, channels, out = self.weight.shape
        pad_left, pad_right = max(0, -left), max(0, positions - 1 + left + width - length)
        padded = self.weight.new_zeros((groups, pad_left + length + pad_right, channels, out))
        padded[:, pad_left : pad_left + length] = self.weight
        rows = padded.shape[1]
        stack = padded.as_strided(
            (rows - width + 1, groups, width * channels, out), (channels * out, rows * channels * out, out, 1)
        )
        self.stack = stack.contiguous() if stack.numel() <= self.MAX_STACK else stack
        self.first = left + pad_left

    def run(self, io: Inputs, extent: Extent, length: int) -> torch.Tensor:
        batch = io.batch
        groups, width = self.groups, extent[1]
        # Columns outside the sequence meet zero weights, so finite garbage there needs no mask.
        change = self.change(io, self.source, extent, length, mask=not io.finite)
        if groups > 1:  # (n, width, groups * channels) -> (n, groups, width * channels)
            change = change.view(batch.size, width, groups, self.channels).transpose(1, 2)
        change = change.reshape(batch.size, groups, width * self.channels)
        low = int(batch.position.min())
        bucket = batch.position - low
        slot = _rank_within(bucket)
        n_buckets = int(bucket.max()) + 1
        rows = change.new_zeros((n_buckets, groups, int(slot.max()) + 1, change.shape[2]))
        rows[bucket, :, slot] = change
        start = low + self.first
        weights = self.stack[start : start + n_buckets].reshape(n_buckets * groups, *self.stack.shape[2:])
        out = torch.bmm(rows.view(n_buckets * groups, *rows.shape[2:]), weights)
        out = out.view(n_buckets, groups, *out.shape[1:])[bucket, :, slot].reshape(batch.size, -1)
        return torch.add(io.reference_output(self.node)[batch.locus], out)


def fuses_flatten(node: fx.Node, context: Context) -> bool:
    """Whether ``node`` flattens a LOCAL value for a ``Linear`` that is its only user."""
    users = list(node.users)
    return (
        len(users) == 1
        and _flatten_source(node, context) is not None
        and _linear_weight(users[0], context) is not None
        and users[0].args[0] is node
    )


def _flatten_source(node: fx.Node, context: Context) -> fx.Node | None:
    """The (batch, channels, length) source of a flattening to (batch, channels * length)."""
    source = node.args[0] if node.args else None
    if not context.local(source) or len(node.all_input_nodes) > 1 and not all(
        n is source or context.shape_only(n) for n in node.all_input_nodes
    ):
        return None
    shape = context.value(source).shape
    out = context.value(node)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (shape[0], shape[1] * shape[2]):
        return None
    module = context.module(node)
    if isinstance(module, nn.Flatten):
        return source if module.start_dim == 1 and module.end_dim == -1 else None
    if node.op == "call_function" and node.target is torch.flatten:
        return source
    if node.op == "call_method" and node.target in ("flatten", "view", "reshape"):
        return source
    return None


def _linear_weight(node: fx.Node, context: Context) -> torch.Tensor | None:
    """The constant weight ``(groups, out, in)`` of a ``Linear``, ``GroupedLinear`` or ``F.linear`` on one input.

    ``None`` for any other node.
    """
    module = context.module(node)
    if isinstance(module, (nn.Linear, GroupedLinear)) and len(node.args) == 1 and not node.kwargs:
        weight = module.weight.detach()
        return weight if isinstance(module, GroupedLinear) else weight.unsqueeze(0)
    if node.op == "call_function" and node.target is functional.linear:
        weight = bind(node, ("input", "weight", "bias")).get("weight")
        if isinstance(weight, fx.Node) and not context.depends_on_input(weight):
            return context.value(weight).detach().unsqueeze(0)
    return None


def _rank_within(groups: torch.Tensor) -> torch.Tensor:
    """For each element, how many earlier elements share its group."""
    order = torch.argsort(groups, stable=True)
    ordered = groups[order]
    index = torch.arange(groups.shape[0], device=groups.device)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    run_start = torch.cummax(torch.where(first, index, 0), dim=0).values
    return torch.empty_like(index).index_put_((order,), index - run_start)
