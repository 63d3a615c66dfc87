"""Tensor helpers for the rules and the runner: windows of columns in channels-last memory.

A *window* is a ``(n_mutants, channels, width)`` tensor holding, for mutant
``k``, the columns ``[offset_k, offset_k + width)`` of an activation; outside
the window the mutant's activation equals the reference of its locus. Windows
and full activations are kept in channels-last memory (strides ``(width *
channels, 1, channels)``): gathering columns is then a copy of contiguous
rows, and convolutions run on oneDNN's channels-last kernels.

Gathers write into buffers reused from one batch of mutants to the next
(:class:`GatherBuffers`): windows of a fused network run to hundreds of MB
per batch, and writing a fresh tensor that large is bound by first-touch page
faults (benchmarks/README.md, ``bench_ism.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn import functional


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """The same ``(batch, channels, length)`` tensor with channels-last memory."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


BufferKey = tuple[int, torch.dtype, torch.device]
"""``(row size, dtype, device)`` of gathered rows."""


class GatherBuffers:
    """Output tensors of gathers, kept from one batch of mutants for the next.

    A batch's ``i``-th request for rows of one size, dtype and device gets
    (the first rows of) the ``i``-th buffer of that key, so within a batch no
    two gathers share memory (a gathered tensor may live to the end of its
    batch), and the next batch, making the same requests, writes into memory
    already paged in. Results are the same as with fresh tensors. One set
    serves one thread at a time (it belongs to one reference cache).
    """

    def __init__(self) -> None:
        self._buffers: dict[BufferKey, list[torch.Tensor]] = {}
        self._storages: set[int] = set()

    def get(self, key: BufferKey, index: int, n_rows: int) -> torch.Tensor:
        """``n_rows`` rows of the ``index``-th buffer of ``key``, (re)allocated when it has fewer."""
        buffers = self._buffers.setdefault(key, [])
        if index == len(buffers) or buffers[index].shape[0] < n_rows:
            size, dtype, device = key
            fresh = torch.empty((n_rows, size), dtype=dtype, device=device)
            if index == len(buffers):
                buffers.append(fresh)
            else:
                self._storages.discard(buffers[index].untyped_storage().data_ptr())
                buffers[index] = fresh
            self._storages.add(fresh.untyped_storage().data_ptr())
        return buffers[index][:n_rows]

    def holds(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in (is, or views) one of the buffers."""
        return t.untyped_storage().data_ptr() in self._storages


@dataclass
class Batch:
    """The mutants of one call, with index tensors cached for the call.

    Parameters
    ----------
    x
        Reference one-hot sequences ``(loci, alphabet, length)``.
    locus, position, base
        Mutant ``k`` is ``x[locus[k]]`` with ``base[k]`` written at ``position[k]``.
    buffers
        Where gathers write (reused across the batches of one reference cache); ``None``: fresh tensors.
    """

    x: torch.Tensor
    locus: torch.Tensor
    position: torch.Tensor
    base: torch.Tensor
    buffers: GatherBuffers | None = None
    _aranges: dict[int, torch.Tensor] = field(default_factory=dict)
    _taken: dict[BufferKey, int] = field(default_factory=dict)

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

    def buffer(self, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """``(n, size)`` rows for this batch alone to gather into, or ``None`` without :attr:`buffers`."""
        if self.buffers is None:
            return None
        key = (size, dtype, device)
        index = self._taken.get(key, 0)
        self._taken[key] = index + 1
        return self.buffers.get(key, index, self.size)


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
        self._spans: dict[int, torch.Tensor] = {}

    def spans(self, width: int) -> torch.Tensor:
        """Overlapping view ``(start row, width * channels)``: row ``i`` holds rows ``i .. i + width - 1``.

        Gathering whole spans from it copies one contiguous block per mutant.
        """
        if width not in self._spans:
            flat = self.rows.view(-1)
            size = (self.rows.shape[0] - width + 1, width * self.channels)
            self._spans[width] = flat.as_strided(size, (self.channels, 1))
        return self._spans[width]

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
        spans = self.spans(width)
        out = batch.buffer(spans.shape[1], spans.dtype, spans.device)
        rows = spans.index_select(0, start) if out is None else torch.index_select(spans, 0, start, out=out)
        return rows.view(batch.size, width, self.channels)

    def gather(self, batch: Batch, left: int, width: int) -> torch.Tensor:
        """Columns ``position + left + arange(width)`` per mutant as a ``(n, channels, width)`` window."""
        return self.gather_rows(batch, left, width).transpose(1, 2)


def span(
    ref: PaddedRef,
    window: torch.Tensor,
    batch: Batch,
    left: int,
    extra_left: int,
    extra_right: int,
    mask_length: int | None,
    finite: bool = False,
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
    finite
        Whether the window is known to hold only finite values (see :func:`zero_outside`).

    Returns
    -------
    Tensor ``(n, channels, extra_left + width + extra_right)`` in channels-last memory.
    """
    width = window.shape[2]
    rows = ref.gather_rows(batch, left - extra_left, extra_left + width + extra_right)
    middle = rows[:, extra_left : extra_left + width]
    middle.copy_(window.transpose(1, 2))
    if mask_length is not None:
        zero_outside(middle, batch.valid(left, width, mask_length), finite)
    return rows.transpose(1, 2)


def zero_outside(rows: torch.Tensor, valid: torch.Tensor, finite: bool) -> torch.Tensor:
    """Zero the rows ``(n, width, channels)`` where ``valid`` ``(n, width, 1)`` is false, in place.

    With ``finite`` (the rows hold no inf or NaN) a multiplication does it, much faster than a masked fill.
    """
    if finite:
        return rows.mul_(valid.to(rows.dtype))
    return rows.masked_fill_(~valid, 0)


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


class Conv:
    """A 1-d convolution on channels-last ``(n, channels, width)`` activations.

    Most convolutions run on channels-last 2-d kernels (oneDNN, cuDNN). On the
    CPU, with at most :attr:`FEW_OUTPUTS` output channels (profile heads),
    oneDNN is slow, so the convolution is computed as one matrix product of
    the input with every tap's weights followed by a strided sum along the
    kernel's diagonal.

    Parameters
    ----------
    weight
        ``(out, in / groups, kernel)``.
    bias
        ``(out,)`` or ``None``.
    dilation, groups
        As in ``Conv1d``.
    """

    FEW_OUTPUTS = 4
    CHUNK_ELEMENTS = 1 << 19
    """Size of the per-chunk tap products in the few-outputs path (kept cache-sized)."""
    CPU_CHANNEL_MULTIPLE = 8
    """oneDNN is markedly faster when output channels fill whole AVX registers: on the CPU,
    zero filters pad them to this multiple and the extra outputs are sliced off."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dilation: int, groups: int) -> None:
        self.out_channels, in_channels, self.kernel = weight.shape
        self.bias = bias
        self.dilation = dilation
        self.groups = groups
        self.few = self.out_channels <= self.FEW_OUTPUTS and groups == 1
        # (in, kernel * out): column t * out + o holds tap t of output o.
        self.taps = weight.permute(1, 2, 0).reshape(in_channels, -1).contiguous()
        self.weight = weight.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        extra = -self.out_channels % self.CPU_CHANNEL_MULTIPLE if groups == 1 else 0
        padded = functional.pad(self.weight, (0, 0, 0, 0, 0, 0, 0, extra))
        self.cpu_weight = padded.contiguous(memory_format=torch.channels_last)
        self.cpu_bias = None if bias is None else functional.pad(bias, (0, extra))

    def __call__(self, data: torch.Tensor, padding: int = 0) -> torch.Tensor:
        """Convolve ``data`` with ``padding`` zero columns on both sides."""
        on_cpu = data.device.type == "cpu"
        if self.few and on_cpu:
            return self._few_outputs(data, padding)
        weight, bias = (self.cpu_weight, self.cpu_bias) if on_cpu else (self.weight, self.bias)
        out = functional.conv2d(data.unsqueeze(2), weight, bias, 1, (0, padding), (1, self.dilation), self.groups)
        return out.squeeze(2)[:, : self.out_channels]

    def _few_outputs(self, data: torch.Tensor, padding: int) -> torch.Tensor:
        n, channels, width = data.shape
        padded_width = width + 2 * padding
        out_width = padded_width - self.dilation * (self.kernel - 1)
        rows = data.transpose(1, 2)
        out = data.new_empty((n, out_width, self.out_channels))
        chunk = max(1, self.CHUNK_ELEMENTS // (padded_width * self.taps.shape[1]))
        buffer = data.new_zeros((min(chunk, n), padded_width, channels))
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            buffer[:m, padding : padding + width] = rows[start : start + m]
            taps = (buffer[:m].view(-1, channels) @ self.taps).view(m, padded_width, self.kernel, self.out_channels)
            s = taps.stride()
            diagonal = taps.as_strided(
                (m, out_width, self.kernel, self.out_channels), (s[0], s[1], self.dilation * s[1] + s[2], 1)
            )
            torch.sum(diagonal, dim=2, out=out[start : start + m])
        if self.bias is not None:
            out += self.bias
        return out.transpose(1, 2)
