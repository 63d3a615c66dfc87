"""What a pipeline writes beside its store: where (:class:`Outputs`, :func:`output_location`) and the local and global CE tables.

One column set: the local table is ``pair, exposure, outcome``, then exactly
``deepmr mr``'s columns (:data:`LOCAL_COLUMNS`, from the schema's registry);
the global table is ``pair, exposure, outcome`` (the pair is ``deepmr meta``'s
group), then exactly ``deepmr meta``'s columns after its ``group``
(:data:`GLOBAL_COLUMNS`), then the store's dilution summary
(:data:`GLOBAL_EXTRA_COLUMNS`), which ``deepmr meta`` cannot compute. One NA
spelling: every table is written through :func:`with_missing_text`, so a
missing number and an empty code (``reason``, ``note``: there is none) are
both :data:`deepmr_dist.schema.TABLE_NA` in CSV/TSV and null in Parquet.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import xarray as xr
from fsspec.implementations.local import LocalFileSystem

from deepmr_dist import schema
from deepmr_dist.errors import StoreError
from deepmr_dist.io.location import filesystem, is_local, normalize, sibling
from deepmr_dist.pipeline.config import PipelineConfig

LOCAL_COLUMNS = schema.table_columns(schema.MR)
"""mr variable -> column of ``local_ce.csv``: ``deepmr mr``'s columns after ``locus, method`` (:func:`deepmr_dist.schema.table_columns`)."""
GLOBAL_COLUMNS: dict[str, str] = {
    **{v.name: v.field for v in schema.variables_of(schema.META) if v.field},
    "n_loci_undefined": "n_excluded",  # the loci left out as invalid: deepmr meta's rows left out as invalid
}
"""meta variable -> column of ``global_ce.csv``: ``deepmr meta``'s columns after ``group, method``, in its order
(the kernel's result fields in registry order, then ``n_excluded``)."""
GLOBAL_EXTRA_COLUMNS: dict[str, str] = {
    v.name: v.name for v in schema.variables_of(schema.META) if v.name not in GLOBAL_COLUMNS
}
"""meta variables only a run store has (the dilution summary), the last columns of ``global_ce.csv``."""


def with_missing_text(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with its text columns as pandas strings and every empty cell missing (written :data:`deepmr_dist.schema.TABLE_NA`).

    An empty ``reason`` means the estimate is defined, an empty ``note`` that
    there is no caveat: there is no code, and a missing code is spelled as a
    missing number is. In Parquet a missing code is a null of a string column
    (also where a column has no code at all).
    """
    text = [c for c in frame.columns if pd.api.types.is_object_dtype(frame[c]) or pd.api.types.is_string_dtype(frame[c])]
    return frame.assign(**{c: frame[c].mask(frame[c] == "").astype(pd.StringDtype()) for c in text})


def _table(ds: xr.Dataset, ids: list[str], columns: dict[str, str]) -> pd.DataFrame:
    """``ds``'s variables as columns named ``columns`` after ``ids``; a variable an older store lacks is all missing."""
    frame = ds[[name for name in columns if name in ds]].reset_coords(["exposure", "outcome"]).to_dataframe().reset_index()
    return with_missing_text(frame.rename(columns=columns).reindex(columns=[*ids, *columns.values()]))


def local_table_from(local: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, locus, method): ``pair, exposure, outcome``, then exactly ``deepmr mr``'s columns."""
    return _table(local, ["pair", "exposure", "outcome", "locus", "method"], LOCAL_COLUMNS)


def global_table_from(global_: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, method): ``pair, exposure, outcome``, ``deepmr meta``'s columns after its group, the dilution summary."""
    return _table(global_, ["pair", "exposure", "outcome", "method"], {**GLOBAL_COLUMNS, **GLOBAL_EXTRA_COLUMNS})


@dataclass(frozen=True)
class Outputs:
    """A folder or fsspec URL beside the store that a run writes its files into, through fsspec.

    Attributes
    ----------
    location : str
        A local path or an fsspec URL (``s3://bucket/run``).
    storage_options : dict or None
        fsspec options of a remote ``location``.
    """

    location: str
    storage_options: Mapping[str, Any] | None = None

    @property
    def local(self) -> Path | None:
        """The local folder, or None for a remote location."""
        return Path(self.location) if is_local(self.location) else None

    def url(self, name: str) -> str:
        """The path or URL of file ``name`` (``members/member-0.pt``) in the location."""
        return f"{self.location.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        fs, root = filesystem(self.location, self.storage_options)
        return fs.exists(f"{root}/{name}")

    def read_bytes(self, name: str) -> bytes:
        fs, root = filesystem(self.location, self.storage_options)
        return fs.cat_file(f"{root}/{name}")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write file ``name``: locally to a temporary name, then moved into place; elsewhere in one put (atomic on object stores).

        Raises
        ------
        StoreError
            If the filesystem refuses the write.
        """
        fs, root = filesystem(self.location, self.storage_options)
        final = f"{root}/{name}"
        try:
            fs.makedirs(final.rpartition("/")[0], exist_ok=True)
            if isinstance(fs, LocalFileSystem):
                partial = f"{final}.partial-{uuid.uuid4().hex[:8]}"
                with open(partial, "wb") as f:
                    f.write(data)
                os.replace(partial, final)
            else:
                fs.pipe_file(final, data)
        except OSError as exc:
            raise StoreError(f"cannot write {self.url(name)}: {exc.strerror or exc}") from None


def output_location(config: PipelineConfig) -> Outputs:
    """``config.outputs``, or the store's path without its suffix on the same filesystem (:func:`deepmr_dist.io.location.sibling`)."""
    location = config.outputs if config.outputs is not None else sibling(config.store)
    return Outputs(*normalize(location, config.storage_options))


def write_table(table: pd.DataFrame, outputs: Outputs, stem: str) -> None:
    """``stem.csv`` (a missing number or code spelled :data:`deepmr_dist.schema.TABLE_NA`) and ``stem.parquet`` in ``outputs``.

    Each is written whole (see :meth:`Outputs.write_bytes`); text cells go through :func:`with_missing_text`.
    """
    table = with_missing_text(table)
    outputs.write_bytes(f"{stem}.csv", table.to_csv(index=False, na_rep=schema.TABLE_NA).encode())
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    outputs.write_bytes(f"{stem}.parquet", buffer.getvalue())
