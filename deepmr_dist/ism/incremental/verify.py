"""Verify: the build-time check of an incremental runner against full forward passes.

Mutants at both sequence ends, in the middle and at an ``N`` column
(:func:`probe_mutants`) are predicted by the runner and by the member itself;
a runner that disagrees beyond float rounding (:func:`compare_outputs`) is not
used. The ensemble fusion (:mod:`deepmr_dist.ism.fusion`) is checked the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.ism.mutants import apply_mutations, mutation_list

VERIFY_TOLERANCE = 1e-4
"""Largest allowed difference to full recomputation, relative to the output scale."""

VERIFY_TOLERANCE_TF32 = 3e-3
"""The same on CUDA when float32 convolutions may run in TF32 (PyTorch's default for cuDNN)."""


def verify(
    runner: IncrementalRunner, member: nn.Module, x: torch.Tensor, outputs: Sequence[int] | None = None
) -> str | None:
    """Compare ``runner`` with full forward passes on mutants at the ends, the middle and an ``N``.

    ``outputs`` are the selected output elements (as in :func:`~.build.build_incremental_runner`).
    Returns a description of the first mismatch, or ``None`` if all agree.
    """
    locus, position, base = probe_mutants(x)
    try:
        with torch.inference_mode():
            ref, cache = runner.reference(x)
            got = runner.mutants(x, cache, locus, position, base)
            want_ref = _select(member(x), outputs)
            want = _select(member(apply_mutations(x, locus, position, base)), outputs)
    except Exception as err:  # noqa: BLE001 - any failure disables the runner
        return f"{type(err).__name__}: {err}"
    for name, a, b in (("reference", ref, want_ref), ("mutants", got, want)):
        problem = compare_outputs(a, b, tolerance(x))
        if problem is not None:
            return f"{name}: {problem}"
    return None


def probe_mutants(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mutants a build-time check predicts: every edit at both ends, a third and the middle of ``x``."""
    length = x.shape[2]
    locus, position, base = mutation_list(x)
    keep = torch.isin(position, torch.tensor([0, 1, length // 3, length // 2, length - 2, length - 1], device=x.device))
    return locus[keep], position[keep], base[keep]


def tolerance(x: torch.Tensor) -> float:
    """The allowed difference (relative to the output scale) for float32 work on ``x``'s device."""
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return VERIFY_TOLERANCE_TF32 if tf32 else VERIFY_TOLERANCE


def _select(value: Any, outputs: Sequence[int] | None) -> Any:
    if outputs is None:
        return value
    wanted = {i % len(value) for i in outputs}
    return type(value)(v if i in wanted else None for i, v in enumerate(value))


def compare_outputs(got: Any, want: Any, tolerance: float) -> str | None:
    """The first difference between two output structures beyond ``tolerance`` x the output scale, or ``None``."""
    got_leaves, want_leaves = tensor_leaves(got), tensor_leaves(want)
    if len(got_leaves) != len(want_leaves):
        return f"{len(got_leaves)} outputs instead of {len(want_leaves)}"
    for a, b in zip(got_leaves, want_leaves, strict=True):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        scale = b.abs().max().item() if b.numel() else 0.0
        error = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        if not error <= tolerance * max(scale, 1.0):
            return f"differs by {error:.3g} (output scale {scale:.3g})"
    return None


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """The tensors of a nested output structure (tensors, tuples, lists and dict values), depth first."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in tensor_leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in tensor_leaves(v)]
    return []
