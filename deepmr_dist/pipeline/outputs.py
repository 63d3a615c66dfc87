"""The tables a pipeline writes beside its store: local and global CEs, named as ``deepmr mr`` / ``deepmr meta`` name them."""

from __future__ import annotations

import pandas as pd
import xarray as xr

LOCAL_COLUMNS = {
    "local_ce": "estimate", "local_se": "se", "ci_lower": "ci_lower", "ci_upper": "ci_upper", "pvalue": "pvalue",
    "intercept": "intercept", "intercept_se": "intercept_se", "intercept_pvalue": "intercept_pvalue",
    "q": "q", "i2gx": "i2gx", "n_instruments": "n", "reason": "reason", "note": "note",
}
GLOBAL_COLUMNS = {
    "k": "k", "global_ce": "estimate", "global_se": "se", "ci_lower": "ci_lower", "ci_upper": "ci_upper",
    "pvalue": "pvalue", "tau2": "tau2", "i2": "i2", "h2": "h2", "q": "q", "q_pvalue": "q_pvalue",
    "pi_lower": "pi_lower", "pi_upper": "pi_upper", "reason": "reason", "mean_i2gx": "mean_i2gx",
    "share_i2gx_below_0_9": "share_i2gx_below_0_9",
}


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
