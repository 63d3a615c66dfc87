"""Model architectures used by the paper and by the tests.

* :class:`SimulationCNN`, the paper's simulation network;
* :class:`DeepSEA`, a DeepSEA-style multi-task classifier (Zhou & Troyanskaya
  2015) returning one logit per task, with :func:`deepsea_ensemble` for
  seeded, randomly initialised ensembles;
* :func:`head_for_tasks`, an :class:`~deepmr_dist.models.heads.OutputHead`
  choosing tasks by name from a model's (possibly very long) list of outputs.

bpnet-lite's BPNet and ChromBPNet are adapted in :mod:`deepmr_dist.models.bpnet`.
Seeded factories build every member inside :func:`torch.random.fork_rng`, so
the caller's global torch random state is left untouched.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deepmr_dist.errors import InputError
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.models.transforms import check_transform


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
            raise InputError(f"sequence length {length} is too short for {n_blocks} convolutions of width {width}")
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


class DeepSEA(nn.Module):
    """A DeepSEA-style multi-task classifier returning one logit per task.

    ``len(filters)`` blocks of ``Conv1d(width, no padding) -> ReLU ->
    MaxPool1d(pool, stride pool) -> Dropout``, the last block without the
    pooling, then ``Flatten -> Linear(hidden) -> ReLU -> Linear(n_tasks)``.
    The defaults are DeepSEA's (Zhou & Troyanskaya 2015): 320, 480 and 960
    filters of width 8, pooling 4, dropout 0.2, 0.2 and 0.5, 925 hidden units,
    919 chromatin-profile tasks on 1000 bp. The outputs are logits; read them
    through a head with ``transform="sigmoid"`` (see :func:`head_for_tasks`)
    to get probabilities.

    Parameters
    ----------
    length
        Sequence length L.
    n_tasks
        Number of outputs.
    filters
        Filters per convolutional block.
    width
        Convolution width.
    pool
        Max-pooling width and stride after every block but the last.
    hidden
        Units of the hidden dense layer.
    dropout
        Dropout probability after each block, one per block (MC-dropout
        replaces these layers by frozen masks).

    Raises
    ------
    InputError
        If a size is not positive, ``dropout`` does not give one probability
        in [0, 1) per block, or ``length`` is too short for the blocks.
    """

    def __init__(
        self,
        length: int = 1000,
        n_tasks: int = 919,
        *,
        filters: Sequence[int] = (320, 480, 960),
        width: int = 8,
        pool: int = 4,
        hidden: int = 925,
        dropout: Sequence[float] = (0.2, 0.2, 0.5),
    ) -> None:
        super().__init__()
        filters, dropout = tuple(filters), tuple(dropout)
        sizes = {"length": length, "n_tasks": n_tasks, "width": width, "pool": pool, "hidden": hidden}
        bad = {name: value for name, value in sizes.items() if value < 1}
        if bad or not filters or min(filters) < 1:
            raise InputError(f"DeepSEA sizes must be positive: got {bad or {'filters': filters}}")
        if len(dropout) != len(filters) or not all(0 <= p < 1 for p in dropout):
            raise InputError(
                f"DeepSEA dropout must give one probability in [0, 1) per block ({len(filters)} blocks), got {dropout}"
            )
        layers: list[nn.Module] = []
        in_channels, columns = 4, length
        for index, (n_filters, p) in enumerate(zip(filters, dropout, strict=True)):
            layers += [nn.Conv1d(in_channels, n_filters, width), nn.ReLU()]
            columns -= width - 1
            if index < len(filters) - 1:
                layers.append(nn.MaxPool1d(pool, pool))
                columns //= pool
            layers.append(nn.Dropout(p))
            in_channels = n_filters
        if columns < 1:
            raise InputError(
                f"DeepSEA length {length} is too short for {len(filters)} convolutions of width {width} "
                f"with pooling {pool}"
            )
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_channels * columns, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks)
        )
        self.length = length
        self.n_tasks = n_tasks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map one-hot sequences ``(batch, 4, length)`` to logits ``(batch, n_tasks)``."""
        return self.head(self.features(x))


def member_seed(seed: int, member: int) -> int:
    """The torch seed of ensemble member ``member`` of an ensemble seeded with ``seed``.

    Derived with :class:`numpy.random.SeedSequence` from ``(seed, member)``, so
    members of one ensemble differ, ensembles with different seeds share no
    member, and member ``i`` does not depend on the ensemble size.

    Raises
    ------
    InputError
        If ``seed`` or ``member`` is negative.
    """
    if seed < 0 or member < 0:
        raise InputError(f"seeds and member indices must be >= 0, got seed {seed}, member {member}")
    state = np.random.SeedSequence([seed, member]).generate_state(1, dtype=np.uint64)[0]
    return int(state % np.uint64(2**63))


def seeded_members(build: Callable[[], nn.Module], n_members: int, seed: int) -> list[nn.Module]:
    """``n_members`` eval-mode modules from ``build()``, member ``i`` initialised from ``member_seed(seed, i)``.

    The global torch random state is saved and restored around each build.

    Raises
    ------
    InputError
        If ``n_members`` < 1 or ``seed`` < 0.
    """
    if n_members < 1:
        raise InputError(f"an ensemble needs at least one member, got n_members={n_members}")
    members = []
    for index in range(n_members):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed(seed, index))
            members.append(build().eval())
    return members


