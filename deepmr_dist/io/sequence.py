"""DNA sequences: base codes, one-hot encoding and loading loci from files.

Sequences are held as int8 base codes (A=0, C=1, G=2, T=3, N=4) in an xarray
Dataset with a ``sequence`` variable (locus, position); locus ids and, for BED
input, genomic intervals are coordinates along ``locus``. One-hot tensors are
made from codes only where a model needs them (on the device, see
:func:`codes_to_onehot`); ``N`` is the all-zero column.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from deepmr_dist.errors import InputError

ALPHABET = "ACGT"
N_CODE = 4

_LOOKUP = np.full(256, -1, dtype=np.int8)
for _code, _base in enumerate(ALPHABET + "N"):
    _LOOKUP[ord(_base)] = _code
    _LOOKUP[ord(_base.lower())] = _code


def encode(sequence: str, *, name: str = "sequence", source: str | None = None) -> np.ndarray:
    """Encode a DNA string as int8 base codes (case-insensitive; N = 4).

    Raises
    ------
    InputError
        On any character other than A, C, G, T, N, naming the record and the 1-based position.
    """
    raw = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
    codes = _LOOKUP[raw]
    bad = np.flatnonzero(codes < 0)
    if bad.size:
        where = f" in {source}" if source else ""
        pos = int(bad[0])
        raise InputError(
            f"record {name!r}{where}: invalid base {sequence[pos]!r} at position {pos + 1} "
            f"({bad.size} invalid character(s); only A, C, G, T, N are allowed)"
        )
    return codes


def sequences_dataset(
    codes: np.ndarray,
    locus_ids: Sequence[str],
    *,
    intervals: pd.DataFrame | None = None,
) -> xr.Dataset:
    """Wrap base codes (locus, position) and their locus ids as a Dataset.

    Parameters
    ----------
    codes
        int8 array (n_loci, length) of base codes.
    locus_ids
        Unique locus names.
    intervals
        Optional table with columns chrom, start, end (0-based, half-open), one row per locus.
    """
    ids = np.asarray(list(locus_ids), dtype=object)
    if len(set(ids.tolist())) != len(ids):
        dup = pd.Series(ids).loc[pd.Series(ids).duplicated()].iloc[0]
        raise InputError(f"locus id {dup!r} occurs more than once")
    coords: dict[str, object] = {"locus": ids, "position": np.arange(codes.shape[1])}
    if intervals is not None:
        coords["chrom"] = ("locus", intervals["chrom"].astype(str).to_numpy(dtype=object))
        coords["start"] = ("locus", intervals["start"].to_numpy(dtype=np.int64))
        coords["end"] = ("locus", intervals["end"].to_numpy(dtype=np.int64))
    return xr.Dataset({"sequence": (("locus", "position"), codes.astype(np.int8))}, coords=coords)


def read_fasta(path: str | Path) -> xr.Dataset:
    """Load a FASTA file of equal-length records, one locus per record.

    Raises
    ------
    InputError
        For a missing or empty file, unequal record lengths, or invalid characters.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FASTA file {path} does not exist")
    names: list[str] = []
    chunks: list[list[str]] = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                name = line[1:].split()[0] if line[1:].strip() else ""
                if not name:
                    raise InputError(f"{path}:{lineno}: FASTA header without a name")
                names.append(name)
                chunks.append([])
            elif not names:
                raise InputError(f"{path}:{lineno}: sequence data before the first '>' header")
            else:
                chunks[-1].append(line)
    if not names:
        raise InputError(f"FASTA file {path} contains no records")
    seqs = ["".join(c) for c in chunks]
    lengths = {len(s) for s in seqs}
    if len(lengths) != 1:
        first = len(seqs[0])
        odd = next(i for i, s in enumerate(seqs) if len(s) != first)
        raise InputError(
            f"FASTA file {path}: records must have equal length, but {names[0]!r} has {first} bp "
            f"and {names[odd]!r} has {len(seqs[odd])} bp"
        )
    if 0 in lengths:
        raise InputError(f"FASTA file {path}: record {names[0]!r} is empty")
    codes = np.stack([encode(s, name=n, source=str(path)) for n, s in zip(names, seqs)])
    return sequences_dataset(codes, names)


