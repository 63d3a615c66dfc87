"""Tests of motif-spacing stratification: BED reading, distances, bins, per-bin meta-analysis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from deepmr_dist.stages.causal_effects import global_ce
from deepmr_dist.errors import InputError
from deepmr_dist.meta import meta_analysis
from deepmr_dist.stages.spacing import (
    STRATIFIED_COLUMNS,
    locus_spacing,
    motif_instances,
    spacing_bins,
    stratified_global_ce,
)

# Centres: A 115, 265 (chr1), 15, 25 (chr2); B 155, 300 (chr1, the latter straddles L1's end), 190 (chr2);
# C 105, 405.5 (chr1), 65 (chr2).
BED = """track name=motifs
# a comment

chr1\t110\t120\tA\t5.5\t+
chr1\t150\t160\tB\t.\t-
chr1\t260\t270\tA
chr1\t295\t305\tB
chr1\t400\t411\tC
chr1\t100\t110\tC
chr2\t10\t20\tA
chr2\t20\t30\tA
chr2\t60\t70\tC
chr2\t180\t200\tB
chrX\t10\t20\tB
"""

LOCI = pd.DataFrame(
    {"chrom": ["chr1", "chr1", "chr2", "chr1"], "start": [100, 250, 0, 1000], "end": [300, 450, 200, 1100]},
    index=pd.Index(["L1", "L2", "L3", "L4"], name="locus"),
)

# By hand (min centre-to-centre distance over instances wholly inside the locus):
# A-B: L1 |115-155| = 40 (B at 300 straddles L1's end: excluded); L2 |265-300| = 35;
#      L3 min |15,25 - 190| = 165; L4 none.
# A-C: L1 |115-105| = 10; L2 |265-405.5| = 140.5; L3 |25-65| = 40; L4 none.
EXPECTED = {
    "A->B": [40.0, 35.0, 165.0, np.nan],
    "B->A": [40.0, 35.0, 165.0, np.nan],
    "A->C": [10.0, 140.5, 40.0, np.nan],
}
EXPECTED_BINS = {
    "A->B": ["35-70", "35-70", ">=150", ""],
    "B->A": ["35-70", "35-70", ">=150", ""],
    "A->C": ["0-35", "70-150", "35-70", ""],
}
PAIRS = [("A", "B"), ("B", "A"), ("A", "C")]


@pytest.fixture()
def bed(tmp_path):
    path = tmp_path / "motifs.bed"
    path.write_text(BED)
    return path


def test_motif_instances__reads_columns_and_skips_headers(bed):
    frame = motif_instances(bed)
    assert len(frame) == 11
    assert frame["line"].tolist()[:2] == [4, 5]
    first = frame.iloc[0]
    assert (first["chrom"], first["start"], first["end"], first["name"]) == ("chr1", 110, 120, "A")
    assert first["score"] == 5.5 and first["strand"] == "+"
    assert np.isnan(frame["score"].iloc[1]) and frame["strand"].iloc[1] == "-"
    assert frame["strand"].iloc[2] == "." and np.isnan(frame["score"].iloc[2])
    assert frame["start"].dtype == np.int64 and frame["score"].dtype == np.float64


@pytest.mark.parametrize(
    ("line", "fault"),
    [
        ("chr1\tx\t10\tA", "integers"),
        ("chr1\t10\t5\tA", "invalid interval"),
        ("chr1\t10\t10\tA", "invalid interval"),
        ("chr1\t1\t5", "at least 4"),
        ("chr1\t1\t5\t.", "name"),
        ("chr1\t1\t5\tA\thigh", "score"),
        ("chr1\t1\t5\tA\t1\t*", "strand"),
    ],
)
def test_motif_instances__malformed_line_names_file_and_line(tmp_path, line, fault):
    path = tmp_path / "bad.bed"
    path.write_text(f"# header\nchr1\t1\t5\tA\n{line}\n")
    with pytest.raises(InputError, match=fault) as info:
        motif_instances(path)
    assert f"{path}:3:" in str(info.value)


def test_motif_instances__missing_or_empty_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        motif_instances(tmp_path / "nope.bed")
    empty = tmp_path / "empty.bed"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match=f"{empty} contains no motif instances"):
        motif_instances(empty)


def test_locus_spacing__hand_computed_distances(bed):
    distance = locus_spacing(motif_instances(bed), LOCI, PAIRS)
    assert distance.dims == ("pair", "locus")
    assert distance["locus"].values.tolist() == ["L1", "L2", "L3", "L4"]
    assert distance["exposure"].values.tolist() == ["A", "B", "A"]
    assert distance["outcome"].values.tolist() == ["B", "A", "C"]
    for pair, expected in EXPECTED.items():
        np.testing.assert_array_equal(distance.sel(pair=pair).values, expected, err_msg=pair)


def test_locus_spacing__takes_locus_coordinates_of_a_dataset_and_motif_names(bed):
    ds = xr.Dataset(
        coords={
            "locus": LOCI.index.to_numpy(),
            "chrom": ("locus", LOCI["chrom"].to_numpy()),
            "start": ("locus", LOCI["start"].to_numpy()),
            "end": ("locus", LOCI["end"].to_numpy()),
        }
    )
    distance = locus_spacing(motif_instances(bed), ds, [("a_counts", "C")], motif_names={"a_counts": "A"})
    assert distance["pair"].values.tolist() == ["a_counts->C"]
    np.testing.assert_array_equal(distance.values[0], EXPECTED["A->C"])


def test_locus_spacing__input_errors(bed):
    instances = motif_instances(bed)
    with pytest.raises(InputError, match="'D'"):
        locus_spacing(instances, LOCI, [("A", "D")])
    with pytest.raises(InputError, match="same motif"):
        locus_spacing(instances, LOCI, [("A", "a2")], motif_names={"a2": "A"})
    with pytest.raises(InputError, match="end"):
        locus_spacing(instances, LOCI.drop(columns="end"), PAIRS)
    with pytest.raises(InputError, match="'L2'.*invalid interval"):
        locus_spacing(instances, LOCI.assign(end=[300, 250, 200, 1100]), PAIRS)
    with pytest.raises(InputError, match="'L3'.*invalid interval"):
        locus_spacing(instances, LOCI.assign(start=[100, 250, np.nan, 1000]), PAIRS)
    with pytest.raises(InputError, match="'L1'.*need integers"):
        locus_spacing(instances, LOCI.assign(start=[100.5, 250, 0, 1000]), PAIRS)
    with pytest.raises(InputError, match="'locus' coordinate"):
        locus_spacing(instances, xr.Dataset(coords={"locus": ["L1"]}), PAIRS)
    with pytest.raises(InputError, match="duplicate locus"):
        locus_spacing(instances, LOCI.set_axis(["L1", "L1", "L3", "L4"]), PAIRS)


def test_spacing_bins__default_edges_are_left_closed(bed):
    distance = xr.DataArray([0.0, 34.5, 35.0, 149.5, 150.0, np.nan, 1e9], dims="x")
    bins = spacing_bins(distance)
    assert bins.values.tolist() == ["0-35", "0-35", "35-70", "70-150", ">=150", "", ">=150"]
    assert bins.attrs["labels"] == ["0-35", "35-70", "70-150", ">=150"]
    spaced = spacing_bins(locus_spacing(motif_instances(bed), LOCI, PAIRS))
    for pair, expected in EXPECTED_BINS.items():
        assert spaced.sel(pair=pair).values.tolist() == expected, pair


def test_spacing_bins__custom_finite_edges_leave_outside_values_unbinned():
    bins = spacing_bins(xr.DataArray([5.0, 10.0, 19.9, 20.0, np.nan], dims="x"), edges=(10, 20))
    assert bins.values.tolist() == ["", "10-20", "10-20", "", ""]


@pytest.mark.parametrize("edges", [(10,), (0, 35, 35), (-1, 5), (0, np.inf, 200), (0, np.nan)])
def test_spacing_bins__bad_edges(edges):
    with pytest.raises(InputError, match="edges"):
        spacing_bins(xr.DataArray([1.0], dims="x"), edges=edges)


def make_local(seed=3):
    """Local CEs of 2 pairs x 6 loci x 2 methods; one undefined estimate at (A->B, L2, egger)."""
    rng = np.random.default_rng(seed)
    shape = (2, 6, 2)
    est = rng.normal(0.5, 0.3, shape)
    se = rng.uniform(0.05, 0.2, shape)
    est[0, 1, 1] = np.nan
    dims = ("pair", "locus", "method")
    return xr.Dataset(
        {"local_ce": (dims, est), "local_se": (dims, se)},
        coords={
            "pair": ["A->B", "A->C"],
            "exposure": ("pair", ["A", "A"]),
            "outcome": ("pair", ["B", "C"]),
            "locus": [f"L{i}" for i in range(1, 7)],
            "method": ["ivw", "egger"],
        },
    )


HAND_BINS = {  # L6 is missing from the bins: it gets no bin
    "A->B": ["35-70", "35-70", ">=150", "", "0-35"],
    "A->C": ["0-35", "70-150", "35-70", "", "0-35"],
}


def hand_bins() -> xr.DataArray:
    return xr.DataArray(
        [HAND_BINS["A->B"], HAND_BINS["A->C"]],
        dims=("pair", "locus"),
        coords={"pair": ["A->B", "A->C"], "locus": ["L1", "L2", "L3", "L4", "L5"]},
        attrs={"labels": ["0-35", "35-70", "70-150", ">=150"]},
    )


@pytest.mark.parametrize("meta_method", ["dl", "reml"])
def test_stratified_global_ce__equals_meta_analysis_of_each_bins_loci(meta_method):
    local = make_local()
    table = stratified_global_ce(local, spacing_bins=hand_bins(), meta_method=meta_method)
    assert list(table.columns) == list(STRATIFIED_COLUMNS)
    assert len(table) == 2 * 2 * 4
    assert list(table["bin"].cat.categories) == ["0-35", "35-70", "70-150", ">=150"]
    loci = ["L1", "L2", "L3", "L4", "L5"]
    for row in table.itertuples():
        chosen = [loc for loc, b in zip(loci, HAND_BINS[row.pair], strict=True) if b == row.bin]
        part = local.sel({"pair": row.pair, "method": row.method, "locus": chosen})
        ref = meta_analysis(part["local_ce"].values, part["local_se"].values, meta_method)
        assert row.k == ref.k[0], row
        for name in ("estimate", "se", "ci_lower", "ci_upper", "tau2"):
            np.testing.assert_allclose(getattr(row, name), getattr(ref, name)[0], rtol=1e-12, err_msg=f"{row} {name}")
    # the undefined local CE (A->B, L2, egger) is left out of bin 35-70; empty bins have k = 0
    row = table[(table["pair"] == "A->B") & (table["method"] == "egger") & (table["bin"] == "35-70")]
    assert row["k"].item() == 1
    empty = table[(table["pair"] == "A->B") & (table["bin"] == "70-150")]
    assert (empty["k"] == 0).all() and empty["estimate"].isna().all()


def test_stratified_global_ce__one_bin_equals_global_ce():
    local = make_local()
    coords = {"pair": local["pair"].values, "locus": local["locus"].values}
    bins = xr.DataArray(np.full((2, 6), "all"), dims=("pair", "locus"), coords=coords)
    table = stratified_global_ce(local, spacing_bins=bins, meta_method="dl")
    reference = global_ce(local, meta_method="dl")
    for row in table.itertuples():
        ref = reference.sel({"pair": row.pair, "method": row.method})
        assert row.bin == "all" and row.k == int(ref["k"])
        np.testing.assert_allclose(
            [row.estimate, row.se, row.tau2], [float(ref["global_ce"]), float(ref["global_se"]), float(ref["tau2"])],
            rtol=1e-12,
        )


def test_stratified_global_ce__input_errors():
    local = make_local()
    with pytest.raises(InputError, match="'A->D'"):
        stratified_global_ce(local, spacing_bins=hand_bins().assign_coords(pair=["A->B", "A->D"]))
    with pytest.raises(InputError, match="'L9'"):
        stratified_global_ce(local, spacing_bins=hand_bins().assign_coords(locus=["L1", "L2", "L3", "L4", "L9"]))
    with pytest.raises(InputError, match="dims"):
        stratified_global_ce(local, spacing_bins=hand_bins().isel(pair=0))
    with pytest.raises(InputError, match="local_se"):
        stratified_global_ce(local.drop_vars("local_se"), spacing_bins=hand_bins())
    with pytest.raises(InputError, match="unknown meta-analysis method 'bogus'; valid: fe, dl, reml, pm"):
        stratified_global_ce(local, spacing_bins=hand_bins(), meta_method="bogus")


def test_locus_spacing__matches_brute_force_on_random_overlapping_loci():
    rng = np.random.default_rng(11)
    starts = rng.integers(0, 2000, 40)
    loci = pd.DataFrame(
        {"chrom": rng.choice(["c1", "c2"], 40), "start": starts, "end": starts + rng.integers(50, 400, 40)},
        index=[f"L{i}" for i in range(40)],
    )
    inst_start = rng.integers(0, 2400, 300)
    instances = pd.DataFrame(
        {
            "chrom": rng.choice(["c1", "c2", "c3"], 300),
            "start": inst_start,
            "end": inst_start + rng.integers(1, 30, 300),
            "name": rng.choice(["A", "B", "C"], 300),
        }
    )
    distance = locus_spacing(instances, loci, [("A", "B"), ("C", "A")])
    for (exposure, outcome), row in zip([("A", "B"), ("C", "A")], distance.values, strict=True):
        for j, locus in enumerate(loci.itertuples()):
            same_chrom = instances["chrom"] == locus.chrom
            inside = instances[same_chrom & (instances["start"] >= locus.start) & (instances["end"] <= locus.end)]
            centres = (inside["start"] + inside["end"]) / 2
            ca, cb = centres[inside["name"] == exposure], centres[inside["name"] == outcome]
            expected = min((abs(a - b) for a in ca for b in cb), default=np.nan)
            np.testing.assert_equal(row[j], expected, err_msg=f"{exposure}->{outcome} {locus.Index}")
    assert np.isfinite(distance.values).sum() > 20  # the case is not vacuous