def deepsea_ensemble(
    n_members: int = 5,
    seed: int = 0,
    *,
    length: int = 1000,
    n_tasks: int = 919,
    filters: Sequence[int] = (320, 480, 960),
    width: int = 8,
    pool: int = 4,
    hidden: int = 925,
    dropout: Sequence[float] = (0.2, 0.2, 0.5),
) -> list[nn.Module]:
    """Randomly initialised, seeded :class:`DeepSEA` members (an entry point: every argument has a default).

    With no arguments: five DeepSEA-sized members (about 47 M parameters each)
    for 1000 bp and 919 tasks, seed 0. Parameters are those of :class:`DeepSEA`
    plus ``n_members`` and ``seed`` (see :func:`member_seed`); the same
    arguments always give identical weights.
    """
    return seeded_members(
        lambda: DeepSEA(
            length, n_tasks, filters=filters, width=width, pool=pool, hidden=hidden, dropout=dropout
        ),
        n_members,
        seed,
    )


def head_for_tasks(
    all_task_names: Sequence[str],
    wanted: Sequence[str] | None = None,
    *,
    transform: str = "none",
    output_index: int | None = None,
    profile_axis: int | None = None,
) -> OutputHead:
    """An :class:`OutputHead` keeping the tasks named ``wanted``, in that order.

    Parameters
    ----------
    all_task_names
        Names of every model output, in output order (e.g. DeepSEA's 919
        ``cell|assay|treatment`` labels).
    wanted
        Names of the tasks to keep; ``None`` keeps every output.
    transform
        Head transform: ``"sigmoid"`` for classifier logits such as
        :class:`DeepSEA`'s, ``"none"`` or ``"log1p"`` otherwise.
    output_index, profile_axis
        Passed to :class:`OutputHead` (tuple element and profile axis to sum).

    Raises
    ------
    InputError
        If ``all_task_names`` is empty or repeats a name, ``wanted`` is empty
        or repeats a name, ``transform`` is unknown, or a wanted task is not in
        ``all_task_names`` (the message names it and suggests close matches).
    """
    if isinstance(all_task_names, str) or isinstance(wanted, str):
        raise InputError("task names must be given as a list of names, not as one string")
    names = list(all_task_names)
    if not names:
        raise InputError("the model's task names are empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"the model's task names repeat {repeated[:10]}; names must be unique to select tasks")
    check_transform(transform)
    chosen = names if wanted is None else list(wanted)
    if not chosen:
        raise InputError("no tasks chosen: give at least one task name")
    twice = sorted({n for n in chosen if chosen.count(n) > 1})
    if twice:
        raise InputError(f"tasks {twice} are chosen more than once")
    index = {name: i for i, name in enumerate(names)}
    unknown = [name for name in chosen if name not in index]
    if unknown:
        raise InputError(
            "unknown task(s): "
            + ", ".join(f"{name!r}{_suggestion(name, names)}" for name in unknown)
            + f" (the model has {len(names)} tasks)"
        )
    return OutputHead(
        output_index=output_index,
        profile_axis=profile_axis,
        tasks=tuple(index[name] for name in chosen),
        transform=transform,
        task_names=tuple(chosen),
    )


def _suggestion(name: str, names: Sequence[str]) -> str:
    """``" (did you mean 'A', 'B' or 'C'?)"`` from case-insensitive close matches, or ``""``."""
    lowered: dict[str, str] = {}
    for candidate in names:
        lowered.setdefault(candidate.lower(), candidate)
    matches = [repr(lowered[m]) for m in difflib.get_close_matches(name.lower(), list(lowered), n=3, cutoff=0.6)]
    if not matches:
        return ""
    listed = matches[0] if len(matches) == 1 else f"{', '.join(matches[:-1])} or {matches[-1]}"
    return f" (did you mean {listed}?)"


def simulation_cnn_weight_keys(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Weight keys of the convolutions and of the head's linear layers, in layer order."""
    convs = sorted((k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].ndim == 3),
                   key=lambda k: int(k.split(".")[1]))
    linears = sorted((k for k in state if k.startswith("head.") and k.endswith(".weight")),
                     key=lambda k: int(k.split(".")[1]))
    return convs, linears


def simulation_cnn_architecture(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """The :class:`SimulationCNN` keyword arguments that produce ``state``'s tensor shapes."""
    convs, linears = simulation_cnn_weight_keys(state)
    n_filters, _, width = state[convs[0]].shape
    hidden, flat = state[linears[0]].shape
    n_blocks = len(convs)
    return {
        "length": flat // n_filters + n_blocks * (width - 1),
        "n_tasks": int(state[linears[-1]].shape[0]),
        "n_filters": int(n_filters),
        "width": int(width),
        "n_blocks": n_blocks,
        "hidden": int(hidden),
    }


def load_simulation_cnns(paths: Sequence[str | Path], device: str = "cpu") -> list[SimulationCNN]:
    """Load state dicts written by :func:`deepmr_dist.simulation.training.train_ensemble` into models in eval mode.

    The architecture (length, filters, width, blocks, hidden size, tasks) is
    read off each state dict's tensor shapes; files are opened with
    ``weights_only=True``.
    """
    models = []
    for path in paths:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # torch.load raises many types (IndexError, UnpicklingError, ...) on a bad file
            raise InputError(f"cannot load weights file {path}: {err}") from err
        try:
            model = SimulationCNN(**simulation_cnn_architecture(state))
            model.load_state_dict(state)
        except (KeyError, IndexError, ValueError, RuntimeError) as err:
            raise InputError(f"weights file {path} is not a SimulationCNN state dict: {err}") from err
        models.append(model.to(device).eval())
    return models
