"""Gather buffers: reusing them from one batch of mutants to the next changes no bit of any prediction.

The incremental runner gathers cached reference columns into buffers kept in
its reference cache (:class:`~deepmr_dist.ism.incremental.window.GatherBuffers`);
the same runner with ``reuse_gathers=False`` gathers into fresh tensors, the
code path before buffers existed. Both must give bit-identical predictions on
the same batches, a ragged last batch included, and nothing a batch returns
may change when the next batch overwrites the buffers.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ism_models import DilatedResidualNet, FunctionalNet, needs_bpnet, one_hot, set_batchnorm_stats, small_bpnet
from deepmr_dist.ism.engine import make_ensemble_runners, make_runner, saturation_mutagenesis
from deepmr_dist.ism.fusion.runner import FusedRunner
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.incremental.window import Batch, GatherBuffers
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.heads import OutputHead


def _fresh(runner: IncrementalRunner) -> IncrementalRunner:
    return IncrementalRunner(runner.plan, reuse_gathers=False)


def _members(build, n: int) -> list[nn.Module]:
    torch.manual_seed(3)
    return [set_batchnorm_stats(build()) for _ in range(n)]


def _assert_bit_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(), b.nan_to_num())


class TwoBranchNet(nn.Module):
    """Two branches of one width whose windows are widened alike, one of them read twice.

    ``h1``'s widened window is cached after its first reader and read again
    after ``h2``'s, of the same shape, has been gathered: the two must not share a buffer.
    """

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 6, 5, padding=2), nn.Conv1d(4, 6, 5, padding=2)
        self.c, self.d, self.e = (nn.Conv1d(6, 3, 3, padding=1) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1, h2 = torch.relu(self.a(x)), torch.relu(self.b(x))
        return self.c(h1) * self.d(h2) + self.e(h1)


CASES = [
    pytest.param(TwoBranchNet, OutputHead(profile_axis=-1), 30, id="two-branches"),
    pytest.param(lambda: SimulationCNN(length=60), OutputHead(), 60, id="simulation-cnn"),
    pytest.param(DilatedResidualNet, OutputHead(output_index=0, profile_axis=-1), 50, id="dilated-residual-profile"),
    pytest.param(lambda: FunctionalNet(40), OutputHead(), 40, id="functional"),
    pytest.param(lambda: small_bpnet(trimming=10), OutputHead(output_index=1), 120, id="bpnet-counts",
                 marks=needs_bpnet),
]  # fmt: skip


@pytest.mark.parametrize(("build", "head", "length"), CASES)
def test_reused_gathers__member_loop_is_bit_identical_to_fresh_gathers(build, head: OutputHead, length: int) -> None:
    members = _members(build, 2)
    x = one_hot(3, length, n_columns=(0, length // 2))
    reused = [make_runner(m, length, head=head) for m in members]
    assert all(isinstance(r, IncrementalRunner) and r.reuse_gathers for r in reused)
    fresh = [_fresh(r) for r in reused]
    # 37 mutants per batch: many batches reuse the buffers, and the last one is shorter
    _assert_bit_identical(
        saturation_mutagenesis(reused, head, x, mutant_batch=37)[1],
        saturation_mutagenesis(fresh, head, x, mutant_batch=37)[1],
    )


@pytest.mark.parametrize(("build", "head", "length"), [CASES[0], CASES[2], CASES[4]])
def test_reused_gathers__fused_ensemble_is_bit_identical_to_fresh_gathers(build, head: OutputHead, length: int) -> None:
    members = _members(build, 3)
    x = one_hot(2, length, n_columns=(length - 1,))
    [reused] = make_ensemble_runners(members, length, head=head, fuse=True)
    assert isinstance(reused, FusedRunner) and isinstance(reused.runner, IncrementalRunner)
    fresh = FusedRunner(reused.fused, _fresh(reused.runner))
    _assert_bit_identical(
        saturation_mutagenesis([reused], head, x, mutant_batch=45)[1],
        saturation_mutagenesis([fresh], head, x, mutant_batch=45)[1],
    )


def test_mutants__outputs_of_a_batch_survive_the_next_batch_gathering_into_the_same_buffers() -> None:
    # One output channel: a single mutant's full profile would be a view of a gather buffer if not copied out.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(4, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 1, 5, padding=2)).eval()
    x = one_hot(2, 30)
    runner = make_runner(model, 30)
    assert isinstance(runner, IncrementalRunner)
    locus, position, base = mutation_list(x)
    with torch.inference_mode():
        _, cache = runner.reference(x)
        assert isinstance(cache.buffers, GatherBuffers)
        first = runner.mutants(x, cache, locus[:1], position[:1], base[:1])
        kept = first.clone()
        runner.mutants(x, cache, locus[50:51], position[50:51], base[50:51])
        assert not cache.buffers.holds(first)
        assert torch.equal(first, kept)
        fresh = _fresh(runner)
        assert torch.equal(first, fresh.mutants(x, fresh.reference(x)[1], locus[:1], position[:1], base[:1]))


def test_gather_buffers__distinct_within_a_batch_the_same_in_the_next_and_grown_for_a_larger_one() -> None:
    x = one_hot(1, 10)
    buffers = GatherBuffers()

    def batch(n: int) -> Batch:
        return Batch(x, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.zeros(n, dtype=torch.long), buffers)

    first = batch(6)
    a, b = first.buffer(12, torch.float32, x.device), first.buffer(12, torch.float32, x.device)
    other = first.buffer(8, torch.float32, x.device)
    assert a.shape == b.shape == (6, 12) and other.shape == (6, 8)
    assert len({t.data_ptr() for t in (a, b, other)}) == 3
    second = batch(4)  # shorter: the first rows of the same buffers, in the same order
    c, d = second.buffer(12, torch.float32, x.device), second.buffer(12, torch.float32, x.device)
    assert (c.data_ptr(), d.data_ptr(), c.shape) == (a.data_ptr(), b.data_ptr(), (4, 12))
    assert second.buffer(12, torch.float64, x.device).data_ptr() not in {a.data_ptr(), b.data_ptr()}
    larger = batch(9).buffer(12, torch.float32, x.device)
    assert larger.shape == (9, 12) and larger.data_ptr() != a.data_ptr()
    assert buffers.holds(larger[2:, 3]) and not buffers.holds(a) and not buffers.holds(torch.empty(9, 12))
    assert Batch(x, *mutation_list(x)).buffer(12, torch.float32, x.device) is None
