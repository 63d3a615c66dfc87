"""Output heads: turn a model's raw output into a ``(batch, task)`` tensor.

A genomic model may return a tensor ``(batch, outputs)``, a profile
``(batch, outputs, length)``, or a tuple of such (BPNet returns
``(profile, log_counts)``). An :class:`OutputHead` picks the element, sums a
profile axis, selects tasks and applies an optional transform, so that every
downstream stage sees one prediction per task.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepmr_dist.errors import InputError, ModelOutputError
from deepmr_dist.models.transforms import check_transform

__all__ = ["OutputHead", "parse_tasks"]


@dataclass(frozen=True)
class OutputHead:
    """How to read task predictions from a model's raw output.

    Parameters
    ----------
    output_index
        Element to take when the model returns a tuple or list (``None``: the
        output is a tensor).
    profile_axis
        Axis of the selected tensor to sum over (e.g. ``-1`` for a profile
        ``(batch, outputs, length)``); ``None`` for no reduction.
    tasks
        Indices of the outputs to keep, in order; ``None`` keeps all.
    transform
        ``"none"``, ``"sigmoid"`` or ``"log1p"``, applied after selection.
    task_names
        Names of the kept tasks (the ``task`` coordinate). Defaults to
        ``task0, task1, ...`` numbered by output index.

    Raises
    ------
    InputError
        An unknown ``transform`` (listing the valid ones), or ``tasks`` and
        ``task_names`` of different lengths.
    """

    output_index: int | None = None
    profile_axis: int | None = None
    tasks: tuple[int, ...] | None = None
    transform: str = "none"
    task_names: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        check_transform(self.transform)
        if self.tasks is not None and self.task_names is not None and len(self.tasks) != len(self.task_names):
            raise InputError(f"{len(self.tasks)} task indices but {len(self.task_names)} task names")

    def __call__(self, raw: Any, batch: int) -> torch.Tensor:
        """Apply the head to a raw model output for ``batch`` sequences.

        Raises
        ------
        ModelOutputError
            If the output does not have the structure the head expects.
        """
        out = raw
        if self.output_index is not None:
            if not isinstance(out, (tuple, list)):
                raise ModelOutputError(
                    f"head takes element {self.output_index} of a tuple output, "
                    f"but the model returned a {type(out).__name__}"
                )
            if not -len(out) <= self.output_index < len(out):
                raise ModelOutputError(
                    f"head takes element {self.output_index} but the model returned {len(out)} outputs"
                )
            out = out[self.output_index]
        elif isinstance(out, (tuple, list)):
            raise ModelOutputError(
                f"the model returned a {type(out).__name__} of {len(out)} outputs; choose one with an output index"
            )
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(f"model output is a {type(out).__name__}, not a tensor")
        if self.profile_axis is not None:
            out = out.sum(dim=self.profile_axis)
        if out.ndim == 1:
            out = out.unsqueeze(1)
        if out.ndim != 2 or out.shape[0] != batch:
            raise ModelOutputError(
                f"model output has shape {tuple(out.shape)}; expected (batch={batch}, tasks) "
                "after the head (set a profile axis to sum over a profile dimension)"
            )
        if self.tasks is not None:
            n_out = out.shape[1]
            bad = [t for t in self.tasks if not 0 <= t < n_out]
            if bad:
                raise ModelOutputError(f"task indices {bad} out of range for a model with {n_out} outputs")
            out = out[:, list(self.tasks)]
        if self.transform == "sigmoid":
            out = torch.sigmoid(out)
        elif self.transform == "log1p":
            out = torch.log1p(out)
        return out

    def names(self, n_outputs: int) -> list[str]:
        """Task names for a model with ``n_outputs`` outputs (before selection)."""
        if self.task_names is not None:
            return list(self.task_names)
        indices = self.tasks if self.tasks is not None else range(n_outputs)
        return [f"task{i}" for i in indices]


def parse_tasks(spec: str | None, available: Sequence[str] | None = None) -> tuple[tuple[int, ...] | None, tuple[str, ...] | None]:
    """Parse a ``--tasks`` value: comma-separated indices or names.

    Parameters
    ----------
    spec
        e.g. ``"0,3"`` or ``"GATA,TAL1"``; ``None`` keeps every output.
    available
        Names of all model outputs, in output order, needed to resolve names.

    Returns
    -------
    (indices, names)
        ``names`` is ``None`` when the spec gave indices and no output names are known.

    Raises
    ------
    InputError
        An empty spec, indices beyond the known output names, names without
        known output names, or unknown names.
    """
    if spec is None:
        return None, tuple(available) if available is not None else None
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise InputError("--tasks is empty")
    if all(s.lstrip("-").isdigit() for s in items):
        indices = tuple(int(s) for s in items)
        if available is None:
            return indices, None
        outside = [i for i in indices if not -len(available) <= i < len(available)]
        if outside:
            raise InputError(f"task indices {outside} out of range for the {len(available)} task names {list(available)}")
        return indices, tuple(available[i] for i in indices)
    if available is None:
        raise InputError(f"tasks {items} are given by name, but no task names are known (pass --task-names)")
    missing = [s for s in items if s not in available]
    if missing:
        raise InputError(f"unknown tasks {missing}; the model's tasks are {list(available)}")
    return tuple(list(available).index(s) for s in items), tuple(items)
