"""Eval-mode ``BatchNorm1d`` right after a convolution, folded into that convolution's weights.

A batch norm anywhere else is columnwise and matched by :mod:`.elementwise`.
"""

from __future__ import annotations

import torch
from torch import fx, nn

from deepmr_dist.ism.incremental.rules.base import Context, Rule
from deepmr_dist.ism.incremental.rules.conv import ConvRule
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule, identity


def fold_batchnorm(node: fx.Node, context: Context) -> Rule | None:
    """An eval-mode ``BatchNorm1d`` that is the only user of a convolution: folded into it.

    Returns an alias of the convolution (its rule now applies the norm), or ``None``.
    """
    module = context.module(node)
    source = node.args[0] if node.args else None
    if not isinstance(module, nn.BatchNorm1d) or module.training or module.running_var is None:
        return None
    if not context.tracked(source) or len(source.users) != 1 or len(node.args) != 1 or node.kwargs:
        return None
    conv = context.rule(source)
    if not isinstance(conv, ConvRule):
        return None
    scale = torch.rsqrt(module.running_var + module.eps)
    shift = -module.running_mean * scale
    if module.affine:
        scale, shift = scale * module.weight, shift * module.weight + module.bias
    conv.fold(scale.detach(), shift.detach())
    return ElementwiseRule(node, identity, [source], [])
