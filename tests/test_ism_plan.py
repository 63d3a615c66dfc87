"""Plan: the kind of each node of a traced member."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmr_dist.ism.incremental.plan import Kind, Plan, analyse
from deepmr_dist.ism.incremental.trace import trace
from ism_models import FunctionalNet, MaskedConvNet, check_all_mutants, needs_bpnet, one_hot, small_bpnet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def plan(model: nn.Module, length: int, outputs: tuple[int, ...] | None = None) -> Plan:
    gm = trace(model)
    assert gm is not None
    with torch.inference_mode():
        return analyse(gm, length, one_hot(2, length), outputs)


def kinds(plan: Plan) -> dict[str, Kind]:
    return {node.name: step.kind for node, step in plan.steps.items()}


class Opaque(nn.Module):
    """A position-local operation the planner cannot see into (a leaf no rule takes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5 + 1.0


class OpaqueNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5, padding=2)
        self.opaque = Opaque()
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.opaque(self.conv1(x))).mean(dim=-1)


class TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.conv(x)
        return h, h.mean(dim=-1)


def test_functional_net__windowed_convolution_and_plain_pooled_tail() -> None:
    got = kinds(plan(FunctionalNet(40).eval(), 40))
    assert got["conv1d"] is Kind.LOCAL and got["max_pool1d"] is Kind.PLAIN


def test_masked_net__constant_mask_shape_arithmetic_and_fused_flatten_before_dense() -> None:
    got = kinds(plan(MaskedConvNet(50).eval(), 50))
    assert got["x"] is Kind.LOCAL and got["conv1"] is Kind.LOCAL and got["mul"] is Kind.LOCAL
    assert got["mask"] is Kind.CONST and got["size"] is Kind.META
    assert got["view"] is Kind.FUSED and got["dense"] is Kind.DELTA


def test_unknown_leaf_layer__is_plain_and_so_is_everything_after_it() -> None:
    model = OpaqueNet().eval()
    gm = trace(model, leaves=(Opaque,))
    assert gm is not None
    with torch.inference_mode():
        got = kinds(analyse(gm, 30, one_hot(2, 30)))
    assert got == {"x": Kind.LOCAL, "conv1": Kind.LOCAL, "opaque": Kind.PLAIN, "conv2": Kind.PLAIN, "mean": Kind.PLAIN}
    check_all_mutants(model, one_hot(2, 30), leaves={Opaque: None})


@needs_bpnet
def test_bpnet__windows_saturate_into_column_ranges_before_crop() -> None:
    assert {Kind.LOCAL, Kind.RANGE} <= set(kinds(plan(small_bpnet(trimming=120), 300)).values())


@needs_bpnet
def test_bpnet__selected_output_skips_the_profile_layers() -> None:
    assert "fconv" not in kinds(plan(small_bpnet(), 400, outputs=(1,)))


def test_outputs__selected_elements_only_and_bad_selections_are_errors() -> None:
    selected = plan(TwoOutputs().eval(), 20, outputs=(-1,))
    assert selected.outputs[0] is None and "mean" in kinds(selected)
    with pytest.raises(ValueError, match="returns a single value"):
        plan(FunctionalNet(40).eval(), 40, outputs=(0,))
    with pytest.raises(ValueError, match="out of range"):
        plan(TwoOutputs().eval(), 20, outputs=(2,))
