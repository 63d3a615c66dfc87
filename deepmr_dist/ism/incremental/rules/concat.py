"""Concatenation along the channel axis of tracked values of one length."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from deepmr_dist.ism.incremental.rules.base import Context, Rule, bind
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule

CAT_FUNCTIONS: frozenset[Any] = frozenset({torch.cat, torch.concat, torch.concatenate})


def concatenate(node: fx.Node, context: Context) -> Rule | None:
    """``torch.cat`` of tracked values along channels: columnwise, so an :class:`ElementwiseRule`."""
    if node.op != "call_function" or node.target not in CAT_FUNCTIONS:
        return None
    bound = bind(node, ("tensors", "dim"))
    tensors = bound["tensors"]
    if bound.get("dim", 0) not in (1, -2) or not all(context.tracked(t) for t in tensors):
        return None
    lengths = {context.value(t).shape[2] for t in tensors}
    if lengths != {context.value(node).shape[2]}:
        return None
    return ElementwiseRule(node, context.call(node), tensors, [])
