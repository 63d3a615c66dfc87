"""Tabular input and output of summary statistics (CSV or Parquet), with validation.

Long tables (one row per instrument or study) are read, validated row by row,
and turned into the NaN-padded ``(n_ids, max_k)`` arrays the kernels take:

* ``deepmr mr`` input: columns ``locus, bx, bxse, by, byse`` (:func:`read_mr_table`), or
  TwoSampleMR's harmonised data (``SNP, beta.exposure, se.exposure, beta.outcome,
  se.outcome``; detected from the header): each ``id.exposure, id.outcome`` pair is one
  "locus" ``EXPOSURE->OUTCOME`` (one locus ``all`` without those columns), and rows whose
  ``mr_keep`` is false are excluded, as TwoSampleMR's ``mr()`` leaves them out.
* ``deepmr meta`` input: columns ``[group,] estimate, se`` (:func:`read_meta_table`);
  without a ``group`` column every row belongs to the group ``"all"``.

Nothing is dropped silently. A data row is *excluded* when one of its values
is missing, not a number, not finite, or (for a standard-error column) not
positive. Excluded rows are counted per locus/group in
:attr:`PaddedTable.n_excluded` (written as the ``n_excluded`` column of every
output table), the first few are described in :attr:`PaddedTable.issues` (file,
1-based data row, id, problem) and :func:`exclusion_message` formats them for
stderr. A locus whose rows are all excluded stays in the output (with ``n = 0``
and the kernel's reason). Structural faults raise
:class:`deepmr_dist.errors.InputError`: an unreadable file, an unsupported
suffix, missing required columns, no data rows, or a row without an id.

Duplicated rows: a valid row *duplicates* an earlier valid one with the same id and
the same values, or the same id and the same row key (the ``SNP`` column of an MR
table, the ``study`` column of a meta table, where there is one). ``duplicates=``
(``deepmr mr/meta --duplicates``) decides: ``"error"`` (default) raises naming the
first duplicate, ``"keep"`` uses every row, ``"drop"`` keeps the first of each set;
both count them in :attr:`PaddedTable.n_duplicates` (:func:`duplicate_message`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from deepmr_dist import schema
from deepmr_dist.errors import InputError
from deepmr_dist.io.location import is_local, normalize

__all__ = [
    "DUPLICATE_POLICIES",
    "MAX_ISSUES",
    "META_COLUMNS_IN",
    "MR_COLUMNS_IN",
    "PaddedTable",
    "RowIssue",
    "duplicate_message",
    "exclusion_message",
    "pad_long_table",
    "read_meta_table",
    "read_mr_table",
    "read_table",
    "table_format",
    "write_table",
]

MR_COLUMNS_IN: tuple[str, ...] = ("locus", "bx", "bxse", "by", "byse")
"""Required columns of ``deepmr mr`` input (``locus`` is the id column)."""

META_COLUMNS_IN: tuple[str, ...] = ("group", "estimate", "se")
"""Columns of ``deepmr meta`` input; ``group`` is optional."""

TWOSAMPLEMR_COLUMNS: dict[str, str] = {
    "beta.exposure": "bx", "se.exposure": "bxse", "beta.outcome": "by", "se.outcome": "byse",
}  # fmt: skip
"""TwoSampleMR's harmonised columns (``harmonise_data``) -> ``deepmr mr``'s; with ``SNP`` they mark the layout."""
TWOSAMPLEMR_PAIR = ("id.exposure", "id.outcome")
"""TwoSampleMR columns whose pair of values names one MR analysis (the locus ``EXPOSURE->OUTCOME``)."""
MR_KEY = "SNP"
"""Row key of an MR table (optional; TwoSampleMR's instrument id)."""
META_KEY = "study"
"""Row key of a meta table (optional)."""
DUPLICATE_POLICIES: tuple[str, ...] = ("error", "keep", "drop")
"""What to do with duplicated rows; the first is the default."""

META_DEFAULT_GROUP = "all"
MAX_ISSUES = 20
"""How many excluded rows are described in :attr:`PaddedTable.issues` (all are counted)."""

_SUFFIXES = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".txt": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_NA_TOKENS = frozenset({"", "na", "nan", "null", "none", "n/a", "-nan", "<na>"})


@dataclass(frozen=True)
class RowIssue:
    """One excluded input row.

    Attributes
    ----------
    row : int
        1-based data row (the header is not counted).
    id : str
        Locus or group of the row.
    problem : str
        What is wrong, naming the column and the value.
    """

    row: int
    id: str
    problem: str

    def __str__(self) -> str:
        return f"row {self.row} ({self.id}): {self.problem}"


@dataclass(frozen=True)
class PaddedTable:
    """A validated long table as padded arrays, ids in first-appearance order.

    Attributes
    ----------
    source : str
        File (or label) the table came from, used in messages.
    id_column : str
        Name of the id column (``locus`` or ``group``).
    ids : list of str
        One id per row of the arrays, in order of first appearance in the file.
    values : dict of str to ndarray
        One float64 array ``(n_ids, max_k)`` per value column, NaN-padded; only
        valid rows are filled, in file order within each id.
    n_valid, n_excluded : ndarray of int64, shape (n_ids,)
        Valid (used) and excluded data rows per id.
    issues : tuple of RowIssue
        The first :data:`MAX_ISSUES` excluded rows, in file order.
    n_duplicates : int
        Valid rows that duplicate an earlier one (kept or dropped, see ``duplicates``).
    first_duplicate : RowIssue or None
        The first of them, naming the row it duplicates.
    duplicates : str
        The policy applied, one of :data:`DUPLICATE_POLICIES`.
    """

    source: str
    id_column: str
    ids: list[str]
    values: dict[str, np.ndarray] = field(repr=False)
    n_valid: np.ndarray
    n_excluded: np.ndarray
    issues: tuple[RowIssue, ...] = ()
    n_duplicates: int = 0
    first_duplicate: RowIssue | None = None
    duplicates: str = DUPLICATE_POLICIES[0]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.values[name]

    @property
    def total_excluded(self) -> int:
        """Number of excluded data rows in the whole table."""
        return int(self.n_excluded.sum())

    def exclusion_frame(self) -> pd.DataFrame:
        """Return ``<id_column>, n_excluded`` with one row per id (for merging into results)."""
        return pd.DataFrame({self.id_column: self.ids, "n_excluded": self.n_excluded})


# --------------------------------------------------------------------------- file I/O


def table_format(path: str | Path) -> str:
    """Return ``"csv"``, ``"tsv"`` or ``"parquet"`` from the file name's suffix.

    Raises
    ------
    InputError
        The suffix is none of ``.csv, .csv.gz, .tsv, .tsv.gz, .txt, .parquet, .pq``.
    """
    name = str(path).lower()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    raise InputError(
        f"{path}: unsupported table type; use one of {', '.join(sorted(_SUFFIXES))} "
        "(CSV/TSV text or Parquet)"
    )


def read_table(path: str | Path, storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Read a CSV/TSV (every column as text, nothing parsed as missing) or Parquet file, local or at an fsspec URL.

    Text tables keep every cell as a string so that validation can tell a
    missing value from a non-numeric one and can quote the offending text.

    Parameters
    ----------
    path : str or Path
        A local path, or an fsspec URL (``s3://bucket/sumstats.csv``).
    storage_options : mapping, optional
        fsspec options of a URL (ignored for a local path).

    Raises
    ------
    InputError
        Unsupported suffix, missing or unreadable file.
    """
    fmt = table_format(path)
    source, options = normalize(str(path), storage_options)
    try:
        if fmt == "parquet":
            return pd.read_parquet(source, storage_options=options)
        return pd.read_csv(
            source,
            sep="," if fmt == "csv" else "\t",
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skipinitialspace=True,
            storage_options=options,
        )
    except FileNotFoundError as exc:
        raise InputError(f"{path}: file not found") from exc
    except pd.errors.EmptyDataError as exc:
        raise InputError(f"{path}: file is empty (no header row)") from exc
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise InputError(f"{path}: cannot read as {fmt}: {exc}") from exc
    except Exception as exc:  # pyarrow raises its own error types for corrupt Parquet
        if type(exc).__module__.startswith("pyarrow"):
            raise InputError(f"{path}: cannot read as {fmt}: {exc}") from exc
        raise


def write_table(frame: pd.DataFrame, path: str | Path, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``frame`` as CSV/TSV (NaN spelled :data:`deepmr_dist.schema.TABLE_NA`) or Parquet by suffix.

    A local path gets its parent folders created; an fsspec URL
    (``s3://bucket/out.csv``) is written through fsspec with ``storage_options``.

    Raises
    ------
    InputError
        Unsupported suffix or the file cannot be written.
    """
    fmt = table_format(path)
    target, options = normalize(str(path), storage_options)
    try:
        if is_local(target):
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        if fmt == "parquet":
            frame.to_parquet(target, index=False, storage_options=options)
        else:
            frame.to_csv(target, sep="," if fmt == "csv" else "\t", index=False, na_rep=schema.TABLE_NA,
                         storage_options=options)  # fmt: skip
    except OSError as exc:
        raise InputError(f"{path}: cannot write output: {exc}") from exc


# --------------------------------------------------------------------------- validation


def _require_columns(frame: pd.DataFrame, required: Sequence[str], source: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        raise InputError(
            f"{source}: missing required column(s) {', '.join(missing)} (found: {found})"
        )


def _parse_numeric(column: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(values, missing, non_numeric)`` for one column (text or numeric dtype)."""
    if pd.api.types.is_bool_dtype(column.dtype):
        values = np.full(len(column), np.nan)
        return values, np.zeros(len(column), bool), np.ones(len(column), bool)
    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.isnan(values), np.zeros(len(column), bool)
    text = column.astype(object).where(column.notna(), "").map(lambda x: str(x).strip())
    missing = text.str.lower().isin(_NA_TOKENS).to_numpy()
    values = pd.to_numeric(text.where(~missing, None), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    non_numeric = np.isnan(values) & ~missing
    return values, missing, non_numeric


def _ids(frame: pd.DataFrame, id_column: str | None, default_id: str, source: str) -> np.ndarray:
    if id_column is None or id_column not in frame.columns:
        return np.full(len(frame), default_id, dtype=object)
    text = _text(frame[id_column])
    empty = np.flatnonzero(text == "")
    if empty.size:
        rows = ", ".join(str(i + 1) for i in empty[:5]) + (", ..." if empty.size > 5 else "")
        raise InputError(
            f"{source}: {empty.size} row(s) without a {id_column} (data row(s) {rows}); "
            f"every row needs a {id_column} id"
        )
    return text


def _row_problems(
    frame: pd.DataFrame,
    value_columns: Sequence[str],
    se_columns: Sequence[str],
) -> tuple[dict[str, np.ndarray], np.ndarray, list[tuple[str, np.ndarray, str]]]:
    """Parse the value columns; return values, the row-is-bad mask and the per-check masks."""
    values: dict[str, np.ndarray] = {}
    checks: list[tuple[str, np.ndarray, str]] = []
    bad = np.zeros(len(frame), dtype=bool)
    for name in value_columns:
        vals, missing, non_numeric = _parse_numeric(frame[name])
        values[name] = vals
        with np.errstate(invalid="ignore"):
            nonfinite = ~missing & ~non_numeric & ~np.isfinite(vals)
            nonpos = np.isfinite(vals) & (vals <= 0) if name in se_columns else np.zeros_like(bad)
        checks += [
            (name, missing, "missing value in column {col}"),
            (name, non_numeric, "non-numeric value {raw!r} in column {col}"),
            (name, nonfinite, "non-finite value {raw} in column {col}"),
            (name, nonpos, "standard error {col} = {raw} is not positive"),
        ]
        bad |= missing | non_numeric | nonfinite | nonpos
    return values, bad, checks


def _describe(
    frame: pd.DataFrame, ids: np.ndarray, bad: np.ndarray, checks: list, limit: int
) -> tuple[RowIssue, ...]:
    issues = []
    for i in np.flatnonzero(bad)[:limit]:
        problems = [
            template.format(col=col, raw=str(frame[col].iloc[i]).strip())
            for col, mask, template in checks
            if mask[i]
        ]
        issues.append(RowIssue(row=int(i) + 1, id=str(ids[i]), problem="; ".join(problems)))
    return tuple(issues)


def pad_long_table(
    frame: pd.DataFrame,
    *,
    id_column: str | None,
    value_columns: Sequence[str],
    se_columns: Sequence[str] = (),
    source: str = "<table>",
    default_id: str = META_DEFAULT_GROUP,
    key_column: str | None = None,
    duplicates: str = DUPLICATE_POLICIES[0],
    flags: Sequence[tuple[str, np.ndarray, str]] = (),
) -> PaddedTable:
    """Validate a long table and pad it to ``(n_ids, max_k)`` arrays.

    Parameters
    ----------
    frame : DataFrame
        One row per instrument or study. Text columns are parsed here.
    id_column : str or None
        Column holding the locus/group id; ``None`` or absent: every row has
        ``default_id``.
    value_columns : sequence of str
        Required numeric columns.
    se_columns : sequence of str
        Those of ``value_columns`` that are standard errors (must be > 0).
    source : str
        Name of the input used in messages (the file path).
    default_id : str
        Id used when there is no id column.
    key_column : str, optional
        Column of a row key (``SNP``, ``study``): a second row with the same id and key is a duplicate
        (ignored where the frame lacks the column).
    duplicates : {"error", "keep", "drop"}
        Duplicated valid rows (same id and values, or same id and key): raise naming the first,
        use them all, or keep the first of each set. Counted in the result either way.
    flags : sequence of (column, mask, template)
        Further exclusions: rows where ``mask`` holds are excluded, described by ``template``
        (``{col}`` and ``{raw}`` are filled in).

    Returns
    -------
    PaddedTable

    Raises
    ------
    InputError
        Missing columns, no data rows, rows without an id, an unknown ``duplicates`` policy,
        or (``duplicates="error"``) a duplicated row.
    """
    if duplicates not in DUPLICATE_POLICIES:
        raise InputError(f"duplicates must be one of {', '.join(DUPLICATE_POLICIES)}, got {duplicates!r}")
    required = ([id_column] if id_column else []) + list(value_columns)
    _require_columns(frame, required, source)
    if len(frame) == 0:
        raise InputError(f"{source}: no data rows (only a header)")
    ids = _ids(frame, id_column, default_id, source)
    values, bad, checks = _row_problems(frame, value_columns, se_columns)
    for check in flags:
        checks.append(check)
        bad = bad | check[1]
    codes, uniques = pd.factorize(ids, sort=False)
    n_ids = len(uniques)
    key = key_column if key_column in frame.columns else None
    dup, first, what = _duplicated(frame, ids, values, ~bad, key, value_columns, id_column or "group")
    first_duplicate = None
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first_duplicate = RowIssue(row=i + 1, id=str(ids[i]), problem=f"duplicates data row {first[i] + 1} ({what[i]})")
        if duplicates == "error":
            raise InputError(
                f"{source}: data row {i + 1} ({id_column or 'group'} {ids[i]}) duplicates data row {first[i] + 1} "
                f"({what[i]}); {int(dup.sum())} duplicated row(s) in all; --duplicates keep or drop accepts them"
            )
    good = ~bad & ~(dup if duplicates == "drop" else np.zeros_like(dup))
    n_valid = np.bincount(codes[good], minlength=n_ids).astype(np.int64)
    n_excluded = np.bincount(codes[bad], minlength=n_ids).astype(np.int64)
    width = max(int(n_valid.max(initial=0)), 1)
    slot = pd.Series(codes[good]).groupby(codes[good]).cumcount().to_numpy()
    padded = {}
    for name in value_columns:
        arr = np.full((n_ids, width), np.nan)
        arr[codes[good], slot] = values[name][good]
        padded[name] = arr
    return PaddedTable(
        source=source,
        id_column=id_column or "group",
        ids=[str(u) for u in uniques],
        values=padded,
        n_valid=n_valid,
        n_excluded=n_excluded,
        issues=_describe(frame, ids, bad, checks, MAX_ISSUES),
        n_duplicates=int(dup.sum()),
        first_duplicate=first_duplicate,
        duplicates=duplicates,
    )


def _text(column: pd.Series) -> np.ndarray:
    """A column as stripped strings (missing values as ``""``)."""
    return column.astype(object).where(column.notna(), "").map(lambda x: str(x).strip()).to_numpy(dtype=object)


def _duplicated(
    frame: pd.DataFrame,
    ids: np.ndarray,
    values: dict[str, np.ndarray],
    valid: np.ndarray,
    key_column: str | None,
    value_columns: Sequence[str],
    id_name: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Valid rows that repeat an earlier valid row's id and values, or its id and key.

    Returns
    -------
    duplicate : ndarray of bool
        Per row.
    first : ndarray of int64
        Per row, the 0-based row it repeats (-1 where it is no duplicate).
    what : ndarray of str
        Per row, what is the same (``"same locus and values"``, ``"same locus and SNP"``).
    """
    n = len(frame)
    duplicate = np.zeros(n, dtype=bool)
    first = np.full(n, -1, dtype=np.int64)
    what = np.full(n, "", dtype=object)
    rows = np.flatnonzero(valid)
    candidates = [({c: values[c][rows] for c in value_columns}, f"same {id_name} and values")]
    if key_column is not None:
        candidates.append(({"key": _text(frame[key_column])[rows]}, f"same {id_name} and {key_column}"))
    for columns, label in candidates:
        keys = pd.DataFrame({"_id": ids[rows], **columns})
        group = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy()
        first_of_group = pd.Series(rows).groupby(group).transform("first").to_numpy()
        repeat = (first_of_group != rows) & ~duplicate[rows]
        duplicate[rows[repeat]] = True
        first[rows[repeat]] = first_of_group[repeat]
        what[rows[repeat]] = label
    return duplicate, first, what


def is_twosamplemr(columns: Sequence[object]) -> bool:
    """True for TwoSampleMR's harmonised layout: ``SNP`` and its four effect columns, and no ``bx``."""
    names = set(map(str, columns))
    return {MR_KEY, *TWOSAMPLEMR_COLUMNS} <= names and "bx" not in names


def _from_twosamplemr(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, np.ndarray, str]]]:
    """TwoSampleMR's columns renamed to ``deepmr mr``'s, ``locus = id.exposure->id.outcome``, and the mr_keep flag.

    Without ``id.exposure``/``id.outcome`` (or a ``locus`` column) every row is in the locus ``all``.
    Returns the frame and the exclusion of rows whose ``mr_keep`` is false (``FALSE``, ``F``, ``0``).
    """
    frame = frame.rename(columns=TWOSAMPLEMR_COLUMNS)
    if all(c in frame.columns for c in TWOSAMPLEMR_PAIR):
        exposure, outcome = (_text(frame[c]) for c in TWOSAMPLEMR_PAIR)
        frame = frame.assign(locus=[f"{e}->{o}" if e and o else "" for e, o in zip(exposure, outcome, strict=True)])
    elif "locus" not in frame.columns:
        frame = frame.assign(locus=META_DEFAULT_GROUP)
    flags = []
    if "mr_keep" in frame.columns:
        dropped = np.isin(np.char.lower(_text(frame["mr_keep"]).astype(str)), ["false", "f", "0"])
        flags.append(("mr_keep", dropped, "mr_keep = {raw} (TwoSampleMR leaves the row out)"))
    return frame, flags


def read_mr_table(
    path: str | Path, *, duplicates: str = DUPLICATE_POLICIES[0], storage_options: Mapping[str, Any] | None = None
) -> PaddedTable:
    """Read and validate ``deepmr mr`` input: ``locus, bx, bxse, by, byse``, or TwoSampleMR's harmonised columns.

    Parameters
    ----------
    path : str or Path
        CSV/TSV or Parquet file, local or at an fsspec URL.
    duplicates : {"error", "keep", "drop"}
        Rows repeating a locus's values or its ``SNP`` (see :func:`pad_long_table`).
    storage_options : mapping, optional
        fsspec options of a URL (see :func:`read_table`).

    Returns
    -------
    PaddedTable
        ``ids`` are the loci; ``values`` holds ``bx, bxse, by, byse``.
    """
    frame = read_table(path, storage_options)
    flags: list[tuple[str, np.ndarray, str]] = []
    if is_twosamplemr(frame.columns):
        frame, flags = _from_twosamplemr(frame)
    return pad_long_table(
        frame,
        id_column="locus",
        value_columns=MR_COLUMNS_IN[1:],
        se_columns=("bxse", "byse"),
        source=str(path),
        key_column=MR_KEY,
        duplicates=duplicates,
        flags=flags,
    )


def read_meta_table(
    path: str | Path, *, duplicates: str = DUPLICATE_POLICIES[0], storage_options: Mapping[str, Any] | None = None
) -> PaddedTable:
    """Read and validate ``deepmr meta`` input (``[group,] estimate, se``, optional row key ``study``).

    Without a ``group`` column every row belongs to the group ``"all"``. ``path`` and
    ``storage_options`` as :func:`read_table` takes them.
    """
    frame = read_table(path, storage_options)
    return pad_long_table(
        frame,
        id_column="group" if "group" in frame.columns else None,
        value_columns=("estimate", "se"),
        se_columns=("se",),
        source=str(path),
        key_column=META_KEY,
        duplicates=duplicates,
    )


def exclusion_message(table: PaddedTable, limit: int = 5) -> str | None:
    """Describe the excluded rows in one line, or ``None`` when there are none."""
    total = table.total_excluded
    if total == 0:
        return None
    n_ids = int((table.n_excluded > 0).sum())
    shown = "; ".join(str(issue) for issue in table.issues[:limit])
    more = f"; ... and {total - min(limit, len(table.issues))} more" if total > limit else ""
    return (
        f"{table.source}: excluded {total} invalid row(s) in {n_ids} {table.id_column}(s) "
        f"(counted in column n_excluded): {shown}{more}"
    )


def duplicate_message(table: PaddedTable) -> str | None:
    """Describe the duplicated rows (kept or dropped) in one line, or ``None`` when there are none."""
    if table.n_duplicates == 0:
        return None
    done = "dropped (the first of each kept)" if table.duplicates == "drop" else "kept as separate rows"
    return f"{table.source}: {table.n_duplicates} duplicated row(s) {done}; the first: {table.first_duplicate}"
