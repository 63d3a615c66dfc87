"""Ensemble fusion against brute force: every explicitly written mutant predicted member by member.

The fused network (members merged node by node, :mod:`deepmr_dist.ism.fusion`)
is run in full and incrementally through :func:`make_ensemble_runners`; its
predictions must equal those of each member on each explicitly built mutant
sequence to float32 round-off (:func:`conftest.assert_close_fp32`, with the
number of products along one input-to-output path of each model).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from conftest import EXAMPLE_CNN_ACCUMULATION, assert_close_fp32, reference_one_hot
from ism_models import (
    DilatedResidualNet,
    FunctionalNet,
    brute_force,
    needs_bpnet,
    random_seqs,
    set_batchnorm_stats,
    small_bpnet,
)
from deepmr_dist.ism.engine import FullRecompute, make_ensemble_runners, make_runner, saturation_mutagenesis
from deepmr_dist.ism.fusion.ops import GroupedLinear
from deepmr_dist.ism.fusion.runner import FusedRunner, build_fused
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.models.architectures import SimulationCNN, deepsea_ensemble, head_for_tasks
from deepmr_dist.models.ensemble import ModelSpec, load_members
from deepmr_dist.models.heads import OutputHead

SMALL_DEEPSEA = {"filters": (8, 12, 16), "width": 5, "pool": 2, "hidden": 16, "dropout": (0.2, 0.2, 0.5)}
BPNET_SIZES = {"tasks": ("Oct4", "Sox2"), "n_filters": 8, "n_layers": 3, "trimming": 10, "profile_window": 20}


class NormNet(nn.Module):
    """Batch norms after a convolution (folded), after an activation and on dense features (not folded)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(4, 6, 5, padding=2)
        self.norm1 = nn.BatchNorm1d(6)
        self.norm2 = nn.BatchNorm1d(6)
        self.conv2 = nn.Conv1d(6, 6, 3, padding=1)
        self.dense = nn.Linear(6, 5)
        self.norm3 = nn.BatchNorm1d(5)
        self.out = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(torch.relu(self.norm1(self.conv1(x))))
        h = torch.relu(self.conv2(h)).mean(dim=-1)
        return self.out(torch.relu(self.norm3(self.dense(h))))


