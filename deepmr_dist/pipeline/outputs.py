"""What a pipeline writes beside its store: where (:class:`Outputs`, :func:`output_location`) and the local and global CE tables.

The tables' columns are named as ``deepmr mr`` / ``deepmr meta`` name them,
from the schema's registry.
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
"""mr variable -> column of ``local_ce.csv`` (:func:`deepmr_dist.schema.table_columns`)."""
GLOBAL_COLUMNS = schema.table_columns(schema.META)
"""meta variable -> column of ``global_ce.csv``."""


def local_table_from(local: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, locus, method): ``pair, exposure, outcome``, then ``deepmr mr``'s columns (the registry's)."""
    frame = local[list(LOCAL_COLUMNS)].reset_coords(["exposure", "outcome"]).to_dataframe().reset_index()
    frame = frame.rename(columns=LOCAL_COLUMNS)
    return frame[["pair", "exposure", "outcome", "locus", "method", *LOCAL_COLUMNS.values()]]


def global_table_from(global_: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, method), columns named as ``deepmr meta`` writes them."""
    frame = global_[list(GLOBAL_COLUMNS)].reset_coords(["exposure", "outcome"]).to_dataframe().reset_index()
    frame = frame.rename(columns=GLOBAL_COLUMNS)
    return frame[["pair", "exposure", "outcome", "method", *GLOBAL_COLUMNS.values()]]


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
    """``stem.csv`` (NaN spelled :data:`deepmr_dist.schema.TABLE_NA`) and ``stem.parquet`` in ``outputs``, each written whole.

    See :meth:`Outputs.write_bytes`.
    """
    outputs.write_bytes(f"{stem}.csv", table.to_csv(index=False, na_rep=schema.TABLE_NA).encode())
    buffer = io.BytesIO()
    table.to_parquet(buffer, index=False)
    outputs.write_bytes(f"{stem}.parquet", buffer.getvalue())
