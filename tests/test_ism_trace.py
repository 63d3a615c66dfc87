"""Trace: what can be traced, leaf modules kept whole and rewritten, in-place operations run out of place."""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

from deepmr_dist.ism.incremental.trace import node_call, rewrite_leaves, trace
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.models.ensemble import FrozenDropout, freeze_dropout
from ism_models import one_hot


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class WithDefault(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 2, 3)

    def forward(self, x: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
        return self.conv(x) * scale


class TwoInputs(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_trace__binds_optional_arguments_to_their_defaults() -> None:
    model = WithDefault().eval()
    gm = trace(model)
    assert gm is not None
    x = one_hot(2, 20)
    assert torch.equal(gm(x), model(x))


@pytest.mark.parametrize(
    "model",
    [TwoInputs(), DataDependent(), torch.jit.script(nn.Sequential(nn.Conv1d(4, 4, 3)))],
    ids=["second-required-argument", "data-dependent", "torchscript"],
)
def test_trace__untraceable_members_give_none(model: nn.Module) -> None:
    assert trace(model) is None


def mc_member() -> nn.Module:
    model = nn.Sequential(nn.Conv1d(4, 6, 5, padding=2), nn.ReLU(), nn.Dropout(0.3), nn.Conv1d(6, 2, 3))
    return freeze_dropout(model, seed=3)


def test_trace__leaf_types_come_from_the_caller() -> None:
    member = mc_member()
    assert trace(member) is None  # FrozenDropout's mask needs the input's concrete shape
    gm = trace(member, leaves=MODEL_LEAVES.keys())
    assert gm is not None
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["0", "1", "2", "3"]


def test_rewrite_leaves__frozen_dropout_becomes_a_product_with_its_mask() -> None:
    member = mc_member()
    gm = trace(member, leaves=MODEL_LEAVES.keys())
    assert gm is not None
    x = one_hot(3, 30)
    rewrite_leaves(gm, MODEL_LEAVES, x[:2])
    modules = [gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"]
    assert not any(isinstance(m, FrozenDropout) for m in modules)
    products = [n for n in gm.graph.nodes if n.target is operator.mul]
    assert len(products) == 1 and products[0].args[1].op == "get_attr"
    with torch.inference_mode():
        assert torch.equal(gm(x), member(x))


def test_rewrite_leaves__a_leaf_without_rewrite_stays_a_call() -> None:
    member = mc_member()
    gm = trace(member, leaves=MODEL_LEAVES.keys())
    assert gm is not None
    code = gm.code
    rewrite_leaves(gm, {FrozenDropout: None}, one_hot(2, 30))
    assert gm.code == code


class InPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x - 0.5)
        h = h.view(h.shape[0], -1)
        return torch.relu_(h.mul_(2.0))


def test_node_call__in_place_operations_run_out_of_place() -> None:
    gm = trace(InPlace())
    assert gm is not None
    calls = {n.name: node_call(gm, n) for n in gm.graph.nodes if n.op.startswith("call_")}
    assert calls["act"] is not gm.act and calls["act"].inplace is False and gm.act.inplace is True
    x = torch.randn(2, 4, 5).transpose(1, 2)  # not contiguous: view would fail, reshape does not
    kept = x.clone()
    assert torch.equal(calls["view"](x, 2, -1), x.reshape(2, -1)) and torch.equal(calls["mul_"](x, 2.0), x * 2.0)
    assert torch.equal(calls["relu_"](x), x.relu()) and torch.equal(calls["act"](x), x.relu())
    assert torch.equal(x, kept)
