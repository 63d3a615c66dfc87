"""The variable registry: every group's variables, lookup by group, and validate for the mr and meta groups."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.io import store
from deepmr_dist.stages.causal_effects import GLOBAL_VARIABLES, LOCAL_VARIABLES, global_ce, local_ce
from deepmr_dist.errors import StoreError

from test_causal_effects import make_effects


def _names(group: str) -> set[str]:
    return {v.name for v in schema.variables_of(group)}


def test_schema__mr_and_meta_groups_register_what_analysis_writes():
    assert _names(schema.MR) == {*LOCAL_VARIABLES, "n_instruments", "reason", "note", "n_excluded"}
    assert _names(schema.META) == {*GLOBAL_VARIABLES, "k", "n_loci_undefined", "reason", "mean_i2gx", "share_i2gx_below_0_9"}
    assert {v.dims for v in schema.variables_of(schema.MR)} == {("pair", "locus", "method")}
    assert {v.dims for v in schema.variables_of(schema.META)} == {("pair", "method")}
    for var in schema.REGISTRY:
        assert var.group in schema.GROUPS and var.description, var
        assert var.dtype == schema.TEXT or np.dtype(var.dtype), var


def test_schema__every_variable_and_coordinate_has_names_and_units_by_the_rule():
    """Units by the rule of the schema's docstring: none for flags, codes, checksums and text; a unit for every number."""
    not_quantities = {"sequence", "chunk_digest"}  # base codes, a checksum
    for var in schema.REGISTRY:
        assert var.long_name and var.description and var.long_name != var.description, var
        assert (var.units is None) == (var.dtype in ("bool", schema.TEXT) or var.name in not_quantities), var
        assert set(var.attributes) == {"long_name", "description"} | ({"units"} if var.units else set())
    assert [v.units for v in schema.variables_of(schema.MR) if v.name.startswith("local_")] == [schema.CE] * 2
    assert schema.variable(schema.META, "i2").units == "percent" and schema.variable(schema.MR, "i2").units == "1"
    names = [c.name for c in schema.COORDINATES]
    assert len(names) == len(set(names)) and not set(names) & {v.name for v in schema.REGISTRY}
    position = schema.attributes(schema.EFFECTS, "position")  # a coordinate means the same in every group
    assert position == schema.attributes(schema.ISM, "position") and position["units"] == "bp"
    assert schema.attributes(schema.MR, "q") == schema.variable(schema.MR, "q").attributes != schema.attributes(schema.META, "q")
    assert schema.attributes(schema.MR, "unregistered") == {}


def test_schema__names_shared_by_groups_are_looked_up_by_group():
    assert schema.variable(schema.MR, "q").dims == ("pair", "locus", "method")
    assert schema.variable(schema.META, "q").dims == ("pair", "method")
    for shared in ("ci_lower", "ci_upper", "pvalue", "q", "reason"):
        assert shared not in schema.VARIABLES
    assert schema.VARIABLES["local_ce"].group == schema.MR
    assert schema.VARIABLES["effect"] is schema.variable(schema.EFFECTS, "effect")
    with pytest.raises(KeyError, match="no registered variable 'local_ce'"):
        schema.variable(schema.META, "local_ce")


@pytest.mark.filterwarnings("ignore:The data type .* does not have a Zarr V3 specification")
def test_schema__local_and_global_ce_validate_in_memory_and_read_back_from_zarr(tmp_path):
    local = local_ce(make_effects(), pairs=[("x", "y"), ("x", "z")], methods=["ivw", "egger"], rule="mutation_z", threshold=2.0)
    glob = global_ce(local)
    assert local["reason"].dtype.kind == "U" and glob["reason"].dtype.kind == "U"
    assert local["local_ce"].attrs["description"] == schema.variable(schema.MR, "local_ce").description
    assert glob["k"].attrs["description"] == schema.variable(schema.META, "k").description
    path = str(tmp_path / "run.zarr")
    local_back = store.write_group(path, local.compute(), schema.MR)
    glob_back = store.write_group(path, glob, schema.META)
    assert local_back["reason"].dtype.kind != "U"  # variable-length strings once in Zarr
    schema.validate(local_back, schema.MR)
    schema.validate(glob_back, schema.META)


def test_schema__validate_names_the_malformed_mr_or_meta_variable():
    local = local_ce(make_effects(), pairs=[("x", "y")], methods=["ivw"], rule="mutation_z", threshold=2.0).compute()
    glob = global_ce(local)
    with pytest.raises(StoreError, match="mr/n_instruments has dtype float64, expected int64"):
        schema.validate(local.assign(n_instruments=local["n_instruments"].astype(np.float64)), schema.MR)
    with pytest.raises(StoreError, match="mr/reason has dtype int64, expected str"):
        schema.validate(local.assign(reason=xr.zeros_like(local["n_instruments"])), schema.MR)
    with pytest.raises(StoreError, match=r"mr/local_ce has dims \('locus', 'pair', 'method'\)"):
        schema.validate(local.assign(local_ce=local["local_ce"].transpose("locus", "pair", "method")), schema.MR)
    with pytest.raises(StoreError, match="group 'meta' lacks variable 'n_loci_undefined'"):
        schema.validate(glob.drop_vars("n_loci_undefined"), schema.META)
    with pytest.raises(StoreError, match=r"meta/q has dims \('pair', 'locus', 'method'\)"):
        schema.validate(glob.assign(q=local["q"]), schema.META)


def test_schema__result_fields_name_fields_of_the_kernels_results():
    import dataclasses

    from deepmr_dist.meta import MetaResult
    from deepmr_dist.mr import MRResult

    for group, result in ((schema.MR, MRResult), (schema.META, MetaResult)):
        names = {f.name for f in dataclasses.fields(result)}
        fields = [v.field for v in schema.variables_of(group) if v.field]
        assert fields and set(fields) <= names, (group, set(fields) - names)
    assert schema.table_columns(schema.MR)["n_instruments"] == "n"
    assert list(schema.table_columns(schema.META))[:2] == ["k", "n_loci_undefined"]


def test_schema__mr_table_columns_are_the_mr_result_columns_in_order():
    """One column set: the registry's mr table columns are MRResult.to_frame's (after locus, method)."""
    from deepmr_dist.cli.mr import MR_OUTPUT_COLUMNS
    from deepmr_dist.mr.result import COLUMNS

    assert list(schema.table_columns(schema.MR).values()) == [*COLUMNS[2:], "n_excluded"]
    assert MR_OUTPUT_COLUMNS == (*COLUMNS, "n_excluded")


def test_schema__a_runs_local_table_has_deepmr_mrs_columns_and_spells_nan_NA(tmp_path):
    from deepmr_dist.cli.mr import MR_OUTPUT_COLUMNS
    from deepmr_dist.pipeline.outputs import Outputs, local_table_from, write_table

    local = local_ce(make_effects(), pairs=[("x", "y")], methods=["ivw", "egger"], rule="mutation_z", threshold=2.0)
    table = local_table_from(local.compute())
    assert list(table.columns) == ["pair", "exposure", "outcome", *MR_OUTPUT_COLUMNS]
    egger = table[table["method"] == "egger"]
    assert np.isfinite(egger["intercept_ci_lower"]).any() and np.isfinite(table["fstat"]).any()
    write_table(table, Outputs(str(tmp_path)), "local_ce")
    text = (tmp_path / "local_ce.csv").read_text()
    header, first = text.splitlines()[0].split(","), text.splitlines()[1].split(",")
    assert first[header.index("method")] == "ivw" and first[header.index("intercept")] == schema.TABLE_NA
    assert "NaN" not in text
