"""bpnet-lite BPNet and ChromBPNet models as ensemble members.

A bpnet-lite model (``bpnetlite.BPNet``, ``bpnetlite.bpnet.BasePairNet`` or
``bpnetlite.ChromBPNet``) predicts one experiment: profile logits
``(batch, n_outputs, L_out)`` (one track per strand) and the log total count
``(batch, 1)``. DeepMR needs several experiments (e.g. the paper's four TFs)
from one member, so :class:`BPNetTasks` runs one such model per task side by
side on the same sequence and returns a tuple of three tensors:

0. ``profile``: the towers' profile logits concatenated along channels,
   ``(batch, n_tasks * n_outputs, L_out)``, task-major (channel
   ``t * n_outputs + s`` is strand ``s`` of task ``t``);
1. ``log_counts``: ``(batch, n_tasks)``, each tower's predicted log total
   count over the output window and both strands. This is the readout the
   paper used ("counts head"); its head is ``OutputHead(output_index=1)``;
2. ``profile_log_counts``: ``(batch, n_tasks)``, the log of the profile sum,
   i.e. of the predicted reads summed over a central window of the profile.

What "profile sum" means here: bpnet-lite's profile outputs are logits of one
multinomial over strands x positions (its loss applies a single log-softmax to
the flattened strands of a task), and the predicted read profile is
``softmax(logits) * exp(log_counts)``. Summing the raw logits (``OutputHead``
with ``profile_axis``) would be meaningless: the softmax does not change when
a constant is added to every logit, so that sum is not constrained by
training. Summing the predicted read profile over the whole output window
gives back ``exp(log_counts)`` exactly, so the informative version is the sum
over a central window of ``profile_window`` bp::

    profile_log_counts = log_counts + logsumexp(logits[window]) - logsumexp(logits)

(logsumexp over strands and positions), the log of the reads predicted near
the centre of the locus, on the same log scale as the counts head. With
``profile_window=None`` the window is the whole output and the readout equals
``log_counts``.

Input length: every tower removes ``trimming`` positions from each end of its
input, so an input of L bp gives an output window of ``L - 2 * trimming``
positions; L must be at least ``2 * trimming + (profile_window or 1)`` (see
:meth:`BPNetTasks.output_length`, which the caller should check: the forward
pass itself cannot, or it could not be traced for incremental ISM). bpnet-lite's own default trimming is meant
for 2114 bp inputs and 1000 bp outputs; the factories here default to
``trimming=0``, so a 1 kb input gives a 1 kb profile, as in the original BPNet
(Avsec et al. 2021). A tower with control tracks (``n_control_tracks > 0``)
is given all-zero controls, as bpnet-lite's ``ControlWrapper`` does for
attribution: predictions are then sequence-only. A ChromBPNet's readouts
include its Tn5 bias model; for bias-free accessibility use its accessibility
model alone as a BPNet tower (bpnet-lite saves it as a separate checkpoint).

Entry points: :func:`bpnet_ensemble` and :func:`chrombpnet_ensemble` have a
default for every argument, so ``--model deepmr_dist.models.bpnet:bpnet_ensemble``
builds the paper's Fig 3 setting (four TFs, five members, 1 kb). Other settings
are ``functools.partial(bpnet_ensemble, ...)`` or a one-line factory in the
user's own module; trained models load with :func:`load_bpnet_checkpoints`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmr_dist.errors import InputError
from deepmr_dist.models.architectures import head_for_tasks, seeded_members
from deepmr_dist.models.heads import OutputHead

PAPER_TFS = ("Oct4", "Sox2", "Nanog", "Klf4")
"""The four mouse ESC TFs of the paper's BPNet analysis (Fig 3; Avsec et al. 2021)."""

READOUTS = {"counts": 1, "profile": 2}
"""Readout name -> element of :class:`BPNetTasks`' output tuple."""



def _bpnetlite() -> ModuleType:
    """The ``bpnetlite`` package (an optional dependency, imported on first use: it takes seconds).

    Raises
    ------
    InputError
        If bpnet-lite is not installed.
    """
    try:
        import bpnetlite
        import bpnetlite.bpnet
        import bpnetlite.chrombpnet
    except ImportError as exc:
        raise InputError(
            f"BPNet models need bpnet-lite ({exc}): pip install bpnet-lite, or the deepmr-dist[benchmarks] extra"
        ) from None
    return bpnetlite


