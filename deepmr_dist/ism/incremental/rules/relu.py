"""A ReLU right after a convolution, applied in place on that convolution's output.

A ReLU anywhere else is columnwise and matched by :mod:`.elementwise`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional

from deepmr_dist.ism.incremental.rules.base import Context, Rule
from deepmr_dist.ism.incremental.rules.conv import ConvRule
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule, identity

RELU_FUNCTIONS: frozenset[Any] = frozenset({torch.relu, functional.relu, torch.relu_, functional.relu_})


def fuse_relu(node: fx.Node, context: Context) -> Rule | None:
    """A ReLU whose input is a convolution (possibly through folded norms) used only by it.

    Returns an alias of its input (the convolution's rule now applies the ReLU), or ``None``.
    """
    source = node.args[0] if node.args else None
    if not _is_relu(node, context) or len(node.args) != 1 or not context.tracked(source):
        return None
    producer = source
    while isinstance(rule := context.rule(producer), ElementwiseRule) and rule.folded:
        if len(producer.users) != 1:
            return None
        producer = producer.args[0]
    conv = context.rule(producer)
    if not isinstance(conv, ConvRule) or conv.first_layer or conv.relu or len(producer.users) != 1:
        return None
    if len(source.users) != 1:
        return None
    conv.fuse_relu()
    return ElementwiseRule(node, identity, [source], [])


def _is_relu(node: fx.Node, context: Context) -> bool:
    if node.op == "call_module":
        return isinstance(context.module(node), nn.ReLU)
    if node.op == "call_method":
        return node.target in ("relu", "relu_")
    return node.op == "call_function" and node.target in RELU_FUNCTIONS
