"""The table of rules the planner tries on each node.

Each layer family's module defines its rule and the matcher that recognises
it; this table lists the matchers in the order they are tried (the first
match wins). A new layer type is one new module plus its line here, or, for
a one-off model, :meth:`Rules.extended` of :data:`RULES`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import fx

from deepmr_dist.ism.incremental.rules.base import Context, DeltaRule, Rule
from deepmr_dist.ism.incremental.rules.batchnorm import fold_batchnorm
from deepmr_dist.ism.incremental.rules.concat import concatenate
from deepmr_dist.ism.incremental.rules.conv import ConvRule
from deepmr_dist.ism.incremental.rules.crop import CropRule
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule
from deepmr_dist.ism.incremental.rules.linear import LinearRule, fuses_flatten
from deepmr_dist.ism.incremental.rules.mean import MeanRule
from deepmr_dist.ism.incremental.rules.relu import fuse_relu

WindowMatcher = Callable[[fx.Node, Context], Rule | None]
"""The rule computing a sequence-axis node on windows, or ``None`` if the node is not this rule's."""

FusedMatcher = Callable[[fx.Node, Context], bool]
"""Whether a node is computed for references only, its single user taking its change from the node's source."""

DeltaMatcher = Callable[[fx.Node, Context], DeltaRule | None]
"""The delta rule of a node without a sequence axis, or ``None`` if the node is not this rule's."""


@dataclass(frozen=True)
class Rules:
    """Matchers by what they produce, each tuple tried in order; a node no matcher takes is PLAIN."""

    window: tuple[WindowMatcher, ...]
    fused: tuple[FusedMatcher, ...]
    delta: tuple[DeltaMatcher, ...]

    def extended(
        self,
        *,
        window: Sequence[WindowMatcher] = (),
        fused: Sequence[FusedMatcher] = (),
        delta: Sequence[DeltaMatcher] = (),
    ) -> Rules:
        """This table with more matchers, tried after the ones it has."""
        return Rules(self.window + tuple(window), self.fused + tuple(fused), self.delta + tuple(delta))

    def window_rule(self, node: fx.Node, context: Context) -> Rule | None:
        """The first window rule that takes ``node``."""
        for match in self.window:
            rule = match(node, context)
            if rule is not None:
                return rule
        return None

    def is_fused(self, node: fx.Node, context: Context) -> bool:
        """Whether a fused matcher takes ``node``."""
        return any(match(node, context) for match in self.fused)

    def delta_rule(self, node: fx.Node, context: Context) -> DeltaRule | None:
        """The first delta rule that takes ``node``."""
        for match in self.delta:
            rule = match(node, context)
            if rule is not None:
                return rule
        return None


RULES = Rules(
    window=(
        ConvRule.match,
        fold_batchnorm,  # before the elementwise batch norm: folded when right after a convolution
        fuse_relu,  # before the elementwise ReLU: applied in place when right after a convolution
        CropRule.match,
        concatenate,
        ElementwiseRule.match,
    ),
    fused=(fuses_flatten,),
    delta=(MeanRule.match, LinearRule.match),
)
"""The rules of the layer families in :mod:`deepmr_dist.ism.incremental.rules`."""