class BPNetTasks(nn.Module):
    """One bpnet-lite model per task, run side by side on the same sequence.

    Parameters
    ----------
    towers
        One ``bpnetlite.BPNet``, ``BasePairNet`` or ``ChromBPNet`` per task,
        all with the same trimming and number of profile tracks.
    task_names
        Name of each tower's task (the ``task`` coordinate).
    profile_window
        Width in bp of the central window of the output profile summed by the
        ``profile`` readout; ``None``: the whole output window.

    Raises
    ------
    InputError
        If there are no towers, the names do not match the towers one to one,
        a tower is not a bpnet-lite model, the towers differ in trimming or
        profile tracks, the trimming is negative, a ChromBPNet tower takes
        control tracks, or ``profile_window`` is not positive.

    Notes
    -----
    ``forward`` returns ``(profile, log_counts, profile_log_counts)``; see the
    module documentation for their shapes and meaning.
    """

    def __init__(
        self, towers: Sequence[nn.Module], task_names: Sequence[str], *, profile_window: int | None = None
    ) -> None:
        super().__init__()
        if isinstance(task_names, str):
            raise InputError(f"task names must be a list of names, got the string {task_names!r}")
        names = tuple(task_names)
        if not towers:
            raise InputError("BPNetTasks needs at least one bpnet-lite model")
        if len(names) != len(towers) or len(set(names)) != len(names):
            raise InputError(f"BPNetTasks needs one unique task name per model: {len(towers)} models, names {names}")
        if profile_window is not None and profile_window < 1:
            raise InputError(f"profile_window must be a positive number of bp or None, got {profile_window}")
        geometry = [_geometry(tower, name) for tower, name in zip(towers, names, strict=True)]
        if len({(trimming, n_outputs) for trimming, n_outputs, _ in geometry}) != 1:
            listed = ", ".join(f"{n}: trimming {t}, {o} tracks" for n, (t, o, _) in zip(names, geometry, strict=True))
            raise InputError(f"the models of all tasks must share trimming and profile tracks; got {listed}")
        if geometry[0][0] < 0:
            raise InputError(f"BPNet trimming must be >= 0, got {geometry[0][0]}")
        self.towers = nn.ModuleList(towers)
        self.task_names = names
        self.trimming, self.n_outputs = geometry[0][0], geometry[0][1]
        self.profile_window = profile_window
        self._controls = tuple(n_control for _, _, n_control in geometry)

    def output_length(self, input_length: int) -> int:
        """The profile length for inputs of ``input_length`` bp.

        Raises
        ------
        InputError
            If the input is too short for the trimming and the profile window.
        """
        length = input_length - 2 * self.trimming
        needed = 2 * self.trimming + (self.profile_window or 1)
        if length < (self.profile_window or 1):
            raise InputError(
                f"sequences of {input_length} bp are too short for these BPNet models: trimming {self.trimming} "
                f"from each end and a profile window of {self.profile_window or 1} bp need at least {needed} bp"
            )
        return length

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Map one-hot sequences ``(batch, 4, L)`` to ``(profile, log_counts, profile_log_counts)``."""
        profiles, counts = [], []
        for tower, n_control in zip(self.towers, self._controls):
            if n_control:
                profile, log_counts = tower(x, x.new_zeros((x.shape[0], n_control, x.shape[-1])))
            else:
                profile, log_counts = tower(x)
            profiles.append(profile)
            counts.append(log_counts)
        profile = torch.cat(profiles, dim=1)
        log_counts = torch.cat(counts, dim=1)
        grouped = profile.reshape(profile.shape[0], len(self.task_names), self.n_outputs, profile.shape[-1])
        if self.profile_window is None:
            window = grouped
        else:
            start = (profile.shape[-1] - self.profile_window) // 2
            window = grouped[:, :, :, start : start + self.profile_window]
        profile_log_counts = log_counts + torch.logsumexp(window, dim=(2, 3)) - torch.logsumexp(grouped, dim=(2, 3))
        return profile, log_counts, profile_log_counts


def _geometry(tower: nn.Module, name: str) -> tuple[int, int, int]:
    """``(trimming, profile tracks, control tracks)`` of a bpnet-lite model."""
    lib = _bpnetlite()
    if isinstance(tower, (lib.BPNet, lib.bpnet.BasePairNet)):
        return int(tower.trimming), int(tower.n_outputs), int(tower.n_control_tracks)
    if isinstance(tower, lib.ChromBPNet):
        accessibility, bias = tower.accessibility, tower.bias
        if accessibility.n_control_tracks or bias.n_control_tracks:
            raise InputError(f"the ChromBPNet model of task {name!r} takes control tracks; ChromBPNet passes none")
        if bias.trimming > accessibility.trimming or bias.n_outputs != accessibility.n_outputs:
            raise InputError(
                f"the ChromBPNet model of task {name!r} has a bias model with trimming {bias.trimming} and "
                f"{bias.n_outputs} tracks; it needs trimming <= {accessibility.trimming} (the accessibility "
                f"model's) and {accessibility.n_outputs} tracks"
            )
        return int(accessibility.trimming), int(accessibility.n_outputs), 0
    raise InputError(
        f"the model of task {name!r} is a {type(tower).__name__}, not a bpnet-lite BPNet, BasePairNet or ChromBPNet"
    )


def bpnet_ensemble(
    n_members: int = 5,
    seed: int = 0,
    *,
    tasks: Sequence[str] = PAPER_TFS,
    n_filters: int = 64,
    n_layers: int = 9,
    n_outputs: int = 2,
    n_control_tracks: int = 0,
    trimming: int = 0,
    profile_window: int | None = None,
) -> list[nn.Module]:
    """Randomly initialised, seeded :class:`BPNetTasks` members of ``bpnetlite.BPNet`` towers.

    With no arguments: the paper's Fig 3 setting, five members, each with one
    BPNet per TF of :data:`PAPER_TFS` (64 filters, 9 dilated layers as in
    Avsec et al. 2021, two strands, no control tracks, no trimming: 1 kb in,
    1 kb profile out), seed 0.

    Parameters
    ----------
    n_members, seed
        Ensemble size and seed (member ``i`` is initialised from
        :func:`~deepmr_dist.models.architectures.member_seed` ``(seed, i)``;
        the global torch random state is untouched).
    tasks
        Task names, one BPNet each.
    n_filters, n_layers, n_outputs, n_control_tracks, trimming
        ``bpnetlite.BPNet`` arguments (``n_outputs``: profile tracks per task).
    profile_window
        See :class:`BPNetTasks`.
    """
    lib = _bpnetlite()
    return seeded_members(
        lambda: BPNetTasks(
            [
                lib.BPNet(
                    n_filters=n_filters,
                    n_layers=n_layers,
                    n_outputs=n_outputs,
                    n_control_tracks=n_control_tracks,
                    trimming=trimming,
                    verbose=False,
                )
                for _ in tasks
            ],
            tasks,
            profile_window=profile_window,
        ),
        n_members,
        seed,
    )


def chrombpnet_ensemble(
    n_members: int = 5,
    seed: int = 0,
    *,
    tasks: Sequence[str] = ("accessibility",),
    n_filters: int = 512,
    n_layers: int = 8,
    bias_filters: int = 128,
    bias_layers: int = 4,
    trimming: int = 0,
    profile_window: int | None = None,
) -> list[nn.Module]:
    """Randomly initialised, seeded :class:`BPNetTasks` members of ``bpnetlite.ChromBPNet`` towers.

    Each tower is a ChromBPNet: an accessibility BPNet plus a bias BPNet
    (both one unstranded track, no control tracks), whose profile logits add
    and whose counts add in linear space. With no arguments: five members of
    one task ``"accessibility"``, the official ChromBPNet sizes (accessibility
    model 512 filters x 8 layers, bias model 128 x 4), no trimming (1 kb in,
    1 kb profile out), seed 0.

    Parameters
    ----------
    n_members, seed
        Ensemble size and seed (as in :func:`bpnet_ensemble`).
    tasks
        Task names (e.g. cell types), one ChromBPNet each.
    n_filters, n_layers
        Accessibility model sizes.
    bias_filters, bias_layers
        Bias model sizes.
    trimming
        Trimming of both models.
    profile_window
        See :class:`BPNetTasks`.
    """
    lib = _bpnetlite()

    def tower() -> nn.Module:
        sizes = {"n_outputs": 1, "n_control_tracks": 0, "trimming": trimming, "verbose": False}
        bias = lib.BPNet(n_filters=bias_filters, n_layers=bias_layers, **sizes)
        accessibility = lib.BPNet(n_filters=n_filters, n_layers=n_layers, **sizes)
        return lib.ChromBPNet(bias, accessibility)

    return seeded_members(
        lambda: BPNetTasks([tower() for _ in tasks], tasks, profile_window=profile_window), n_members, seed
    )


def load_bpnet_checkpoint(path: str | Path, *, trimming: int | None = None) -> nn.Module:
    """Load one bpnet-lite model from a checkpoint written by its ``fit`` (``torch.save(model)``).

    The file is read with ``weights_only=True``, allowing only the classes a
    bpnet-lite checkpoint holds (its models, their layers, its training log),
    so no code in the file runs. Plain state dicts are refused: their keys do
    not say whether they belong to a ``BPNet`` or a ``BasePairNet``, whose
    forward passes differ.

    Parameters
    ----------
    path
        A ``BPNet``, ``BasePairNet`` or ``ChromBPNet`` checkpoint (``*.torch``).
    trimming
        Replace the model's trimming (both models of a ChromBPNet), e.g. ``0``
        to read 1 kb inputs with a model trained on 2114 bp; ``None`` keeps it.

    Returns
    -------
    torch.nn.Module
        The model on the CPU, in eval mode.

    Raises
    ------
    InputError
        If the file is missing, is not a bpnet-lite model checkpoint, or
        ``trimming`` is negative.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"bpnet-lite checkpoint {path} does not exist")
    if trimming is not None and trimming < 0:
        raise InputError(f"trimming must be >= 0, got {trimming}")
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            model = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input error
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        last_line = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        detail = f"it holds {unsafe.group(1)}" if unsafe else last_line
        raise InputError(
            f"bpnet-lite checkpoint {path} cannot be read as a bpnet-lite model ({detail}); it must be a "
            "BPNet, BasePairNet or ChromBPNet saved whole with torch.save(model) as bpnet-lite's fit does"
        ) from None
    lib = _bpnetlite()
    if isinstance(model, Mapping):
        raise InputError(
            f"bpnet-lite checkpoint {path} is a state dict; save the whole model (torch.save(model)), or rebuild it "
            "and load the state dict in your own entry point package.module:factory"
        )
    if not isinstance(model, (lib.BPNet, lib.bpnet.BasePairNet, lib.ChromBPNet)):
        raise InputError(f"bpnet-lite checkpoint {path} holds a {type(model).__name__}, not a BPNet or ChromBPNet")
    if trimming is not None:
        for part in (model.accessibility, model.bias) if isinstance(model, lib.ChromBPNet) else (model,):
            part.trimming = trimming
    return model.eval()


