"""Arithmetic precision of ISM: ``fp32``, ``tf32``, ``bf16`` or ``fp16``, through autocast and the TF32 flags.

- ``fp32``: float32 throughout; on CUDA, TF32 is switched off for matrix
  products and cuDNN convolutions (PyTorch leaves it on for convolutions).
- ``tf32``: float32 storage, TF32 tensor-core products (CUDA only).
- ``bf16`` / ``fp16``: ``torch.autocast`` to bfloat16 / float16 (convolutions,
  products) with float32 elsewhere; ``bf16`` also runs on the CPU (PyTorch's
  CPU autocast; with native bfloat16 instructions on CPUs that have them,
  emulated and slower on others), ``fp16`` on CUDA only.

The flags are process-wide: :func:`precision_context` sets and restores them
around one ISM call, so one device must not run two calls of different
precisions at once: ISM tasks hold the worker's ``GPU=1`` resource, so a GPU worker runs one at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from deepmr_dist.errors import InputError

PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")
"""The valid precisions; ``fp32`` is the default."""

CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
"""The precisions that run on the CPU."""

AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, device: torch.device | None = None) -> None:
    """Raise :class:`InputError` for an unknown precision, or one that ``device`` cannot run.

    Parameters
    ----------
    precision
        One of :data:`PRECISIONS`.
    device
        Where ISM runs; ``None`` checks the name only.
    """
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if device is not None and device.type != "cuda" and precision not in CPU_PRECISIONS:
        raise InputError(
            f"precision {precision!r} needs a CUDA GPU, but ISM runs on {device.type}; "
            f"on {device.type} use one of {', '.join(CPU_PRECISIONS)}"
        )


@contextmanager
def precision_context(precision: str, device: torch.device) -> Iterator[None]:
    """Run the enclosed ISM at ``precision`` on ``device``; the TF32 flags are restored on exit.

    Raises
    ------
    InputError
        See :func:`check_precision`.
    """
    check_precision(precision, device)
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    try:
        dtype = AUTOCAST_DTYPES.get(precision)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
