"""DNA sequences: base codes, one-hot encoding and loading loci from files.

Sequences are held as int8 base codes (A=0, C=1, G=2, T=3, N=4) in an xarray
Dataset with a ``sequence`` variable (locus, position); locus ids and, for BED
input, genomic intervals are coordinates along ``locus``. One-hot tensors are
made from codes only where a model needs them (on the device, see
:func:`codes_to_onehot`); ``N`` is the all-zero column.

Input conventions:

* FASTA and BED files may be plain text or gzip-compressed (BGZF included; a
  BGZF file is a gzip file of many members), recognised by their first bytes
  and decompressed while they are read. A genome FASTA (``--genome``) is read
  with random access by pyfaidx, so it must be plain or BGZF (``bgzip``), not
  plain gzip. A file that is not text is refused.
* Bases are case-insensitive: soft-masked (lowercase) bases are read as bases.
* The IUPAC ambiguity codes R, Y, K, M, S, W, B, D, H, V are read as N with
  ``iupac="n"`` (the default; a warning counts them per record) or refused
  with ``iupac="error"``. The default is ``n`` because reference genomes carry
  a few such codes (GRCh38 does) and the models' one-hot encoders read any
  non-ACGT base as the all-zero column, which is what N is here.
* A narrowPeak file (BED with exactly 10 columns) centres each window on the
  summit, ``start + column 10``, where column 10 is not ``-1``; other BED lines
  centre on the middle of the interval.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xarray as xr

from deepmr_dist.errors import InputError

ALPHABET = "ACGT"
N_CODE = 4
IUPAC_CODES = "RYKMSWBDHV"
"""The IUPAC ambiguity codes besides N (two or three possible bases)."""
IUPAC_MODES = ("n", "error")
"""What :func:`encode` does with an IUPAC code: read it as N, or refuse it."""
DEFAULT_IUPAC = "n"
"""IUPAC codes are read as N unless refused (see the module docstring for why)."""

_INVALID = -1
_AMBIGUOUS = -2
_GZIP_MAGIC = b"\x1f\x8b"
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
_LISTED_RECORDS = 10
"""Records named one by one in the warning about IUPAC codes read as N."""
_NARROWPEAK_COLUMNS = 10

_LOOKUP = np.full(256, _INVALID, dtype=np.int8)
for _code, _base in enumerate(ALPHABET + "N"):
    _LOOKUP[ord(_base)] = _code
    _LOOKUP[ord(_base.lower())] = _code
for _base in IUPAC_CODES:
    _LOOKUP[ord(_base)] = _LOOKUP[ord(_base.lower())] = _AMBIGUOUS

log = logging.getLogger(__name__)


def check_iupac(mode: str) -> str:
    """``mode`` if it is one of :data:`IUPAC_MODES`.

    Raises
    ------
    InputError
        Naming the valid modes.
    """
    if mode not in IUPAC_MODES:
        raise InputError(f"iupac must be one of {', '.join(IUPAC_MODES)}, got {mode!r}")
    return mode


def _encode(sequence: str, name: str, source: str | None, iupac: str) -> tuple[np.ndarray, int]:
    """Base codes of ``sequence`` and how many IUPAC codes were read as N (see :func:`encode`)."""
    raw = np.frombuffer(sequence.encode("ascii", errors="replace"), dtype=np.uint8)
    codes = _LOOKUP[raw]
    where = f" in {source}" if source else ""
    bad = np.flatnonzero(codes == _INVALID)
    if bad.size:
        pos = int(bad[0])
        raise InputError(
            f"record {name!r}{where}: invalid base {sequence[pos]!r} at position {pos + 1} "
            f"({bad.size} invalid character(s); only A, C, G, T, N and the IUPAC codes {IUPAC_CODES} are allowed)"
        )
    ambiguous = np.flatnonzero(codes == _AMBIGUOUS)
    if ambiguous.size and check_iupac(iupac) == "error":
        pos = int(ambiguous[0])
        raise InputError(
            f"record {name!r}{where}: IUPAC code {sequence[pos]!r} at position {pos + 1} ({ambiguous.size} IUPAC "
            f"code(s); refused by iupac 'error', read as N with iupac 'n')"
        )
    codes[ambiguous] = N_CODE
    return codes, int(ambiguous.size)


def encode(sequence: str, *, name: str = "sequence", source: str | None = None, iupac: str = DEFAULT_IUPAC) -> np.ndarray:
    """Encode a DNA string as int8 base codes (case-insensitive; N = 4).

    Parameters
    ----------
    sequence
        Bases, upper or lower case.
    name, source
        The record and file named in an error.
    iupac
        ``"n"``: read the IUPAC codes R, Y, K, M, S, W, B, D, H, V as N; ``"error"``: refuse them.

    Raises
    ------
    InputError
        On any other character (or an IUPAC code with ``iupac="error"``), naming the record and the
        1-based position.
    """
    return _encode(sequence, name, source, iupac)[0]


def _warn_iupac(source: str, counts: dict[str, int]) -> None:
    """One warning counting the IUPAC codes read as N in each record of ``source`` (none: no warning)."""
    if not counts:
        return
    listed = ", ".join(f"{name!r} {n}" for name, n in list(counts.items())[:_LISTED_RECORDS])
    more = f" and {len(counts) - _LISTED_RECORDS} more record(s)" if len(counts) > _LISTED_RECORDS else ""
    log.warning(
        "%s: %d IUPAC code(s) read as N in %d record(s): %s%s", source, sum(counts.values()), len(counts), listed, more
    )


def _text_lines(path: Path, what: str) -> Iterator[tuple[int, str]]:
    """The lines of a text file, plain or gzip/BGZF-compressed (told by its first bytes), numbered from 1.

    Raises
    ------
    InputError
        If the file is not text (a NUL byte, or bytes that are not UTF-8) or its gzip data is damaged,
        naming the file and the line after which the fault lies.
    """
    with path.open("rb") as raw:
        compressed = raw.read(len(_GZIP_MAGIC)) == _GZIP_MAGIC
    opener = gzip.open if compressed else open
    lineno = 0
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if "\x00" in line:
                    raise InputError(f"{path}:{lineno}: a NUL byte: this is a binary file, not a {what}")
                yield lineno, line
    except UnicodeDecodeError as error:
        after = f"after line {lineno}" if lineno else "at the start"
        raise InputError(
            f"{path}: not a {what}: byte 0x{error.object[error.start]:02x} {after} is not text "
            f"(expected a text {what}, plain or gzip/bgzip-compressed)"
        ) from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise InputError(f"{path}: damaged gzip data after line {lineno}: {error}") from None


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


def read_fasta(path: str | Path, *, iupac: str = DEFAULT_IUPAC) -> xr.Dataset:
    """Load a FASTA file of equal-length records, one locus per record.

    Parameters
    ----------
    path
        Plain text or gzip/BGZF-compressed.
    iupac
        ``"n"`` or ``"error"`` (see :func:`encode`); IUPAC codes read as N are counted per record in one warning.

    Raises
    ------
    InputError
        For a missing, empty or binary file, unequal record lengths, or invalid characters.
    """
    check_iupac(iupac)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"FASTA file {path} does not exist")
    names: list[str] = []
    chunks: list[list[str]] = []
    for lineno, line in _text_lines(path, "FASTA file"):
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
    encoded = [_encode(s, n, str(path), iupac) for n, s in zip(names, seqs)]
    _warn_iupac(str(path), {n: k for n, (_, k) in zip(names, encoded) if k})
    return sequences_dataset(np.stack([codes for codes, _ in encoded]), names)


def _summit(fields: list[str], start: int, end: int, where: str) -> int | None:
    """The narrowPeak summit offset (column 10) of a 10-column BED line, or None (other lines, or -1: none called)."""
    if len(fields) != _NARROWPEAK_COLUMNS:
        return None
    try:
        summit = int(fields[9])
    except ValueError:
        raise InputError(f"{where}: the narrowPeak summit (column 10) must be an integer, got {fields[9]!r}") from None
    if summit == -1:
        return None
    if not 0 <= summit < end - start:
        raise InputError(
            f"{where}: the narrowPeak summit offset {summit} (column 10) lies outside the peak's {end - start} bp"
        )
    return summit


def read_bed(path: str | Path) -> pd.DataFrame:
    """Read a BED file (plain or gzip-compressed): chrom, start, end, the name (column 4), the narrowPeak summit.

    Returns
    -------
    pandas.DataFrame
        Columns chrom, start, end, name (None where absent or "."), summit (the offset from start in
        column 10 of a 10-column narrowPeak line, else -1) and line (the 1-based line number).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"BED file {path} does not exist")
    rows = []
    for lineno, line in _text_lines(path, "BED file"):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        fields = line.rstrip("\r\n").split("\t")
        if len(fields) < 3:
            raise InputError(f"{path}:{lineno}: a BED line needs at least 3 tab-separated columns")
        try:
            start, end = int(fields[1]), int(fields[2])
        except ValueError:
            raise InputError(f"{path}:{lineno}: start and end must be integers, got {fields[1]!r}, {fields[2]!r}") from None
        if start < 0 or end < start:
            raise InputError(f"{path}:{lineno}: invalid interval {fields[0]}:{start}-{end}")
        name = fields[3] if len(fields) > 3 and fields[3] not in ("", ".") else None
        summit = _summit(fields, start, end, f"{path}:{lineno}")
        rows.append((fields[0], start, end, name, -1 if summit is None else summit, lineno))
    if not rows:
        raise InputError(f"BED file {path} contains no intervals")
    return pd.DataFrame(rows, columns=["chrom", "start", "end", "name", "summit", "line"])


