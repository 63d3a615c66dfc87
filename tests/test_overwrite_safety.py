"""Nothing a call did not create is removed or overwritten, unless ``--overwrite`` meets a recognisable deepmr store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.io import store
from deepmr_dist.cli import main
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.errors import StoreError
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.stages.predict import ISMSettings, PredictReport, predict

ENSEMBLE = ModelSpec((EXAMPLE_ENSEMBLE,))
SETTINGS = ISMSettings(chunk_loci=4, incremental=False)


@pytest.fixture(scope="module")
def loci(example_loci):
    """The first 8 example loci: two chunks of 4."""
    return example_loci.isel(locus=slice(0, 8))


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _foreign_directory(tmp_path: Path) -> Path:
    """A directory of someone else's: one file, ``notes.txt``."""
    folder = tmp_path / "d"
    folder.mkdir()
    (folder / "notes.txt").write_text("x\n")
    return folder


def _full_store(path: str, loci: xr.Dataset, client) -> None:
    """A complete store with ``ism``, ``effects`` and a ``meta`` group."""
    predict(loci, ENSEMBLE, path, client=client, settings=SETTINGS, progress=False)
    store.write_group(path, compute_effects(store.open_run(path)["ism"]), "effects")
    store.write_group(path, xr.Dataset({"global_ce": ("pair", np.array([0.5]))}), "meta")


