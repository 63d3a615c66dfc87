"""``deepmr export``: effects as TSV/Parquet/VCF/bedGraph, and instruments that ``deepmr mr`` turns back into the store's local CEs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.errors import InputError
from deepmr_dist.io.store import open_run
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.export import export
from deepmr_dist.pipeline.runner import run_pipeline
from deepmr_dist.schema import TABLE_NA
from test_tables_parity import assert_same_cells, read


@pytest.fixture(scope="module")
def store(tmp_path_factory, client):
    path = tmp_path_factory.mktemp("export") / "run.zarr"
    config = parse_config({"sequences": {"fasta": str(EXAMPLE_FASTA)}, "model": {"sources": [EXAMPLE_ENSEMBLE]},
                           "mr": {"methods": ["ivw", "egger"]}, "store": str(path), "report": False},
                          PipelineConfig, "test")  # fmt: skip
    run_pipeline(config, client=client, progress=False)
    return path


def test_export_instruments__through_deepmr_mr_give_the_stores_local_ces(store, tmp_path, capsys):
    table = tmp_path / "instruments.tsv"
    assert main(["export", "--store", str(store), "--what", "instruments", "--pair", "task0->task1", "--out", str(table)]) == 0
    assert main(["mr", str(table), "--method", "ivw,egger", "--out", str(tmp_path / "mr.csv")]) == 0
    again = pd.read_csv(tmp_path / "mr.csv")
    local = open_run(str(store))["mr"].sel(pair="task0->task1")
    exported = pd.read_csv(table, sep="\t")
    counts = exported.groupby("locus").size()
    for method in ("ivw", "egger"):
        stored = local.sel({"method": method})
        n = stored["n_instruments"].to_series()
        assert (n[n > 0] == counts.reindex(n[n > 0].index)).all()  # the same instruments per locus
        rows = again[again["method"] == method].set_index("locus")
        expected = stored["local_ce"].to_series().reindex(rows.index)
        np.testing.assert_allclose(rows["estimate"].to_numpy(), expected.to_numpy(), rtol=1e-9, atol=1e-12)
    # and every column of the run's local_ce.csv rows of the pair, under the same names, in the same order
    again = read(tmp_path / "mr.csv").set_index(["locus", "method"])
    run_rows = read(store.with_suffix("") / "local_ce.csv").query("pair == 'task0->task1'")
    assert list(run_rows.columns) == ["pair", "exposure", "outcome", *again.reset_index().columns]
    assert_same_cells(run_rows.set_index(["locus", "method"]).loc[again.index, list(again.columns)], again, rtol=1e-9, atol=1e-12)


def test_export_local_ce__is_the_runs_local_ce_table_cell_for_cell(store, tmp_path):
    assert main(["export", "--store", str(store), "--what", "local_ce", "--out", str(tmp_path / "local.tsv")]) == 0
    exported = pd.read_csv(tmp_path / "local.tsv", sep="\t", na_values=[TABLE_NA], keep_default_na=False)
    assert_same_cells(exported, read(store.with_suffix("") / "local_ce.csv"))


def test_export_effects__tsv_and_parquet_rows_are_every_mutation(store, tmp_path):
    groups = open_run(str(store))
    effects = groups["effects"]
    n = export(groups, "effects", "tsv", tmp_path / "e.tsv")
    table = pd.read_csv(tmp_path / "e.tsv", sep="\t")
    assert n == len(table) == int(np.isfinite(effects["effect"].isel(task=0).values).sum())
    assert set(table["alt"]) <= set("ACGT") and (table["ref"] != table["alt"]).all()
    row = table.iloc[123]
    expected = float(effects["effect"].sel(locus=row["locus"], position=row["position"], allele=row["alt"], task="task1"))
    assert row["effect_task1"] == pytest.approx(expected, rel=1e-6)
    assert export(groups, "effects", "parquet", tmp_path / "e.parquet") == n
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "e.parquet"), table, check_dtype=False)
    with pytest.raises(InputError, match="genome coordinates"):
        export(groups, "effects", "bedgraph", tmp_path / "e.bedgraph")
    with pytest.raises(InputError, match="can be exported as tsv, parquet"):
        export(groups, "instruments", "vcf", tmp_path / "x.vcf", pair="task0->task1")
    with pytest.raises(InputError, match="no pair 'a->b'"):
        export(groups, "instruments", "tsv", tmp_path / "x.tsv", pair="a->b")


def _genomic_groups() -> dict[str, xr.Dataset]:
    """Two BED loci of 3 bp (chr1:100-103, chr2:10-13) with hand-set effects on one task."""
    codes = np.array([[0, 1, 2], [3, 4, 0]], dtype=np.int8)  # ACG, TNA
    effect = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4, 1) / 10
    effect[0, [0, 1, 2], [0, 1, 2]] = np.nan  # reference alleles; locus 1 position 1 is N: all four are mutations
    effect[1, 0, 3] = effect[1, 2, 0] = np.nan
    coords = {"locus": ["a", "b"], "position": [0, 1, 2], "allele": list("ACGT"), "task": ["t"]}
    effects = xr.Dataset({"effect": (("locus", "position", "allele", "task"), effect),
                          "effect_se": (("locus", "position", "allele", "task"), effect / 2)}, coords=coords).chunk({"locus": 1})
    ism = xr.Dataset({"sequence": (("locus", "position"), codes)},
                     coords={"locus": ["a", "b"], "chrom": ("locus", ["chr1", "chr2"]), "start": ("locus", [100, 10])})
    return {"effects": effects, "ism": ism}  # fmt: skip


def test_export_effects__vcf_and_bedgraph_use_1_and_0_based_genome_coordinates(tmp_path):
    groups = _genomic_groups()
    assert export(groups, "effects", "vcf", tmp_path / "e.vcf") == 3 * 3 + 3 * 2 + 4
    lines = (tmp_path / "e.vcf").read_text().splitlines()
    assert lines[0] == "##fileformat=VCFv4.3" and lines[[l.startswith("#CHROM") for l in lines].index(True)].startswith("#CHROM\tPOS")
    records = [l.split("\t") for l in lines if not l.startswith("#")]
    assert records[0][:5] == ["chr1", "101", "chr1:101:A>C", "A", "C"]
    assert records[0][7] == "EFFECT_t=0.1;SE_t=0.05"
    n_records = [r for r in records if r[3] == "N"]
    assert [r[1] for r in n_records] == ["12"] * 4 and [r[4] for r in n_records] == list("ACGT")
    assert export(groups, "effects", "bedgraph", tmp_path / "e.bedgraph") == 6
    bedgraph = (tmp_path / "e.bedgraph").read_text().splitlines()
    assert bedgraph[0].startswith("track type=bedGraph")
    assert bedgraph[1].split("\t") == ["chr1", "100", "101", "0.3"]  # max |effect| of A>C, A>G, A>T: 0.1, 0.2, 0.3
    assert bedgraph[4].split("\t") == ["chr2", "10", "11", "1.4"]
