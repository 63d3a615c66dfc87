"""Run: incremental runners agree with full forward passes on every mutant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmr_dist.ism.engine import FullRecompute
from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.ensemble import freeze_dropout

from ism_models import ATOL, bpnetlite, RTOL, DilatedResidualNet, FunctionalNet, MaskedConvNet, check_all_mutants, needs_bpnet, one_hot, set_batchnorm_stats, small_bpnet


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- exactness


def test_simulation_cnn__all_mutants_match_full_recompute() -> None:
    model = set_batchnorm_stats(SimulationCNN(length=100))
    check_all_mutants(model, one_hot(3, 100, n_columns=(0, 41, 99)))


def test_dilated_residual_net__profile_and_pooled_counts_match() -> None:
    model = set_batchnorm_stats(DilatedResidualNet())
    check_all_mutants(model, one_hot(2, 60, n_columns=(0, 59)))


def test_masked_net__frozen_mask_view_flatten_and_inplace_ops_match() -> None:
    model = MaskedConvNet(50).eval()
    check_all_mutants(model, one_hot(2, 50, n_columns=(1, 48)))


def test_functional_net__cat_narrow_softmax_and_pooled_tail_match() -> None:
    model = FunctionalNet(40).eval()
    check_all_mutants(model, one_hot(2, 40, n_columns=(0, 39)))


def test_mc_dropout_members__frozen_masks_in_dense_and_conv_layers_match() -> None:
    conv_dropout = nn.Sequential(
        nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Dropout(0.3), nn.Conv1d(8, 8, 3), nn.Flatten(), nn.Linear(304, 2)
    )
    for model in (SimulationCNN(length=100, dropout=0.2), conv_dropout):
        member = freeze_dropout(set_batchnorm_stats(model), seed=7)
        length = 100 if isinstance(model, SimulationCNN) else 40
        check_all_mutants(member, one_hot(2, length, n_columns=(3,)))


@needs_bpnet
def test_bpnet__profile_and_counts_match_including_edges_and_n() -> None:
    model = small_bpnet()
    check_all_mutants(model, one_hot(1, 400, n_columns=(0, 200, 399)))


@needs_bpnet
def test_chrombpnet__two_towers_match() -> None:
    bias = bpnetlite.BPNet(n_filters=8, n_layers=2, n_outputs=1, n_control_tracks=0, trimming=30, verbose=False)
    accessibility = small_bpnet(trimming=30)
    accessibility.fconv = nn.Conv1d(16, 1, 75, padding=37)
    model = bpnetlite.chrombpnet.ChromBPNet(bias, accessibility).eval()
    check_all_mutants(model, one_hot(1, 200, n_columns=(100,)))


@needs_bpnet
def test_bpnet__column_ranges_before_a_wide_crop_match() -> None:
    check_all_mutants(small_bpnet(trimming=120), one_hot(1, 300))


@needs_bpnet
def test_bpnet__selected_output_alone_is_computed_and_matches() -> None:
    model = small_bpnet()
    x = one_hot(1, 400, n_columns=(7,))
    runner = build_incremental_runner(model, 400, outputs=(1,))
    assert runner is not None
    locus, position, base = mutation_list(x)
    with torch.inference_mode():
        ref, cache = runner.reference(x)
        profile, counts = runner.mutants(x, cache, locus, position, base)
        want = FullRecompute(model).mutants(x, None, locus, position, base)
    assert ref[0] is None and profile is None
    torch.testing.assert_close(counts, want[1], atol=ATOL, rtol=RTOL)
