"""Verify: the build-time check of a runner against full forward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.incremental.verify import verify
from ism_models import DilatedResidualNet, one_hot, set_batchnorm_stats


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def runner_for(model: nn.Module, length: int, outputs: tuple[int, ...] | None = None) -> IncrementalRunner:
    runner = build_incremental_runner(model, length, outputs=outputs)
    assert runner is not None
    return runner


class Failing(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no forward pass today")


def test_verify__agrees_with_the_member_it_was_built_for() -> None:
    model = set_batchnorm_stats(DilatedResidualNet())
    assert verify(runner_for(model, 40), model, one_hot(2, 40, n_columns=(13,))) is None


def test_verify__reports_the_first_mismatch() -> None:
    model, other = set_batchnorm_stats(DilatedResidualNet()), set_batchnorm_stats(DilatedResidualNet())
    problem = verify(runner_for(model, 40), other, one_hot(2, 40))
    assert problem is not None and problem.startswith("reference: differs by")


def test_verify__compares_only_the_selected_outputs() -> None:
    model = set_batchnorm_stats(DilatedResidualNet())
    runner = runner_for(model, 40, outputs=(1,))
    x = one_hot(2, 40)
    assert verify(runner, model, x, outputs=(1,)) is None
    assert verify(runner, model, x) == "reference: 1 outputs instead of 2"


def test_verify__a_failure_is_reported_not_raised() -> None:
    model = set_batchnorm_stats(DilatedResidualNet())
    assert verify(runner_for(model, 40), Failing(), one_hot(2, 40)) == "RuntimeError: no forward pass today"
