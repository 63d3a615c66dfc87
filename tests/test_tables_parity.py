"""One column set and one NA spelling: a run's local/global CE tables against ``deepmr mr``/``deepmr meta``'s own output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.io.store import open_run
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.export import export
from deepmr_dist.pipeline.outputs import local_table_from
from deepmr_dist.pipeline.runner import run_pipeline
from deepmr_dist.schema import TABLE_NA
from deepmr_dist.stages.causal_effects import local_ce
from test_causal_effects import make_effects

PAIR_COLUMNS = ["pair", "exposure", "outcome"]
TEXT_COLUMNS = {"pair", "exposure", "outcome", "locus", "method", "group", "reason", "note"}
DILUTION = ["mean_i2gx", "share_i2gx_below_0_9"]


def read(path) -> pd.DataFrame:
    """A table as R's read.csv reads it: only ``NA`` is missing."""
    return pd.read_csv(path, na_values=[TABLE_NA], keep_default_na=False)


def assert_same_cells(left: pd.DataFrame, right: pd.DataFrame, *, rtol: float = 0.0, atol: float = 0.0) -> None:
    """The same columns, the same missing cells and the same values (numbers within the tolerances).

    Cell by cell, not dtype by dtype: a column with no value reads from CSV as float, from Parquet as text.
    """
    assert list(left.columns) == list(right.columns)
    for c in left.columns:
        np.testing.assert_array_equal(left[c].isna().to_numpy(), right[c].isna().to_numpy(), err_msg=c)
        a, b = left[c].dropna(), right[c].dropna()
        if c in TEXT_COLUMNS:
            assert a.tolist() == b.tolist(), c
        else:
            np.testing.assert_allclose(a.to_numpy(dtype=float), b.to_numpy(dtype=float), rtol=rtol, atol=atol, err_msg=c)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, client):
    """The output folder of a run (what ``deepmr run`` runs) on 24 example loci in 3 chunks, IVW and MR-Egger, DL."""
    root = tmp_path_factory.mktemp("parity")
    records = EXAMPLE_FASTA.read_text().split(">")[1:25]
    (root / "loci.fa").write_text("".join(f">{record}" for record in records))
    config = {"sequences": {"fasta": str(root / "loci.fa")}, "model": {"sources": [EXAMPLE_ENSEMBLE]},
              "ism": {"chunk_loci": 8}, "mr": {"methods": ["ivw", "egger"]}, "store": str(root / "run.zarr"),
              "report": False}  # fmt: skip
    run_pipeline(parse_config(config, PipelineConfig, "test"), client=client, progress=False)
    return root / "run"


def _command_columns(tmp_path) -> tuple[list[str], list[str]]:
    """The headers ``deepmr mr`` and ``deepmr meta`` write, from runs of the commands."""
    rows = pd.DataFrame({"locus": ["a"] * 3, "bx": [0.5, 0.7, -0.4], "bxse": [0.1] * 3, "by": [1.0, 1.5, -0.7],
                         "byse": [0.2] * 3})  # fmt: skip
    rows.to_csv(tmp_path / "mr_in.csv", index=False)
    pd.DataFrame({"group": ["g"] * 3, "estimate": [0.1, 0.3, 0.2], "se": [0.1] * 3}).to_csv(tmp_path / "meta_in.csv", index=False)
    assert main(["mr", str(tmp_path / "mr_in.csv"), "--out", str(tmp_path / "mr.csv"), "-q"]) == 0
    assert main(["meta", str(tmp_path / "meta_in.csv"), "--out", str(tmp_path / "meta.csv"), "-q"]) == 0
    return list(read(tmp_path / "mr.csv").columns), list(read(tmp_path / "meta.csv").columns)


def test_run_tables__are_the_pair_then_deepmr_mr_and_deepmr_meta_columns(outputs, tmp_path):
    mr_columns, meta_columns = _command_columns(tmp_path)
    assert mr_columns[:2] == ["locus", "method"] and meta_columns[:2] == ["group", "method"]
    assert list(read(outputs / "local_ce.csv").columns) == [*PAIR_COLUMNS, *mr_columns]
    # the pair is deepmr meta's group; the store's dilution summary follows (deepmr meta's input has no I^2_GX)
    assert list(read(outputs / "global_ce.csv").columns) == [*PAIR_COLUMNS, *meta_columns[1:], *DILUTION]
    for stem in ("local_ce", "global_ce"):
        assert list(pd.read_parquet(outputs / f"{stem}.parquet").columns) == list(read(outputs / f"{stem}.csv").columns)


