"""Small, deterministic ensembles for the bundled example and the tests.

These are entry points for ``--model package.module:factory``: each returns a
list of members with fixed random initialisations (no weight files needed).
"""

from __future__ import annotations

import torch
from torch import nn

from deepmr_dist.models.architectures import SimulationCNN


def _seeded_cnn(seed: int, length: int, dropout: float = 0.0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's torch random state
        torch.manual_seed(seed)
        model = SimulationCNN(length=length, n_tasks=2, dropout=dropout)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model.eval()


def simulation_ensemble(n_members: int = 3, length: int = 100) -> list[nn.Module]:
    """Three randomly initialised copies of the paper's simulation CNN (seeds 0, 1, 2)."""
    return [_seeded_cnn(seed, length) for seed in range(n_members)]


def simulation_cnn_with_dropout(length: int = 100) -> nn.Module:
    """One simulation CNN with dropout 0.2 in its dense layers, for MC-dropout."""
    return _seeded_cnn(7, length, dropout=0.2)
