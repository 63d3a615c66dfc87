"""Model architectures used by the paper and by the tests.

Only the paper's simulation CNN lives here for now; real-model adapters
(BPNet, DeepSEA-style) are added beside it.
"""

from __future__ import annotations

import torch
from torch import nn


class SimulationCNN(nn.Module):
    """The convolutional network of the paper's simulation study.

    Three blocks of ``Conv1d(15 filters, width 7, no padding) -> BatchNorm1d ->
    ReLU``, then ``Flatten -> Linear(30) -> ReLU -> Linear(30) -> ReLU ->
    Linear(n_tasks)``.

    Parameters
    ----------
    length
        Sequence length L (100 in the paper).
    n_tasks
        Number of outputs (2 in the paper: exposure and outcome).
    n_filters, width, n_blocks, hidden
        Layer sizes; the defaults are the paper's.
    dropout
        Dropout probability after each hidden dense layer (0 in the paper;
        MC-dropout experiments set it > 0).

    Notes
    -----
    ``features`` holds only position-local layers and ``head`` everything
    after the first dense layer; the split is what lets the incremental ISM
    engine recompute only the positions a mutation touches.
    """

    def __init__(
        self,
        length: int = 100,
        n_tasks: int = 2,
        *,
        n_filters: int = 15,
        width: int = 7,
        n_blocks: int = 3,
        hidden: int = 30,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 4
        for _ in range(n_blocks):
            layers += [nn.Conv1d(in_channels, n_filters, width), nn.BatchNorm1d(n_filters), nn.ReLU()]
            in_channels = n_filters
        self.features = nn.Sequential(*layers)
        flat = n_filters * (length - n_blocks * (width - 1))
        if flat <= 0:
            raise ValueError(f"length {length} is too short for {n_blocks} convolutions of width {width}")
        head: list[nn.Module] = [nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head += [nn.Linear(hidden, hidden), nn.ReLU()]
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(hidden, n_tasks))
        self.head = nn.Sequential(*head)
        self.length = length

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map one-hot sequences ``(batch, 4, length)`` to ``(batch, n_tasks)``."""
        return self.head(self.features(x))