def load_bpnet_checkpoints(
    checkpoints: Mapping[str, Sequence[str | Path]],
    *,
    trimming: int | None = None,
    profile_window: int | None = None,
) -> list[nn.Module]:
    """Ensemble members from bpnet-lite checkpoints, one file per (task, member).

    Parameters
    ----------
    checkpoints
        Task name -> checkpoint paths, one per member, in member order (member
        ``i`` combines the ``i``-th file of every task). Every task needs the
        same number of files.
    trimming
        See :func:`load_bpnet_checkpoint`.
    profile_window
        See :class:`BPNetTasks`.

    Returns
    -------
    list of BPNetTasks
        One member per file index, tasks in the mapping's order.

    Raises
    ------
    InputError
        If no task is given, the tasks have different numbers of files (or
        none), or a file cannot be loaded (see :func:`load_bpnet_checkpoint`).
    """
    if not checkpoints:
        raise InputError("no bpnet-lite checkpoints given: map each task name to its members' files")
    counts = {task: len(paths) for task, paths in checkpoints.items()}
    if len(set(counts.values())) != 1 or 0 in counts.values():
        raise InputError(f"every task needs the same number (>= 1) of member checkpoints; got {counts}")
    towers = {task: [load_bpnet_checkpoint(p, trimming=trimming) for p in paths] for task, paths in checkpoints.items()}
    n_members = next(iter(counts.values()))
    return [
        BPNetTasks([towers[task][i] for task in towers], list(towers), profile_window=profile_window).eval()
        for i in range(n_members)
    ]