@pytest.mark.parametrize("stem, group, index", [("local_ce", "mr", ["pair", "locus", "method"]), ("global_ce", "meta", ["pair", "method"])])
def test_run_tables__NA_is_the_one_spelling_of_missing_and_reads_back_as_the_stores_nan(outputs, stem, group, index):
    text = (outputs / f"{stem}.csv").read_text()
    assert "NaN" not in text and all(cell for line in text.splitlines() for cell in line.split(","))  # no empty cell
    table = read(outputs / f"{stem}.csv")
    numeric = [c for c in table.columns if c not in TEXT_COLUMNS]
    assert all(table[c].dtype.kind in "if" for c in numeric), table.dtypes  # every cell parsed: a number or NA
    assert_same_cells(table, pd.read_parquet(outputs / f"{stem}.parquet"))  # CSV and Parquet: exactly the same
    stored = open_run(str(outputs.parent / "run.zarr"))[group].load()
    keyed = table.set_index(index)
    column = {"mr": {"local_ce": "estimate", "local_se": "se", "n_instruments": "n"},
              "meta": {"global_ce": "estimate", "global_se": "se", "n_loci_undefined": "n_excluded"}}[group]  # fmt: skip
    for name, var in stored.data_vars.items():
        values = var.to_series().reindex(keyed.index)
        got = keyed[column.get(name, name)]
        if var.dtype.kind in "OUT":  # a code, or none: '' in the store, NA in the table
            assert (got.isna().to_numpy() == (values == "").to_numpy()).all(), name
            assert (got.dropna() == values[values != ""]).all(), name
        else:
            np.testing.assert_array_equal(got.isna().to_numpy(), np.isnan(values.to_numpy(dtype=float)), err_msg=name)
            np.testing.assert_allclose(got.to_numpy(dtype=float), values.to_numpy(dtype=float), rtol=1e-15, err_msg=name)
    assert table["reason"].isna().any() and table["estimate"].notna().any()


def test_deepmr_meta_over_the_local_table__gives_the_global_table(outputs, tmp_path):
    """DerSimonian-Laird over local_ce.csv's (pair, estimate, se) through ``deepmr meta`` is global_ce.csv's row."""
    local, global_ = read(outputs / "local_ce.csv"), read(outputs / "global_ce.csv")
    for method in ("ivw", "egger"):
        rows = local[local["method"] == method].rename(columns={"pair": "group"})[["group", "estimate", "se"]]
        rows.to_csv(tmp_path / "in.csv", index=False, na_rep=TABLE_NA)
        assert main(["meta", str(tmp_path / "in.csv"), "--method", "dl", "--out", str(tmp_path / "out.csv"), "-q"]) == 0
        meta = read(tmp_path / "out.csv").set_index("group")
        expected = global_[global_["method"] == method].set_index("pair").reindex(meta.index)
        shared = [c for c in meta.columns if c != "method"]
        assert list(expected.columns[3 : 3 + len(shared)]) == shared
        assert meta.index.tolist() == expected.index.tolist()
        assert_same_cells(meta[shared], expected[shared], rtol=1e-9)


def _spoiled_effects():
    """:func:`make_effects` with invalid outcome values at some exposure instruments: SE 0, NaN effect, infinite SE."""
    effects = make_effects().load()
    x, se_x = effects["effect"].sel(task="x").values, effects["effect_se"].sel(task="x").values
    with np.errstate(invalid="ignore"):
        strong = np.argwhere(np.abs(x) / se_x >= 2.0)
    y, se_y = effects["effect"].loc[{"task": "y"}].values, effects["effect_se"].loc[{"task": "y"}].values
    spoiled = {1: [0], 2: [0, 1], 5: [0, 1, 2]}  # locus -> which of its instruments
    for locus, which in spoiled.items():
        cells = strong[strong[:, 0] == locus][which]
        for k, (i, p, a) in enumerate(cells):
            if k == 0:
                se_y[i, p, a] = 0.0
            elif k == 1:
                y[i, p, a] = np.nan
            else:
                se_y[i, p, a] = np.inf
    effects["effect"].loc[{"task": "y"}] = y
    effects["effect_se"].loc[{"task": "y"}] = se_y
    return effects.chunk({"locus": 4}), {f"l{locus}": len(which) for locus, which in spoiled.items()}


def test_local_table__n_excluded_and_every_column_as_deepmr_mr_gives_them_from_the_exported_instruments(tmp_path):
    effects, spoiled = _spoiled_effects()
    local = local_ce(effects, pairs=[("x", "y")], methods=["ivw", "egger"], rule="mutation_z", threshold=2.0).compute()
    counts = local["n_excluded"].sel(pair="x->y").to_pandas()
    expected = pd.Series({locus: spoiled.get(locus, 0) for locus in counts.index})
    for method in ("ivw", "egger"):
        pd.testing.assert_series_equal(counts[method], expected, check_names=False)
    export({"effects": effects, "mr": local}, "instruments", "tsv", tmp_path / "inst.tsv", pair="x->y")
    assert main(["mr", str(tmp_path / "inst.tsv"), "--method", "ivw,egger", "--out", str(tmp_path / "mr.csv"), "-q"]) == 0
    again = read(tmp_path / "mr.csv").set_index(["locus", "method"])
    table = local_table_from(local)
    assert list(table.columns) == [*PAIR_COLUMNS, *again.reset_index().columns]
    table = table.set_index(["locus", "method"])
    assert set(table.index) - set(again.index) == {("l0", "ivw"), ("l0", "egger")}  # l0 has no instrument to export
    assert (table.loc["l0", "n"] == 0).all() and (table.loc["l0", "reason"] == "too_few_instruments").all()
    assert_same_cells(table.loc[again.index, list(again.columns)], again, rtol=1e-9, atol=1e-12)