def _one_error_line(stderr: str, command: str) -> str:
    """The single ``deepmr COMMAND: error:`` line of ``stderr``; no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"deepmr {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _cli_error(capsys, args: list[str]) -> str:
    """Run ``deepmr ARGS`` in this process; it must fail with exit code 2 and one error line."""
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    return _one_error_line(err, args[0])


# ----------------------------------------------------------------------------- what lies at a path


def test_inspect_target__tells_nothing_empty_store_and_other_apart(tmp_path, loci, client):
    assert store.inspect_target(str(tmp_path / "none")).kind == "absent"
    (tmp_path / "empty").mkdir()
    assert store.inspect_target(str(tmp_path / "empty")).kind == "empty"
    (tmp_path / "file").write_text("x")
    assert "it is a file" in store.inspect_target(str(tmp_path / "file")).problem
    assert store.inspect_target(str(_foreign_directory(tmp_path))).kind == "other"
    path = str(tmp_path / "run.zarr")
    predict(loci, ENSEMBLE, path, client=client, settings=SETTINGS, progress=False)
    target = store.inspect_target(path)
    assert (target.kind, target.problem) == ("store", None) and target.fingerprint == store.read_fingerprint(path)
    root = json.loads((tmp_path / "run.zarr" / "zarr.json").read_text())
    assert root["attributes"][store.STORE_ATTR] == store.STORE_LAYOUT


def test_inspect_target__store_written_before_the_marker_is_recognised_by_its_fingerprint(tmp_path, loci, client):
    path = tmp_path / "run.zarr"
    predict(loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False)
    root = json.loads((path / "zarr.json").read_text())
    (path / "zarr.json").write_text(json.dumps({**root, "attributes": {}}))
    assert store.inspect_target(str(path)).kind == "store"
    report = PredictReport.of(predict(loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 0  # resumed, not replaced


def test_inspect_target__unmarked_zarr_group_is_not_a_deepmr_store(tmp_path):
    path = tmp_path / "other.zarr"
    xr.Dataset({"a": ("x", np.arange(3))}).to_zarr(path, mode="w", consolidated=False)
    target = store.inspect_target(str(path))
    assert target.kind == "other" and store.STORE_ATTR in target.problem


# ----------------------------------------------------------------------------- a directory that is not a store


def test_cli_predict__directory_that_is_not_a_store_survives_with_and_without_overwrite(tmp_path, client):
    folder = _foreign_directory(tmp_path)
    command = [sys.executable, "-m", "deepmr_dist.cli", "predict", "--quiet", "--model", EXAMPLE_ENSEMBLE,
               "--fasta", str(EXAMPLE_FASTA), "--store", str(folder), "--cluster", client.scheduler.address]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for extra in ([], ["--overwrite"]):
        done = subprocess.run(command + extra, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode != 0, done.stdout
        line = _one_error_line(done.stderr, "predict")
        assert str(folder) in line and "is not a deepmr store" in line and "refusing to overwrite" in line, line
        assert ("even with --overwrite" in line) == bool(extra), line
        assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
        assert (folder / "notes.txt").read_text() == "x\n"


@pytest.mark.parametrize("overwrite", [False, True])
def test_predict__directory_that_is_not_a_store_is_refused_untouched(tmp_path, loci, client, overwrite):
    folder = _foreign_directory(tmp_path)
    with pytest.raises(StoreError, match="is not a deepmr store.*; refusing to overwrite") as err:
        predict(loci, ENSEMBLE, str(folder), client=client, settings=SETTINGS, overwrite=overwrite, progress=False)
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(folder) == {"notes.txt": b"x\n"}


def test_write_group__directory_that_is_not_a_store_is_refused_untouched(tmp_path):
    folder = _foreign_directory(tmp_path)
    with pytest.raises(StoreError, match="is not a deepmr store"):
        store.write_group(str(folder), xr.Dataset({"a": ("x", np.arange(3))}), "mr")
    assert _snapshot(folder) == {"notes.txt": b"x\n"}


def test_cli_run__store_that_is_not_a_store_is_refused_before_any_stage(tmp_path, capsys, client):
    folder = _foreign_directory(tmp_path)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sequences: {{fasta: {EXAMPLE_FASTA}}}\nmodel: {{sources: ['{EXAMPLE_ENSEMBLE}']}}\nstore: {folder}\n"
    )
    line = _cli_error(capsys, ["run", str(pipeline), "--cluster", client.scheduler.address, "--quiet"])
    assert str(folder) in line and "is not a deepmr store" in line, line
    assert _snapshot(folder) == {"notes.txt": b"x\n"}
    assert not (tmp_path / "d-outputs").exists()


# ----------------------------------------------------------------------------- a damaged store


DAMAGES = {
    "unparsable": "{broken",
    "empty": "",
    "an array": '{"zarr_format": 3, "node_type": "array"}',
    "no fingerprint": '{"zarr_format": 3, "node_type": "group", "attributes": {}}',
    "missing": None,
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_predict__damaged_ism_metadata_keeps_every_other_group(tmp_path, capsys, loci, client, damage):
    path = tmp_path / "run.zarr"
    _full_store(str(path), loci, client)
    metadata = path / "ism" / "zarr.json"
    if DAMAGES[damage] is None:
        metadata.unlink()
    else:
        metadata.write_text(DAMAGES[damage])
    before = _snapshot(path)
    assert any(k.startswith("effects/effect/") for k in before) and "meta/zarr.json" in before

    with pytest.raises(StoreError, match="ism/zarr.json .*refusing to continue.*--overwrite") as err:
        predict(loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert _snapshot(path) == before
    line = _cli_error(capsys, ["effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet"])
    assert f"{path}/ism/zarr.json" in line, line
    assert _snapshot(path) == before


def test_predict__overwrite_replaces_a_store_with_damaged_ism_metadata(tmp_path, loci, client):
    path = tmp_path / "run.zarr"
    _full_store(str(path), loci, client)
    (path / "ism" / "zarr.json").write_text("{broken")
    report = PredictReport.of(predict(loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, overwrite=True, progress=False))
    assert report.chunks_computed == 2
    assert set(store.open_run(str(path))) == {"ism"}
    assert store.open_run(str(path))["ism"]["complete"].values.all()


def test_predict__store_with_damaged_root_metadata_is_refused_even_with_overwrite(tmp_path, loci, client):
    path = tmp_path / "run.zarr"
    _full_store(str(path), loci, client)
    (path / "zarr.json").write_text("{")
    before = _snapshot(path)
    with pytest.raises(StoreError, match="zarr.json is damaged.*not recognisably a deepmr store.*even with --overwrite"):
        predict(loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, overwrite=True, progress=False)
    assert _snapshot(path) == before


# ----------------------------------------------------------------------------- empty directories, file:// URLs


def test_predict__existing_empty_directory_becomes_the_store(tmp_path, loci, client):
    folder = tmp_path / "empty"
    folder.mkdir()
    report = PredictReport.of(predict(loci, ENSEMBLE, str(folder), client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 2
    assert store.open_run(str(folder))["ism"]["complete"].values.all()
    assert store.inspect_target(str(folder)).kind == "store"


def test_predict__file_url_store_goes_into_an_existing_empty_folder_and_creates_missing_ones(tmp_path, loci, client):
    folder = tmp_path / "empty"
    folder.mkdir()
    report = PredictReport.of(predict(loci, ENSEMBLE, f"file://{folder}", client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 2 and folder.is_dir()
    assert store.open_run(f"file://{folder}")["ism"]["complete"].values.all()
    deep = tmp_path / "a" / "b" / "run.zarr"  # fsspec's local filesystem alone makes no parent folders
    assert PredictReport.of(predict(loci, ENSEMBLE, f"file://{deep}", client=client, settings=SETTINGS,
                                    progress=False)).chunks_computed == 2  # fmt: skip
    assert store.open_run(str(deep))["ism"]["complete"].values.all()


# ----------------------------------------------------------------------------- --overwrite on a real store


def test_cli_predict__overwrite_still_replaces_a_deepmr_store_of_another_run(tmp_path, capsys, client):
    path = tmp_path / "run.zarr"
    args = ["predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(path),
            "--cluster", client.scheduler.address, "--full-recompute"]
    assert main([*args, "--chunk-loci", "16"]) == 0
    line = _cli_error(capsys, [*args, "--chunk-loci", "24"])
    assert str(path) in line and "different model, inputs or settings" in line and "--overwrite" in line, line
    assert store.ism_chunking(str(path)) == (48, 16)
    assert main([*args, "--chunk-loci", "24", "--overwrite"]) == 0
    assert store.ism_chunking(str(path)) == (48, 24)
    assert store.open_run(str(path))["ism"]["complete"].values.all()