def bpnet_head(
    task_names: Sequence[str], wanted: Sequence[str] | None = None, *, readout: str = "counts"
) -> OutputHead:
    """The head reading one value per task from :class:`BPNetTasks` members.

    Parameters
    ----------
    task_names
        The members' ``task_names``.
    wanted
        Tasks to keep, by name, in order; ``None`` keeps all.
    readout
        ``"counts"``: predicted log total counts (the paper's choice, tuple
        element 1); ``"profile"``: the log profile sum over the central
        window (element 2; see the module documentation).

    Raises
    ------
    InputError
        If ``readout`` is unknown or a task name is (see
        :func:`~deepmr_dist.models.architectures.head_for_tasks`).
    """
    if readout not in READOUTS:
        raise InputError(f"unknown BPNet readout {readout!r}; expected one of {tuple(READOUTS)}")
    return head_for_tasks(task_names, wanted, output_index=READOUTS[readout])


def _checkpoint_globals() -> list[Any]:
    """Classes and functions a bpnet-lite checkpoint may hold, allowed for ``weights_only`` loading.

    bpnet-lite pickles its training log, whose numbers may be numpy scalars;
    their reconstructor is allowed under its numpy 1 and numpy 2 names.
    """
    lib = _bpnetlite()
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    dtypes = [getattr(np.dtypes, f"{kind}DType") for kind in ("Float64", "Float32", "Int64", "Int32", "Bool")]
    return [
        lib.BPNet,
        lib.bpnet.BasePairNet,
        lib.ChromBPNet,
        lib.chrombpnet._Exp,
        lib.chrombpnet._Log,
        lib.logging.Logger,
        nn.Conv1d,
        nn.ReLU,
        nn.ModuleList,
        nn.Linear,
        np.dtype,
        *dtypes,
        (scalar, "numpy.core.multiarray.scalar"),
        (scalar, "numpy._core.multiarray.scalar"),
    ]
