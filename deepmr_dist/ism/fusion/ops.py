"""Operations of fused networks that torch has no module for: a linear layer per member.

:class:`GroupedLinear` is the fused form of the members' ``Linear`` layers on
features concatenated member by member; the incremental engine knows it
(:mod:`deepmr_dist.ism.incremental.rules.linear`) and the tracer keeps it
whole (:data:`FUSED_LEAVES`).
"""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from deepmr_dist.ism.incremental.trace import Leaves


class GroupedLinear(nn.Module):
    """``groups`` independent linear layers on ``(batch, groups * in_features)``, one batched product.

    Parameters
    ----------
    weight
        ``(groups, out_features, in_features)``: group ``g`` maps input
        features ``[g * in, (g + 1) * in)`` to outputs ``[g * out, (g + 1) * out)``.
    bias
        ``(groups * out_features,)`` or ``None``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.groups, self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, groups * in_features) -> (batch, groups * out_features)``."""
        batch = x.shape[0]
        rows = x.reshape(batch, self.groups, self.in_features).transpose(0, 1)
        weight = self.weight.transpose(1, 2)
        if self.bias is None:
            out = torch.bmm(rows, weight)
        else:
            out = torch.baddbmm(self.bias.view(self.groups, 1, self.out_features), rows, weight)
        return out.transpose(0, 1).reshape(batch, self.groups * self.out_features)

    def extra_repr(self) -> str:
        return f"groups={self.groups}, in_features={self.in_features}, out_features={self.out_features}"


FUSED_LEAVES: Leaves = MappingProxyType({GroupedLinear: None})
"""Modules of fused networks the tracer keeps whole (they have no rewrite)."""
