"""Tensor helpers for incremental ISM: windows of columns in channels-last memory.

A *window* is a ``(n_mutants, channels, width)`` tensor holding, for mutant
``k``, the columns ``[offset_k, offset_k + width)`` of an activation; outside
the window the mutant's activation equals the reference of its locus. Windows
and full activations are kept in channels-last memory (strides ``(width *
channels, 1, channels)``): gathering columns is then a copy of contiguous
rows, and convolutions run on oneDNN's channels-last kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same ``(batch, channels, length)`` tensor with channels-last memory."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """View a ``(batch, channels, length)`` tensor as ``(batch, length, channels)`` rows (copy if needed)."""
    return t.transpose(1, 2).contiguous()


@dataclass
class Batch:
    """The mutants of one call, with index tensors cached for the call.

    Parameters
    ----------
    x
        Reference one-hot sequences ``(loci, alphabet, length)``.
    locus, position, base
        Mutant ``k`` is ``x[locus[k]]`` with ``base[k]`` written at ``position[k]``.
    """

    x: torch.Tensor
    locus: torch.Tensor
    position: torch.Tensor
    base: torch.Tensor
    _aranges: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Number of mutants."""
        return int(self.locus.shape[0])

    def arange(self, width: int) -> torch.Tensor:
        """``arange(width)`` on the batch's device, cached."""
        if width not in self._aranges:
            self._aranges[width] = torch.arange(width, device=self.locus.device)
        return self._aranges[width]

    def columns(self, left: int, width: int) -> torch.Tensor:
        """Column indices ``position + left + arange(width)``, shape ``(n, width)``."""
        return (self.position + left)[:, None] + self.arange(width)

    def valid(self, left: int, width: int, length: int) -> torch.Tensor:
        """Boolean ``(n, width, 1)``: which window columns lie inside ``[0, length)``."""
        cols = self.columns(left, width)
        return ((cols >= 0) & (cols < length)).unsqueeze(-1)


class PaddedRef:
    """A reference activation stored as zero-padded channels-last rows.

    Parameters
    ----------
    ref
        ``(loci, channels, length)``; a leading dimension of 1 is shared by all loci.
    pad_left, pad_right
        Zero columns added on each side, so that every gathered column exists.
    """

    def __init__(self, ref: torch.Tensor, pad_left: int, pad_right: int) -> None:
        n, channels, length = ref.shape
        padded = ref.new_zeros((n, pad_left + length + pad_right, channels))
        padded[:, pad_left : pad_left + length] = ref.transpose(1, 2)
        self.rows = padded.view(-1, channels)
        self.shared = n == 1
        self.pad_left = pad_left
        self.padded_length = pad_left + length + pad_right
        self.channels = channels

    def gather_rows(self, batch: Batch, left: int | torch.Tensor, width: int) -> torch.Tensor:
        """Rows ``(n, width, channels)`` of columns ``position + left + arange(width)`` per mutant.

        ``left`` may be a tensor of per-mutant starts (relative to column 0, not to the position).
        """
        if isinstance(left, torch.Tensor):
            start = left + self.pad_left
        else:
            start = batch.position + (left + self.pad_left)
        if not self.shared:
            start = start + batch.locus * self.padded_length
        index = (start[:, None] + batch.arange(width)).view(-1)
        return self.rows.index_select(0, index).view(batch.size, width, self.channels)

    def gather(self, batch: Batch, left: int, width: int) -> torch.Tensor:
        """Columns ``position + left + arange(width)`` per mutant as a ``(n, channels, width)`` window."""
        return self.gather_rows(batch, left, width).transpose(1, 2)

    def gather_fixed(self, batch: Batch, lo: int, hi: int) -> torch.Tensor:
        """Columns ``[lo, hi)`` for every mutant, ``(n, channels, hi - lo)`` channels-last."""
        start = torch.full_like(batch.position, lo)
        return self.gather_rows(batch, start, hi - lo).transpose(1, 2)


def span(
    ref: PaddedRef,
    window: torch.Tensor,
    batch: Batch,
    left: int,
    extra_left: int,
    extra_right: int,
    mask_length: int | None,
) -> torch.Tensor:
    """Extend a window with reference columns on each side.

    Parameters
    ----------
    ref
        The reference of the value the window belongs to.
    window
        ``(n, channels, width)``, columns ``position + left + arange(width)``.
    left
        The window's static left extent relative to the mutated position.
    extra_left, extra_right
        Reference columns to add before and after the window.
    mask_length
        When given, window columns outside ``[0, mask_length)`` are set to zero
        (the zero padding a convolution reads there); otherwise they are kept.

    Returns
    -------
    Tensor ``(n, channels, extra_left + width + extra_right)`` in channels-last memory.
    """
    width = window.shape[2]
    rows = ref.gather_rows(batch, left - extra_left, extra_left + width + extra_right)
    middle = rows[:, extra_left : extra_left + width]
    middle.copy_(window.transpose(1, 2))
    if mask_length is not None:
        middle.masked_fill_(~batch.valid(left, width, mask_length), 0)
    return rows.transpose(1, 2)


def materialize(
    ref: PaddedRef, window: torch.Tensor, batch: Batch, left: int, lo: int, hi: int
) -> torch.Tensor:
    """Full mutant activations over columns ``[lo, hi)``: reference with the window written in.

    Window columns outside ``[lo, hi)`` are dropped (written to a scratch column).
    """
    width = window.shape[2]
    n_cols = hi - lo
    start = torch.full_like(batch.position, lo)
    rows = ref.gather_rows(batch, start, n_cols + 1)
    target = batch.columns(left - lo, width)
    target = torch.where((target >= 0) & (target < n_cols), target, n_cols)
    mutant = batch.arange(batch.size)[:, None]
    rows[mutant, target] = window.transpose(1, 2)
    return rows[:, :n_cols].transpose(1, 2)


def pad_columns(data: torch.Tensor, pad_left: int, pad_right: int) -> torch.Tensor:
    """Zero-pad the last axis of ``(n, channels, width)``, keeping channels-last memory."""
    if pad_left == 0 and pad_right == 0:
        return data
    n, channels, width = data.shape
    out = data.new_zeros((n, pad_left + width + pad_right, channels))
    out[:, pad_left : pad_left + width] = data.transpose(1, 2)
    return out.transpose(1, 2)


def conv(
    data: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    dilation: int,
    groups: int,
    padding: int = 0,
) -> torch.Tensor:
    """1-d convolution on channels-last ``(n, channels, width)`` via a 2-d oneDNN kernel.

    ``weight`` is the 2-d channels-last form ``(out, in / groups, 1, kernel)``;
    ``padding`` zero columns are added on both sides.
    """
    out = F.conv2d(data.unsqueeze(2), weight, bias, 1, (0, padding), (1, dilation), groups)
    return out.squeeze(2)


def conv_weight(weight: torch.Tensor) -> torch.Tensor:
    """The channels-last 2-d form of a ``(out, in, kernel)`` Conv1d weight."""
    return weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