def read_bed_regions(bed: str | Path, genome: str | Path, width: int, *, iupac: str = DEFAULT_IUPAC) -> xr.Dataset:
    """Load fixed-width windows centred on BED intervals from a genome FASTA (via pyfaidx).

    Each locus is ``[centre - width // 2, centre - width // 2 + width)`` with
    ``centre = start + summit`` on a narrowPeak line with a summit (column 10),
    else ``centre = (start + end) // 2``. Locus ids are the BED name column,
    else ``chrom:start-end`` of the window. The genome is plain or BGZF
    (``bgzip``) FASTA; pyfaidx writes its ``.fai`` (and ``.gzi``) index beside it.

    Parameters
    ----------
    iupac
        ``"n"`` or ``"error"`` (see :func:`encode`).

    Raises
    ------
    InputError
        For an unknown chromosome or a window past the chromosome's ends, naming the BED line; for a
        genome that cannot be indexed (plain gzip among others), naming it.
    """
    import pyfaidx

    check_iupac(iupac)
    if width <= 0:
        raise InputError(f"--width must be positive, got {width}")
    regions = read_bed(bed)
    genome = Path(genome)
    if not genome.is_file():
        raise InputError(f"genome FASTA {genome} does not exist")
    try:
        fasta = pyfaidx.Fasta(str(genome), sequence_always_upper=True, as_raw=True)
    except (pyfaidx.FastaIndexingError, ValueError, OSError) as exc:  # OSError: pyfaidx's UnsupportedCompressionFormat
        raise InputError(f"genome FASTA {genome} cannot be indexed: {exc}") from None
    summits = regions["summit"]
    centres = np.where(summits >= 0, regions["start"] + summits, (regions["start"] + regions["end"]) // 2)
    starts = pd.Series(centres - width // 2, index=regions.index)
    ends = starts + width
    counts: dict[str, int] = {}
    with fasta:
        codes = np.empty((len(regions), width), dtype=np.int8)
        for i, (chrom, s, e, line) in enumerate(zip(regions["chrom"], starts, ends, regions["line"])):
            if chrom not in fasta:
                raise InputError(f"{bed}:{line}: chromosome {chrom!r} is not in the genome {genome}")
            size = len(fasta[chrom])
            if s < 0 or e > size:
                raise InputError(
                    f"{bed}:{line}: the {width} bp window {chrom}:{s}-{e} runs past the end of {chrom} (0-{size})"
                )
            window = f"{chrom}:{s}-{e}"
            codes[i], counts[window] = _encode(fasta[chrom][int(s) : int(e)], window, str(genome), iupac)
    _warn_iupac(str(genome), {window: n for window, n in counts.items() if n})
    if (summits >= 0).any():
        log.info("%s: %d of %d window(s) centred on narrowPeak summits", bed, int((summits >= 0).sum()), len(regions))
    intervals = pd.DataFrame({"chrom": regions["chrom"], "start": starts, "end": ends})
    ids = [n if isinstance(n, str) else f"{c}:{s}-{e}" for n, c, s, e in zip(regions["name"], regions["chrom"], starts, ends)]
    return sequences_dataset(codes, ids, intervals=intervals)


def read_onehot(path: str | Path) -> xr.Dataset:
    """Load a one-hot ``.npy`` array (n_loci, 4, length) in A, C, G, T order; all-zero columns are N.

    Raises
    ------
    InputError
        For a file that is not one ``.npy`` array (an ``.npz`` archive is named as such, with its arrays),
        or an array of another shape or with values other than 0/1.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"one-hot file {path} does not exist")
    with path.open("rb") as raw:
        magic = raw.read(len(_NPY_MAGIC))
    if magic.startswith(_ZIP_MAGIC):
        try:
            with np.load(path, allow_pickle=False) as archive:
                names = ", ".join(archive.files) or "none"
        except (ValueError, OSError, EOFError):
            names = "unreadable"
        raise InputError(
            f"{path} is a zip archive (.npz, arrays: {names}), not a .npy array; expected one one-hot array "
            f"(n_loci, 4, length) saved with numpy.save"
        )
    if magic != _NPY_MAGIC:
        raise InputError(f"{path} is not a .npy file (no NumPy header); expected a one-hot array saved with numpy.save")
    try:
        x = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(f"{path} is not a numeric .npy array: {exc}") from None
    if x.dtype.kind not in "biuf":
        raise InputError(f"{path}: expected a numeric one-hot array, got dtype {x.dtype}")
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
