"""A self-describing store: every variable and coordinate named, units by the registry, global attrs with the
commands that wrote the store, and every group readable by plain xarray and writable to NetCDF."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from deepmr_dist import __version__, schema
from deepmr_dist.cli import main
from deepmr_dist.io import provenance, store
from deepmr_dist.io.attrs import JSON_ATTRS, decode_attrs, encode_attrs

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (.*)")
"""A history line: ISO 8601 UTC time, then the command."""


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory, client) -> tuple[Path, list[list[str]]]:
    """The quickstart pipeline at a tenth of its size, written by four commands: ``deepmr run``, ``deepmr effects``
    (rewrites one group), ``deepmr run`` with SE calibration (adds the calibration group, rewrites the groups that
    depend on it) and the same again, which finds nothing to do."""
    folder = tmp_path_factory.mktemp("describe")
    data = yaml.safe_load((REPO / "pipelines" / "quickstart.yaml").read_text())
    data["sequences"]["simulation"]["generator"].update(n_train=600, n_test=20, n_calibration=200)
    data["model"].update(members=2, training={"epochs": 2})
    data.update(ism={"chunk_loci": 10}, report=False)
    plain, calibrated = folder / "quickstart.yaml", folder / "calibrated.yaml"
    plain.write_text(yaml.safe_dump(data))
    calibrated.write_text(yaml.safe_dump({**data, "effects": {"calibration": True}}))
    path = folder / "run.zarr"
    options = ["--store", str(path), "--cluster", client.scheduler.address, "--quiet"]
    commands = [["run", str(plain), *options], ["effects", *options], ["run", str(calibrated), *options],
                ["run", str(calibrated), *options]]  # fmt: skip
    for argv in commands:
        assert main(argv) == 0, argv
    return path, commands


@pytest.mark.slow  # the quickstart's training and first MR on fresh workers (numba)
def test_store__every_variable_and_coordinate_of_every_group_is_described(quickstart):
    path, _ = quickstart
    for group in schema.GROUPS:
        ds = xr.open_zarr(path, group=group, consolidated=False)
        for name, var in ds.variables.items():
            registered = schema.attributes(group, name)
            assert registered, f"{group}/{name} is not registered"
            assert var.attrs["long_name"] == registered["long_name"] and var.attrs["description"], f"{group}/{name}"
            assert var.attrs.get("units") == registered.get("units"), f"{group}/{name}"
    effects = xr.open_zarr(path, group=schema.EFFECTS, consolidated=False)
    assert effects["effect"].attrs["units"] == schema.OUTPUT and "units" not in effects["ref"].attrs
    assert xr.open_zarr(path, group=schema.META, consolidated=False)["i2"].attrs["units"] == "percent"


@pytest.mark.slow  # the quickstart's training and first MR on fresh workers (numba)
def test_store__global_attrs_and_one_history_line_per_command_that_wrote(quickstart):
    path, commands = quickstart
    root = dict(zarr.open_group(path, mode="r").attrs)
    lines = root["history"].splitlines()
    # the fourth command (a rerun with every stage unchanged) wrote nothing, so it has no line
    assert [LINE.fullmatch(line).group(1) for line in lines] == [provenance.command_text("deepmr", argv) for argv in commands[:3]]
    for attrs, group in [(root, None), *((xr.open_zarr(path, group=g, consolidated=False).attrs, g) for g in schema.GROUPS)]:
        assert attrs["source"] == f"deepmr-dist {__version__}" and attrs["Conventions"] == store.CONVENTIONS, group
        assert attrs["title"].startswith("deepmr-dist run store"), group
    history = {g: xr.open_zarr(path, group=g, consolidated=False).attrs["history"] for g in schema.GROUPS}
    assert history[schema.ISM] == history[schema.TRUTH] == lines[0]
    for group in (schema.CALIBRATION, schema.EFFECTS, schema.MR, schema.META):  # written (again) by the third
        assert history[group] == "\n".join(lines), group


@pytest.mark.slow  # the quickstart's training and first MR on fresh workers (numba)
def test_store__every_group_round_trips_through_netcdf(quickstart, tmp_path):
    path, _ = quickstart
    for group in schema.GROUPS:
        ds = xr.open_zarr(path, group=group, consolidated=False)
        target = tmp_path / f"{group}.nc"
        ds.to_netcdf(target, engine="h5netcdf")
        with xr.open_dataset(target, engine="h5netcdf") as back:
            xr.testing.assert_identical(back.load(), ds.load())
            assert decode_attrs(back.attrs) == store.open_group(str(path), group).attrs, group
    calibrated = store.open_run(str(path))[schema.EFFECTS].attrs["calibration"]
    assert isinstance(calibrated, dict) and set(calibrated["factor"]) == {"exposure", "outcome"}


def test_attrs__values_netcdf_cannot_hold_become_json_and_decode_back():
    attrs = {"settings": {"head": {"tasks": [0, 1], "output_index": None}}, "members": ["a.pt", "b.pt"],
             "hksj": False, "rows": [{"k": 1.5}], "none": None, "big": 2**70, "n": np.int64(3), "x": np.float32(0.5),
             "text": "1", "pair": ("x", "y"), "array": np.arange(3)}  # fmt: skip
    encoded = encode_attrs(attrs)
    assert all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in encoded.values())
    assert encoded["text"] == "1" and encoded["n"] == 3 and type(encoded["n"]) is int and encoded["x"] == 0.5
    assert set(encoded[JSON_ATTRS].split()) == {"settings", "members", "hksj", "rows", "none", "big", "pair", "array"}
    assert encode_attrs(encoded) == encoded  # idempotent
    decoded = decode_attrs(encoded)
    assert decoded == {**attrs, "pair": ["x", "y"], "array": [0, 1, 2]}  # JSON has lists, not tuples or arrays
    assert decode_attrs(decoded) == decoded


def test_open_run__an_old_store_with_dict_attrs_still_reads(tmp_path, example_loci):
    path = str(tmp_path / "old.zarr")
    store.create_store(path, store.ism_template(example_loci, ["m0"], ["t0"], 16), fingerprint="fp", attrs={},
                       chunk_loci=16)  # fmt: skip
    old = {"settings": {"chunk_loci": 16, "head": {"tasks": None}}, "model_sources": ["m.pt"], "mc_dropout": 0}
    zarr.open_group(path, path=schema.ISM, mode="r+").attrs.put({**old, store.FINGERPRINT_ATTR: "fp"})  # as before
    ism = store.open_run(path)[schema.ISM]
    assert {k: ism.attrs[k] for k in old} == old and ism.attrs[store.FINGERPRINT_ATTR] == "fp"
    assert store.read_fingerprint(path) == "fp"


def test_write_group__python_api_records_the_process_once_and_the_group_writes_to_netcdf(tmp_path):
    path = str(tmp_path / "api.zarr")
    ds = xr.Dataset({"x": ("locus", np.arange(3.0)), "done": ("locus", np.array([True, False, True]))},
                    coords={"locus": ["a", "b", "c"], "task": ("locus", np.array(["t0", "t1", "t0"]))},
                    attrs={"settings": {"head": {"tasks": [0, 1]}}, "hksj": True, "n": 3})  # fmt: skip
    for group in (schema.EFFECTS, "other"):
        store.write_group(path, ds, group)
    lines = zarr.open_group(path, mode="r").attrs["history"].splitlines()
    assert len(lines) == 1 and LINE.fullmatch(lines[0]).group(1).startswith("python ")
    written = xr.open_zarr(path, group="other", consolidated=False)
    assert written["locus"].attrs["long_name"] == "locus id" and "long_name" not in written["x"].attrs  # unregistered
    assert written.attrs["title"] == "deepmr-dist run store, group other" and written.attrs["history"] == lines[0]
    written.to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    with xr.open_dataset(tmp_path / "other.nc", engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), written.load())
        assert decode_attrs(back.attrs) == {**ds.attrs, **store.global_attrs("other", lines[0])}
    np.testing.assert_array_equal(written["x"].values, ds["x"].values)


def test_command_text__hides_the_storage_options():
    text = provenance.command_text("deepmr", ["run", "p.yaml", "--storage-options", '{"secret": 1}', "--storage-options={}"])
    assert text == f"deepmr run p.yaml --storage-options '{provenance.REDACTED}' '--storage-options={provenance.REDACTED}'"
