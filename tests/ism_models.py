"""Test models and the brute-force checks shared by the ISM tests (``test_ism_*.py``).

``check_all_mutants`` builds an incremental runner for a model and compares it
with a full forward pass of every explicitly built mutant; ``brute_force``
predicts every explicitly written mutant sequence of an ensemble, member by
member, locus by locus.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import reference_one_hot

from deepmr_dist.ism.engine import FullRecompute
from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.incremental.trace import Leaves
from deepmr_dist.ism.leaves import MODEL_LEAVES
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.heads import OutputHead

try:
    import bpnetlite
    import bpnetlite.chrombpnet
except ImportError:  # the BPNet cases need the benchmarks extra
    bpnetlite = None

needs_bpnet = pytest.mark.skipif(bpnetlite is None, reason="bpnet-lite is not installed")

ATOL = 1e-5
RTOL = 1e-5
BASES = "ACGT"


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


def random_seqs(n: int, length: int, seed: int, with_n: bool = False) -> list[str]:
    """Random ACGT sequences; ``with_n`` writes ``N`` at the first and middle positions of the first."""
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list(BASES), length)) for _ in range(n)]
    if with_n:
        s = list(seqs[0])
        s[0] = "N"
        s[length // 2] = "N"
        seqs[0] = "".join(s)
    return seqs


def brute_force(members: list[nn.Module], head: OutputHead, seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Predict every reference and every explicitly written mutant sequence, one locus at a time."""
    length = len(seqs[0])
    ref = None
    mut = None
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            for m, member in enumerate(members):
                r = head(member(torch.from_numpy(reference_one_hot(seq)[None])), 1).numpy()[0]
                if ref is None:
                    ref = np.zeros((len(seqs), len(members), r.size))
                    mut = np.full((len(seqs), len(members), length, 4, r.size), np.nan)
                ref[i, m] = r
                batch, slots = [], []
                for p in range(length):
                    for b, base in enumerate(BASES):
                        if seq[p] != base:
                            batch.append(reference_one_hot(seq[:p] + base + seq[p + 1 :]))
                            slots.append((p, b))
                out = head(member(torch.from_numpy(np.stack(batch))), len(batch)).numpy()
                for (p, b), row in zip(slots, out):
                    mut[i, m, p, b] = row
    return ref, mut


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
