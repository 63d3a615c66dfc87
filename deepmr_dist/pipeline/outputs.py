"""The tables a pipeline writes beside its store: local and global CEs, named as ``deepmr mr`` / ``deepmr meta`` name them."""

from __future__ import annotations

import pandas as pd
import xarray as xr

from deepmr_dist import schema

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