def read_bed(path: str | Path) -> pd.DataFrame:
    """Read the first three (or four, with a name) columns of a BED file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"BED file {path} does not exist")
    rows = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip() or line.startswith(("#", "track", "browser")):
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                raise InputError(f"{path}:{lineno}: a BED line needs at least 3 tab-separated columns")
            try:
                start, end = int(fields[1]), int(fields[2])
            except ValueError:
                raise InputError(f"{path}:{lineno}: start and end must be integers, got {fields[1]!r}, {fields[2]!r}") from None
            if start < 0 or end < start:
                raise InputError(f"{path}:{lineno}: invalid interval {fields[0]}:{start}-{end}")
            name = fields[3] if len(fields) > 3 and fields[3] not in ("", ".") else None
            rows.append((fields[0], start, end, name, lineno))
    if not rows:
        raise InputError(f"BED file {path} contains no intervals")
    return pd.DataFrame(rows, columns=["chrom", "start", "end", "name", "line"])


def read_bed_regions(bed: str | Path, genome: str | Path, width: int) -> xr.Dataset:
    """Load fixed-width windows centred on BED intervals from a genome FASTA (via pyfaidx).

    Each locus is ``[centre - width // 2, centre - width // 2 + width)`` with
    ``centre = (start + end) // 2``. Locus ids are the BED name column, else
    ``chrom:start-end`` of the window.

    Raises
    ------
    InputError
        For an unknown chromosome or a window past the chromosome's ends, naming the BED line.
    """
    import pyfaidx

    if width <= 0:
        raise InputError(f"--width must be positive, got {width}")
    regions = read_bed(bed)
    genome = Path(genome)
    if not genome.is_file():
        raise InputError(f"genome FASTA {genome} does not exist")
    try:
        fasta = pyfaidx.Fasta(str(genome), sequence_always_upper=True, as_raw=True)
    except (pyfaidx.FastaIndexingError, ValueError) as exc:
        raise InputError(f"genome FASTA {genome} cannot be indexed: {exc}") from None
    with fasta:
        starts = (regions["start"] + regions["end"]) // 2 - width // 2
        ends = starts + width
        codes = np.empty((len(regions), width), dtype=np.int8)
        for i, (chrom, s, e, line) in enumerate(zip(regions["chrom"], starts, ends, regions["line"])):
            if chrom not in fasta:
                raise InputError(f"{bed}:{line}: chromosome {chrom!r} is not in the genome {genome}")
            size = len(fasta[chrom])
            if s < 0 or e > size:
                raise InputError(
                    f"{bed}:{line}: the {width} bp window {chrom}:{s}-{e} runs past the end of {chrom} (0-{size})"
                )
            codes[i] = encode(fasta[chrom][int(s) : int(e)], name=f"{chrom}:{s}-{e}", source=str(genome))
    intervals = pd.DataFrame({"chrom": regions["chrom"], "start": starts, "end": ends})
    ids = [n if isinstance(n, str) else f"{c}:{s}-{e}" for n, c, s, e in zip(regions["name"], regions["chrom"], starts, ends)]
    return sequences_dataset(codes, ids, intervals=intervals)


def read_onehot(path: str | Path) -> xr.Dataset:
    """Load a one-hot ``.npy`` array (n_loci, 4, length) in A, C, G, T order; all-zero columns are N."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"one-hot file {path} does not exist")
    try:
        x = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise InputError(f"{path} is not a numeric .npy array: {exc}") from None
    if x.ndim != 3 or x.shape[1] != 4 or x.shape[0] == 0 or x.shape[2] == 0:
        raise InputError(f"{path}: expected a one-hot array of shape (n_loci, 4, length), got {x.shape}")
    if not np.isin(x, (0, 1)).all() or (x.sum(axis=1) > 1).any():
        raise InputError(f"{path}: values must be 0/1 with at most one 1 per position")
    codes = np.where(x.sum(axis=1) == 0, N_CODE, x.argmax(axis=1)).astype(np.int8)
    return sequences_dataset(codes, [f"locus{i}" for i in range(x.shape[0])])


def codes_to_onehot(codes: torch.Tensor) -> torch.Tensor:
    """One-hot float32 (batch, 4, length) from int codes (batch, length), on the codes' device; N -> zeros."""
    onehot = torch.nn.functional.one_hot(codes.long(), num_classes=N_CODE + 1)[..., :N_CODE]
    return onehot.permute(0, 2, 1).to(torch.float32).contiguous()


def decode(codes: np.ndarray) -> str:
    """Inverse of :func:`encode` for one sequence."""
    return "".join((ALPHABET + "N")[c] for c in codes)