class GRUNet(nn.Module):
    """A recurrent layer: per-member parameters without a fused form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 4, 3)
        self.gru = nn.GRU(4, 3, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(self.conv(x).transpose(1, 2))[1][0]


class Scale(nn.Module):
    """Multiplies by a per-member Python number that no state dict or ``repr`` shows."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class ScaledNet(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 3, 3)
        self.scale = Scale(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale(self.conv(x)).mean(dim=-1)


def _members(build, n: int, seed: int) -> list[nn.Module]:
    members = []
    for i in range(n):
        torch.manual_seed(seed + i)
        members.append(set_batchnorm_stats(build()))
    return members


def _bpnets(n: int, **kw) -> list[nn.Module]:
    from deepmr_dist.models.bpnet import bpnet_ensemble

    return bpnet_ensemble(n, 3, **{**BPNET_SIZES, **kw})


def _chrombpnets(n: int) -> list[nn.Module]:
    from deepmr_dist.models.bpnet import chrombpnet_ensemble

    return chrombpnet_ensemble(
        n, 4, tasks=("K562", "HepG2"), n_filters=8, n_layers=3, bias_filters=4, bias_layers=2, trimming=10,
        profile_window=20,
    )  # fmt: skip


def _mc_dropout() -> list[nn.Module]:
    spec = ModelSpec(("deepmr_dist.models.examples:simulation_cnn_with_dropout",), mc_dropout=3, mc_seed=5)
    return load_members(spec)


def _run(runners: list, head: OutputHead, seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.stack([reference_one_hot(s) for s in seqs]))
    ref, mut = saturation_mutagenesis(runners, head, x, mutant_batch=157)
    return ref.numpy(), mut.numpy()


def _check_against_brute_force(members, head, seqs, accumulation, *, incremental: bool = True) -> FusedRunner:
    """The fused runner's predictions equal brute force; returns the runner."""
    runners = make_ensemble_runners(members, len(seqs[0]), incremental=incremental, fuse=True, head=head)
    assert len(runners) == 1 and isinstance(runners[0], FusedRunner), runners
    assert isinstance(runners[0].runner, IncrementalRunner if incremental else FullRecompute)
    ref, mut = _run(runners, head, seqs)
    ref_b, mut_b = brute_force(members, head, seqs)
    assert_close_fp32(ref, ref_b, accumulation=accumulation, err_msg="ref_pred")
    assert_close_fp32(mut, mut_b, accumulation=accumulation, err_msg="mut_pred")
    return runners[0]


# Products along one input-to-output path (see conftest.fp32_tolerance): each model's convolution
# widths x input channels, then the positions or features its dense layers and means sum over.
CASES = [
    pytest.param(lambda: _members(lambda: SimulationCNN(length=40), 3, 0), OutputHead(), 40,
                 4 * 7 + 15 * 7 * 2 + 15 * 22 + 30 + 30, id="simulation-cnn"),
    pytest.param(lambda: deepsea_ensemble(3, 13, length=64, n_tasks=20, **SMALL_DEEPSEA),
                 head_for_tasks([f"t{i}" for i in range(20)], ["t3", "t17"], transform="sigmoid"), 64,
                 4 * 5 + 8 * 5 + 12 * 5 + 16 * 9 + 16, id="deepsea"),
    pytest.param(_mc_dropout, OutputHead(), 100, EXAMPLE_CNN_ACCUMULATION, id="mc-dropout"),
    pytest.param(lambda: _members(NormNet, 3, 10), OutputHead(), 30, 4 * 5 + 6 * 3 + 30 + 6 + 5, id="batchnorm"),
    pytest.param(lambda: _members(DilatedResidualNet, 2, 20), OutputHead(output_index=0, profile_axis=-1), 40,
                 4 * 5 + 3 * 8 * 3 + 8 * 7 + 34, id="dilated-residual-profile"),
    pytest.param(lambda: _bpnets(3), OutputHead(output_index=1), 60, 4 * 21 + 3 * 8 * 3 + 60 + 8,
                 id="bpnet-counts", marks=needs_bpnet),
    pytest.param(lambda: _bpnets(3), OutputHead(output_index=2), 60, 4 * 21 + 3 * 8 * 3 + 8 * 75 + 80,
                 id="bpnet-profile", marks=needs_bpnet),
    pytest.param(lambda: [small_bpnet(trimming=10) for _ in range(2)], OutputHead(output_index=0, profile_axis=-1),
                 60, 4 * 21 + 4 * 16 * 3 + 16 * 75 + 40, id="bpnetlite-profile-track", marks=needs_bpnet),
    pytest.param(lambda: _chrombpnets(2), OutputHead(output_index=1), 50, 4 * 21 + 3 * 8 * 3 + 50 + 8,
                 id="chrombpnet-counts", marks=needs_bpnet),
]  # fmt: skip


@pytest.mark.parametrize(("build", "head", "length", "accumulation"), CASES)
def test_fused_incremental__matches_brute_force(build, head: OutputHead, length: int, accumulation: int) -> None:
    torch.manual_seed(1)
    members = build()
    _check_against_brute_force(members, head, random_seqs(2, length, 3, with_n=True), accumulation)


@pytest.mark.parametrize(
    ("build", "head", "length", "accumulation"), [CASES[0], CASES[3], CASES[6]]
)  # simulation CNN, batch norms, BPNet profile
def test_fused_full_recompute__matches_brute_force(build, head, length, accumulation) -> None:
    torch.manual_seed(2)
    members = build()
    _check_against_brute_force(members, head, random_seqs(2, length, 4, with_n=True), accumulation, incremental=False)


def test_fusion__mc_dropout_masks_stay_per_member_and_shared_layers_run_once() -> None:
    members = _mc_dropout()
    fused = build_fused(members, 100, MODEL_LEAVES)
    assert fused is not None
    convs = [m for m in fused.module.modules() if isinstance(m, nn.Conv1d)]
    # the masks' copies share every weight: their convolutions are computed once, not once per member
    assert [c.out_channels for c in convs] == [15, 15, 15]
    x = torch.from_numpy(np.stack([reference_one_hot(s) for s in random_seqs(2, 100, 5)]))
    with torch.inference_mode():
        outs = fused.split(fused.module(x))
    assert not np.allclose(outs[0].numpy(), outs[1].numpy(), rtol=1e-3), "each member keeps its own mask"


def test_fusion__channel_softmax_keeps_members_incremental_and_full_recompute_fused(caplog) -> None:
    """FunctionalNet's softmax over channels runs fused on the members folded into the batch axis:
    exact, but not on windows, so the incremental choice is the member loop (said at DEBUG)."""
    torch.manual_seed(6)
    members = [FunctionalNet(30).eval() for _ in range(2)]
    seqs = random_seqs(2, 30, 6, with_n=True)
    _check_against_brute_force(members, OutputHead(), seqs, 4 * 7 + 10 * 4 + 6 * 13, incremental=False)
    with caplog.at_level(logging.DEBUG, logger="deepmr_dist.ism.engine"):
        runners = make_ensemble_runners(members, 30, fuse=True)
    assert all(isinstance(r, IncrementalRunner) for r in runners) and len(runners) == 2
    assert "multiply-adds per mutant" in caplog.text and "running members one by one" in caplog.text


def test_fusion__different_architectures_or_unfusable_layers_run_member_by_member(caplog) -> None:
    with caplog.at_level(logging.DEBUG, logger="deepmr_dist.ism.fusion"):
        mixed = [SimulationCNN(length=40).eval(), SimulationCNN(length=40, n_filters=8).eval()]
        assert all(isinstance(r, IncrementalRunner) for r in make_ensemble_runners(mixed, 40, fuse=True))
        assert "not fused: the members' modules differ at features_0: Conv1d(4, 15" in caplog.text
        recurrent = [GRUNet().eval() for _ in range(2)]
        runners = make_ensemble_runners(recurrent, 20, fuse=True)
        assert len(runners) == 2 and not any(isinstance(r, FusedRunner) for r in runners)
        assert "has per-member parameters and no fused form" in caplog.text
    single = make_ensemble_runners(mixed[:1], 40, fuse=True)
    assert len(single) == 1 and isinstance(single[0], IncrementalRunner)


def test_fusion__build_time_check_catches_what_the_graphs_do_not_show(caplog) -> None:
    """A leaf module whose per-member state no graph, state dict or repr shows fuses wrongly; the check refuses it.

    Traced through instead, the factors are constants of the graphs, which then differ.
    """
    members = [ScaledNet(1.0).eval(), ScaledNet(2.0).eval()]
    with caplog.at_level(logging.DEBUG, logger="deepmr_dist.ism.fusion"):
        assert build_fused(members, 20, {Scale: None}) is None
        assert "build-time check failed: reference, member 1: differs by" in caplog.text
        assert build_fused(members, 20, MODEL_LEAVES) is None
        assert "the members' graphs differ at mul" in caplog.text
    same = [ScaledNet(2.0).eval(), ScaledNet(2.0).eval()]
    assert build_fused(same, 20, {Scale: None}) is not None


def test_saturation_mutagenesis__fused_and_single_runners_fill_their_members_in_order() -> None:
    members = _members(lambda: SimulationCNN(length=30, n_blocks=2), 3, 30)
    seqs = random_seqs(2, 30, 7, with_n=True)
    runners = [make_runner(members[0], 30), *make_ensemble_runners(members[1:], 30, fuse=True)]
    assert isinstance(runners[1], FusedRunner) and len(runners) == 2
    ref, mut = _run(runners, OutputHead(), seqs)
    ref_b, mut_b = brute_force(members, OutputHead(), seqs)
    accumulation = 4 * 7 + 15 * 7 + 15 * 18 + 30 + 30
    assert_close_fp32(ref, ref_b, accumulation=accumulation)
    assert_close_fp32(mut, mut_b, accumulation=accumulation)


def test_make_ensemble_runners__by_default_the_cpu_fuses_only_members_that_share_weights() -> None:
    """Distinct members fused run no faster on the CPU (benchmarks/README.md); MC-dropout copies share their
    weights, so their fused network computes the shared layers once (a third of the work for three masks)."""
    distinct = _members(lambda: SimulationCNN(length=100), 3, 40)
    assert [type(r) for r in make_ensemble_runners(distinct, 100)] == [IncrementalRunner] * 3
    (masks,) = make_ensemble_runners(_mc_dropout(), 100)
    assert isinstance(masks, FusedRunner) and masks.n_members == 3
    assert [type(r) for r in make_ensemble_runners(distinct, 100, fuse=False)] == [IncrementalRunner] * 3


def test_grouped_linear__is_the_block_diagonal_product() -> None:
    torch.manual_seed(8)
    weight, bias, x = torch.randn(3, 4, 5), torch.randn(12), torch.randn(7, 15)
    block = torch.block_diag(*weight)  # (12, 15): group g maps inputs 5g..5g+4 to outputs 4g..4g+3
    with torch.inference_mode():
        torch.testing.assert_close(GroupedLinear(weight, bias)(x), x @ block.T + bias)
        torch.testing.assert_close(GroupedLinear(weight, None)(x), x @ block.T)
