"""Build: which members get an incremental runner, and the engine using it."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import fx, nn

from deepmr_dist.ism.engine import FullRecompute, make_runner, saturation_mutagenesis
from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.incremental.rules.base import Context
from deepmr_dist.ism.incremental.rules.elementwise import ElementwiseRule
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.ensemble import freeze_dropout
from deepmr_dist.models.heads import OutputHead
from ism_models import ATOL, RTOL, check_all_mutants, needs_bpnet, one_hot, set_batchnorm_stats, small_bpnet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TransformerNet(nn.Module):
    """Attention over embedded positions: nothing position-local after the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(x.transpose(1, 2))).mean(dim=1))


class LSTMNet(nn.Module):
    """A recurrent model: nothing position-local."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 8, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(x.permute(0, 2, 1))
        return self.out(h[:, -1])


class TanhNet(nn.Module):
    """Two convolutions around a functional ``torch.tanh``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 5, padding=2)
        self.conv2 = nn.Conv1d(8, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.tanh(self.conv1(x)))


def sigmoid_for_tanh(node: fx.Node, context: Context) -> ElementwiseRule | None:
    """A wrong rule: ``torch.tanh`` computed as ``torch.sigmoid``."""
    if node.target is not torch.tanh or not context.tracked(node.args[0]):
        return None
    return ElementwiseRule(node, torch.sigmoid, [node.args[0]], [])


# --------------------------------------------------------------------------- fallback


@pytest.mark.parametrize(
    "model",
    [
        LSTMNet(),
        TransformerNet(),
        torch.jit.script(nn.Sequential(nn.Conv1d(4, 4, 3), nn.ReLU())),
    ],
    ids=["lstm", "transformer", "torchscript"],
)
def test_build__unanalysable_model_returns_none(model: nn.Module) -> None:
    assert build_incremental_runner(model.eval(), 30) is None


def test_build__runner_failing_its_check_returns_none(caplog: pytest.LogCaptureFixture) -> None:
    model = TanhNet().eval()
    check_all_mutants(model, one_hot(2, 30))  # the default rules are right
    wrong = Rules((sigmoid_for_tanh, *RULES.window), RULES.fused, RULES.delta)
    with caplog.at_level(logging.WARNING):
        assert build_incremental_runner(model, 30, rules=wrong) is None
    assert "incremental ISM disabled for TanhNet: reference: differs by" in caplog.text


def test_make_runner__unanalysable_model_falls_back_to_full_recompute() -> None:
    assert isinstance(make_runner(LSTMNet().eval(), 30), FullRecompute)


def test_make_runner__keeps_frozen_dropout_whole_so_mc_members_stay_incremental() -> None:
    member = freeze_dropout(set_batchnorm_stats(SimulationCNN(length=100, dropout=0.2)), seed=7)
    assert build_incremental_runner(member, 100) is None  # the engine's leaves are what make it traceable
    assert isinstance(make_runner(member, 100), IncrementalRunner)


# --------------------------------------------------------------------------- engine


def engine_outputs(
    members: list[nn.Module], head: OutputHead, x: torch.Tensor, incremental: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    runners = [make_runner(m, x.shape[2], incremental=incremental) for m in members]
    kind = IncrementalRunner if incremental else FullRecompute
    assert all(isinstance(r, kind) for r in runners)
    return saturation_mutagenesis(runners, head, x, mutant_batch=500)


@pytest.mark.parametrize(
    ("build", "head", "length"),
    [
        (lambda: set_batchnorm_stats(SimulationCNN(length=100)), OutputHead(), 100),
        pytest.param(small_bpnet, OutputHead(output_index=1), 300, marks=needs_bpnet),
        pytest.param(small_bpnet, OutputHead(output_index=0, profile_axis=-1, tasks=(1,)), 300, marks=needs_bpnet),
    ],
    ids=["simulation-cnn", "bpnet-counts", "bpnet-profile"],
)
def test_saturation_mutagenesis__incremental_equals_full(build, head: OutputHead, length: int) -> None:
    members = [build() for _ in range(2)]
    x = one_hot(2, length, n_columns=(length // 2,))
    ref_inc, mut_inc = engine_outputs(members, head, x, incremental=True)
    ref_full, mut_full = engine_outputs(members, head, x, incremental=False)
    torch.testing.assert_close(ref_inc, ref_full, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(mut_inc, mut_full, atol=ATOL, rtol=RTOL, equal_nan=True)
    n_tasks = mut_inc.shape[-1]
    assert torch.isnan(mut_inc).sum() == 2 * 2 * (length - 1) * n_tasks
