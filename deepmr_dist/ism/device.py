"""Fitting ISM to its device: the mutant batch from free GPU memory, and one host copy per chunk.

:func:`choose_mutant_batch` is the sizing rule (a pure function);
:func:`auto_mutant_batch` measures what one mutant costs on a probe batch and
applies the rule to the free memory, both read from a :class:`DeviceMemory`
(:class:`CudaMemory` on a CUDA device; on others the batch is
:data:`DEFAULT_MUTANT_BATCH`). :func:`to_host` copies a chunk's predictions,
accumulated on the device, to the host in one transfer (through pinned memory
from CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.heads import OutputHead

DEFAULT_MUTANT_BATCH = 2048
"""Mutants per forward pass where none is given and the device is not a CUDA GPU.

On the CPU larger batches ran no faster (the simulation CNN, 5 members, chunks
of 16 and 64 loci, 1 and 2 torch threads: 4,096 and 8,192 were 10-40 % slower
than 2,048), so the CPU keeps ``deepmr predict``'s batch of 2,048.
"""

MEMORY_FRACTION = 0.5
"""Share of the free device memory one mutant batch may take (the rest: allocator slack, other work)."""

PROBE_MUTANTS = 256
"""Mutants in the measuring batch of :func:`auto_mutant_batch`."""


class _Runner(Protocol):
    """An ensemble runner: one raw output per member."""

    def mutants(
        self, x: torch.Tensor, cache: Any, locus: torch.Tensor, position: torch.Tensor, base: torch.Tensor
    ) -> list[Any]: ...


class DeviceMemory(Protocol):
    """The memory figures of one device that :func:`auto_mutant_batch` sizes a batch from."""

    def free(self) -> int:
        """Bytes a batch may still take: free on the device plus cached by the allocator."""

    def peak(self, run: Callable[[], Any]) -> int:
        """Call ``run`` and return the most bytes it held at once above what was allocated before."""


@dataclass(frozen=True)
class CudaMemory:
    """:class:`DeviceMemory` of a CUDA device, from PyTorch's caching allocator and the driver."""

    device: torch.device

    def free(self) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return free + torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)

    def peak(self, run: Callable[[], Any]) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        result = run()
        torch.cuda.synchronize(self.device)
        del result
        return torch.cuda.max_memory_allocated(self.device) - before


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


def auto_mutant_batch(
    runner: _Runner, head: OutputHead, x: torch.Tensor, cache: Any, memory: DeviceMemory | None = None
) -> int:
    """The mutant batch for ``runner`` on ``x``: sized from the free memory of ``memory``.

    A probe batch of the first :data:`PROBE_MUTANTS` mutants of ``x`` (fewer if
    ``x`` has fewer) is run through ``runner`` and ``head``; its peak memory
    above the current allocation, per mutant, is the cost of one mutant (fixed
    costs included, so the estimate errs on the safe side), and
    :func:`choose_mutant_batch` fits that cost into ``memory.free()``.

    Parameters
    ----------
    runner, head
        The ensemble runner and the head reading its outputs.
    x, cache
        One-hot references (batch, 4, L) and the runner's cache of them.
    memory
        Where the figures come from; ``None``: :class:`CudaMemory` of ``x``'s
        device on CUDA, and on any other device no measurement:
        :data:`DEFAULT_MUTANT_BATCH`.
    """
    if memory is None:
        if x.device.type != "cuda":
            return DEFAULT_MUTANT_BATCH
        memory = CudaMemory(x.device)
    locus, position, base = (t[:PROBE_MUTANTS] for t in mutation_list(x))
    n = int(locus.shape[0])

    def probe() -> list[torch.Tensor]:
        return [head(raw, n) for raw in runner.mutants(x, cache, locus, position, base)]

    per_mutant = memory.peak(probe) / max(n, 1)
    return choose_mutant_batch(memory.free(), per_mutant)


def to_host(tensor: torch.Tensor) -> np.ndarray:
    """``tensor`` as a NumPy array, in one device-to-host copy (into pinned memory from CUDA)."""
    if tensor.device.type != "cuda":
        return tensor.numpy(force=True)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    torch.cuda.current_stream(tensor.device).synchronize()
    return host.numpy()
