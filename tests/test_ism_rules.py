"""Rules: the table the planner matches nodes with, and what each family's matcher takes."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import fx, nn

from deepmr_dist.ism.incremental.plan import Kind, Plan, analyse
from deepmr_dist.ism.incremental.rules.base import Context, Extent, Inputs, Rule
from deepmr_dist.ism.incremental.rules.conv import ConvRule
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.trace import trace
from ism_models import check_all_mutants, one_hot, set_batchnorm_stats


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- a new layer type


class ChannelScale(nn.Module):
    """A layer type the default rules do not know (kept whole by the tracer): one factor per channel."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None]


class ChannelScaleRule(Rule):
    """Its rule, with its own matcher: all a new layer type needs."""

    def __init__(self, node: fx.Node, source: fx.Node, weight: torch.Tensor) -> None:
        self.node = node
        self.sources = (source,)
        self.weight = weight[:, None]

    @classmethod
    def match(cls, node: fx.Node, context: Context) -> ChannelScaleRule | None:
        module = context.module(node)
        if not isinstance(module, ChannelScale) or not context.tracked(node.args[0]):
            return None
        return cls(node, node.args[0], module.weight.detach())

    def extent(self, extents: Sequence[Extent]) -> Extent:
        return extents[0]

    def run_local(self, io: Inputs, extent: Extent) -> torch.Tensor:
        return io.window(self.sources[0], extent) * self.weight

    def run_range(self, io: Inputs, lo: int, hi: int) -> torch.Tensor:
        return io.columns(self.sources[0], lo, hi) * self.weight


class ScaledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5, padding=2)
        self.scale = ChannelScale(6)
        self.conv2 = nn.Conv1d(6, 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.scale(self.conv1(x)))).mean(dim=-1)


def test_registered_rule__new_layer_type_is_windowed_and_exact() -> None:
    model = ScaledNet().eval()
    rules = RULES.extended(window=(ChannelScaleRule.match,))
    runner = check_all_mutants(model, one_hot(2, 40, n_columns=(0, 39)), leaves={ChannelScale: None}, rules=rules)
    steps = {node.name: step for node, step in runner.plan.steps.items()}
    assert isinstance(steps["scale"].rule, ChannelScaleRule) and steps["scale"].kind is Kind.LOCAL
    assert {steps[n].kind for n in ("conv2", "relu")} == {Kind.LOCAL} and steps["mean"].kind is Kind.DELTA


def test_unregistered_rule__the_same_layer_is_plain() -> None:
    gm = trace(ScaledNet().eval(), leaves=(ChannelScale,))
    assert gm is not None
    with torch.inference_mode():
        steps = analyse(gm, 40, one_hot(2, 40)).steps
    assert {n.name: s.kind for n, s in steps.items() if n.name in ("scale", "conv2", "mean")} == {
        "scale": Kind.PLAIN,
        "conv2": Kind.PLAIN,
        "mean": Kind.PLAIN,
    }


def test_extended__appends_after_the_table_and_leaves_it_unchanged() -> None:
    window = RULES.window
    rules = RULES.extended(window=(ChannelScaleRule.match,))
    assert rules.window == (*window, ChannelScaleRule.match) and RULES.window == window
    assert rules.fused == RULES.fused and rules.delta == RULES.delta
    assert isinstance(rules, Rules)


# --------------------------------------------------------------------------- table order


class NormNet(nn.Module):
    """A batch norm and a ReLU right after a convolution, and each again after a sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5, padding=2)
        self.bn1 = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.conv2(h))
        return torch.relu(self.bn2(torch.sigmoid(h))).mean(dim=-1)


def plan(model: nn.Module, length: int) -> Plan:
    gm = trace(model)
    assert gm is not None
    with torch.inference_mode():
        return analyse(gm, length, one_hot(2, length))


def test_norm_and_relu__folded_into_a_convolution_before_them_else_columnwise() -> None:
    model = set_batchnorm_stats(NormNet())
    rules = {node.name: step.rule for node, step in plan(model, 30).steps.items()}
    assert isinstance(rules["conv1"], ConvRule) and not rules["conv1"].relu  # first layer: needs pre-activations
    assert isinstance(rules["conv2"], ConvRule) and rules["conv2"].relu
    assert all(isinstance(rules[n], ElementwiseRule) and rules[n].folded for n in ("bn1", "relu_1"))
    assert all(isinstance(rules[n], ElementwiseRule) and not rules[n].folded for n in ("relu", "bn2", "relu_2"))
    check_all_mutants(model, one_hot(2, 30, n_columns=(0, 29)))
