"""What a pipeline writes beside its store: where (:func:`output_directory`) and the local and global CE tables.

The tables' columns are named as ``deepmr mr`` / ``deepmr meta`` name them,
from the schema's registry.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.pipeline.config import PipelineConfig

LOCAL_COLUMNS = schema.table_columns(schema.MR)
"""mr variable -> column of ``local_ce.csv`` (:func:`deepmr_dist.schema.table_columns`)."""
GLOBAL_COLUMNS = schema.table_columns(schema.META)
"""meta variable -> column of ``global_ce.csv``."""


def local_table_from(local: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, locus, method), columns named as ``deepmr mr`` writes them."""
    frame = local[list(LOCAL_COLUMNS)].reset_coords(["exposure", "outcome"]).to_dataframe().reset_index()
    frame = frame.rename(columns=LOCAL_COLUMNS)
    return frame[["pair", "exposure", "outcome", "locus", "method", "n", *[c for c in LOCAL_COLUMNS.values() if c != "n"]]]


def global_table_from(global_: xr.Dataset) -> pd.DataFrame:
    """One row per (pair, method), columns named as ``deepmr meta`` writes them."""
    frame = global_[list(GLOBAL_COLUMNS)].reset_coords(["exposure", "outcome"]).to_dataframe().reset_index()
    frame = frame.rename(columns=GLOBAL_COLUMNS)
    return frame[["pair", "exposure", "outcome", "method", *GLOBAL_COLUMNS.values()]]


def output_directory(config: PipelineConfig) -> Path:
    """``config.outputs``, or the store's path without its suffix: ``runs/name.zarr`` -> ``runs/name``."""
    if config.outputs is not None:
        return Path(config.outputs)
    path = Path(config.store.split("://", 1)[-1])
    return path.with_suffix("") if path.suffix else path.with_name(path.name + "-outputs")


def write_table(table: pd.DataFrame, stem: Path) -> None:
    """``stem.csv`` and ``stem.parquet``, each written to a temporary name first and then moved into place."""
    for suffix in ("csv", "parquet"):
        final = stem.with_name(f"{stem.name}.{suffix}")
        partial = final.with_name(final.name + ".partial")
        if suffix == "csv":
            table.to_csv(partial, index=False)
        else:
            table.to_parquet(partial, index=False)
        os.replace(partial, final)
