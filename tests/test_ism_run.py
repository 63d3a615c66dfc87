"""Run: incremental runners agree with full forward passes on every mutant."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepmr_dist.ism.engine import FullRecompute
from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.incremental.trace import Leaves
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.ensemble import freeze_dropout

try:
    import bpnetlite
    import bpnetlite.chrombpnet
except ImportError:  # the BPNet cases need the benchmarks extra
    bpnetlite = None

needs_bpnet = pytest.mark.skipif(bpnetlite is None, reason="bpnet-lite is not installed")

ATOL = 1e-5
RTOL = 1e-5


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def one_hot(n: int, length: int, n_columns: tuple[int, ...] = ()) -> torch.Tensor:
    """Random one-hot sequences; the listed positions are ``N`` (all-zero) in every sequence."""
    codes = torch.randint(0, 4, (n, length))
    x = nn.functional.one_hot(codes, 4).transpose(1, 2).float().contiguous()
    for p in n_columns:
        x[:, :, p] = 0
    return x


def set_batchnorm_stats(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def assert_outputs_close(got: object, want: object) -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    else:
        assert isinstance(got, (tuple, list)) and len(got) == len(want)  # type: ignore[arg-type]
        for g, w in zip(got, want, strict=True):  # type: ignore[call-overload]
            assert_outputs_close(g, w)


def check_all_mutants(
    model: nn.Module, x: torch.Tensor, chunk: int = 2048, *, leaves: Leaves = MODEL_LEAVES, rules: Rules = RULES
) -> IncrementalRunner:
    """Compare the incremental runner with full recomputation on every mutant of ``x``."""
    runner = build_incremental_runner(model, x.shape[2], leaves=leaves, rules=rules)
    assert isinstance(runner, IncrementalRunner)
    full = FullRecompute(model)
    locus, position, base = mutation_list(x)
    with torch.inference_mode():
        ref, cache = runner.reference(x)
        assert_outputs_close(ref, model(x))
        for start in range(0, locus.shape[0], chunk):
            sl = slice(start, start + chunk)
            got = runner.mutants(x, cache, locus[sl], position[sl], base[sl])
            want = full.mutants(x, None, locus[sl], position[sl], base[sl])
            assert_outputs_close(got, want)
    return runner


# --------------------------------------------------------------------------- models


class DilatedResidualNet(nn.Module):
    """Same-padded dilated residual convolutions, a crop, a profile and a pooled count head."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv1d(4, channels, 5, padding=2)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv1d(channels, channels, 3, padding="same", dilation=d), nn.BatchNorm1d(channels))
            for d in (1, 2, 4)
        )
        self.profile = nn.Conv1d(channels, 2, 7, padding=3)
        self.count = nn.Linear(channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.stem(x))
        for block in self.blocks:
            h = h + nn.functional.gelu(block(h))
        h = h[:, :, 3:-3]
        return self.profile(h), self.count(h.mean(dim=-1))


class MaskedConvNet(nn.Module):
    """A frozen length-wise dropout mask, ``x.view(batch, -1)`` flattening and in-place ops."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5)
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1, groups=2)
        self.register_buffer("mask", (torch.rand(6, length - 4) > 0.3).float() / 0.7)
        self.act = nn.ReLU(inplace=True)
        self.dense = nn.Linear(6 * (length - 4), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv1(x)) * self.mask
        h = self.conv2(h)
        h += 0.5
        return self.dense(h.view(h.size(0), -1))


class FunctionalNet(nn.Module):
    """Functional convolution, channel concatenation, ``narrow``, channel softmax, an even
    'same' kernel (asymmetric padding), then max pooling (not position-local) before a dense layer."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4, 7) * 0.3)
        self.bias = nn.Parameter(torch.randn(5) * 0.1)
        self.even = nn.Conv1d(10, 6, 4, padding="same")
        self.dense = nn.Linear(6 * ((length - 4) // 2), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.conv1d(x, self.weight, self.bias, padding=3)
        h = torch.cat([h, torch.tanh(h) * 2.0], dim=1).narrow(2, 2, x.shape[2] - 4)
        h = self.even(torch.softmax(h, dim=1))
        h = nn.functional.max_pool1d(h, 2)
        return self.dense(h.flatten(1))


def small_bpnet(trimming: int = 40) -> nn.Module:
    model = bpnetlite.BPNet(n_filters=16, n_layers=4, n_outputs=2, n_control_tracks=0, trimming=trimming, verbose=False)
    return model.eval()


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
