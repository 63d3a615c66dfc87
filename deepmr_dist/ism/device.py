"""Fitting ISM to its device: the mutant batch from free GPU memory, and one host copy per chunk.

:func:`choose_mutant_batch` is the sizing rule (a pure function);
:func:`auto_mutant_batch` measures what one mutant costs on a CUDA device and
applies it. :func:`to_host` copies a chunk's predictions, accumulated on the
device, to the host in one transfer (through pinned memory from CUDA).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.heads import OutputHead

DEFAULT_MUTANT_BATCH = 4096
"""Mutants per forward pass where none is given and the device is not a CUDA GPU."""

MEMORY_FRACTION = 0.5
"""Share of the free device memory one mutant batch may take (the rest: allocator slack, other work)."""

PROBE_MUTANTS = 256
"""Mutants in the measuring batch of :func:`auto_mutant_batch`."""


class _Runner(Protocol):
    """An ensemble runner: one raw output per member."""

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> list[Any]: ...


def choose_mutant_batch(
    free_bytes: int,
    bytes_per_mutant: float,
    *,
    fraction: float = MEMORY_FRACTION,
    minimum: int = 64,
    maximum: int = 1 << 16,
    multiple: int = 64,
) -> int:
    """The largest batch whose working memory fits ``fraction`` of ``free_bytes``.

    Parameters
    ----------
    free_bytes
        Free device memory.
    bytes_per_mutant
        Peak working memory of one mutant (measured on a probe batch).
    fraction
        Share of ``free_bytes`` one batch may use.
    minimum, maximum
        Bounds of the result (``minimum`` even if it does not fit: the
        device then runs out of memory with a clear error rather than crawl).
    multiple
        The result is a multiple of this (kernel-friendly), unless bounded.

    Returns
    -------
    int
        ``floor(fraction * free / per_mutant)`` rounded down to ``multiple``, within ``[minimum, maximum]``.
    """
    if bytes_per_mutant <= 0:
        return maximum
    fits = int(fraction * max(free_bytes, 0) / bytes_per_mutant)
    return max(minimum, min(maximum, fits // multiple * multiple))


def auto_mutant_batch(runner: _Runner, head: OutputHead, x: torch.Tensor, cache: Any) -> int:
    """The mutant batch for ``runner`` on ``x``'s device: sized from free memory on CUDA.

    On CUDA, a probe batch of :data:`PROBE_MUTANTS` mutants is run and its peak
    allocation above the current one taken as its cost (fixed costs included,
    so the estimate errs on the safe side); elsewhere :data:`DEFAULT_MUTANT_BATCH`.
    """
    device = x.device
    if device.type != "cuda":
        return DEFAULT_MUTANT_BATCH
    locus, position, base = (t[:PROBE_MUTANTS] for t in mutation_list(x))
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    outputs = [head(raw, locus.shape[0]) for raw in runner.mutants(x, cache, locus, position, base)]
    torch.cuda.synchronize(device)
    per_mutant = (torch.cuda.max_memory_allocated(device) - before) / locus.shape[0]
    del outputs
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return choose_mutant_batch(free + cached, per_mutant)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a NumPy array, in one device-to-host copy (into pinned memory from CUDA)."""
    if tensor.device.type != "cuda":
        return tensor.numpy(force=True)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()
