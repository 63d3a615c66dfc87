"""Stores, outputs and model files on a real S3 API: moto's server on 127.0.0.1 (tests/moto_s3.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.models.examples import simulation_ensemble
from moto_s3 import s3_server

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


def _pipeline(path: Path, store: str, storage_options: dict | None) -> str:
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {"sources": [EXAMPLE_ENSEMBLE]},
        "ism": {"chunk_loci": 16},
        "mr": {"methods": ["ivw", "egger"]},
        "store": store,
        "report": False,
        **({"storage_options": storage_options} if storage_options else {}),
    }
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _predict_effects_run(store: str, yaml_path: str, address: str, options: list[str]) -> None:
    common = ["--store", store, *options]
    assert main(["predict", "--fasta", str(EXAMPLE_FASTA), "--model", EXAMPLE_ENSEMBLE, "--chunk-loci", "16",
                 "--cluster", address, "--quiet", *common]) == 0  # fmt: skip
    assert main(["effects", "--cluster", address, "--quiet", *common]) == 0
    assert main(["run", yaml_path, "--cluster", address, "--quiet"]) == 0


def _assert_same_groups(remote: dict[str, xr.Dataset], local: dict[str, xr.Dataset]) -> None:
    assert set(remote) == set(local) == {"ism", "effects", "mr", "meta"}
    for group, expected in local.items():
        actual = remote[group]
        assert set(actual.data_vars) == set(expected.data_vars), group
        for name in expected.data_vars:
            a, e = actual[name].values, expected[name].values
            if a.dtype.kind == "f":
                np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-7, equal_nan=True, err_msg=f"{group}/{name}")
            else:
                np.testing.assert_array_equal(a, e, err_msg=f"{group}/{name}")


@pytest.mark.slow  # about 28 s: two predict -> effects -> run sequences
def test_s3__predict_effects_run_equal_the_same_run_on_a_local_path(tmp_path, s3, client):
    address = client.scheduler.address
    url = s3.url("eq/run.zarr")
    options = ["--storage-options", json.dumps(s3.storage_options)]
    _predict_effects_run(url, _pipeline(tmp_path / "s3.yaml", url, s3.storage_options), address, options)
    local = str(tmp_path / "run.zarr")
    _predict_effects_run(local, _pipeline(tmp_path / "local.yaml", local, None), address, [])

    # no project code: xarray and s3fs alone read the store lazily
    remote = {g: xr.open_zarr(url, group=g, consolidated=False, storage_options=s3.storage_options)
              for g in ("ism", "effects", "mr", "meta")}  # fmt: skip
    assert remote["ism"]["mut_pred"].chunks is not None  # dask-backed, read on demand
    _assert_same_groups(remote, {g: xr.open_zarr(local, group=g, consolidated=False) for g in remote})

    # the outputs are a sibling on the bucket, never a local folder named after it
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    listed = {p.rpartition("/")[2] for p in fs.ls(f"{s3.bucket}/eq")}
    assert {"run.zarr", "run"} <= listed
    table = pd.read_csv(fs.open(f"{s3.bucket}/eq/run/global_ce.csv"))
    pd.testing.assert_frame_equal(table, pd.read_csv(tmp_path / "run" / "global_ce.csv"), rtol=1e-6)
    assert not yaml.safe_load(fs.cat_file(f"{s3.bucket}/eq/run/pipeline.yaml")).get("storage_options")  # no credentials
    assert not Path(s3.bucket).exists() and not (tmp_path / s3.bucket).exists()


def test_s3__model_state_dicts_read_from_the_bucket_equal_the_same_files_read_locally(tmp_path, s3, client, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3.storage_options)
    ensemble = simulation_ensemble(2, 100)
    local_models, remote_models = [], []
    for index, member in enumerate(ensemble):
        path = tmp_path / f"m{index}.pt"
        torch.save(member.state_dict(), path)
        fs.put_file(str(path), f"{s3.bucket}/models/m{index}.pt")
        local_models += ["--model", str(path)]
        remote_models += ["--model", s3.url(f"models/m{index}.pt")]
    # credentials and endpoint from the environment, as s3fs reads them, in the client and on the workers
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_ENDPOINT_URL": s3.endpoint,
           "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    client.run(lambda values: os.environ.update(values), env)  # a lambda: a bound os.environ.update would be pickled with a copy
    try:
        address = client.scheduler.address
        common = ["--fasta", str(EXAMPLE_FASTA), "--chunk-loci", "16", "--cluster", address, "--quiet"]
        assert main(["predict", *common, *remote_models, "--store", str(tmp_path / "remote.zarr")]) == 0
        assert main(["predict", *common, *local_models, "--store", str(tmp_path / "local.zarr")]) == 0
    finally:
        client.run(lambda keys: [os.environ.pop(k, None) for k in keys], list(env))
    remote = xr.open_zarr(tmp_path / "remote.zarr", group="ism", consolidated=False)
    local = xr.open_zarr(tmp_path / "local.zarr", group="ism", consolidated=False)
    assert remote.sizes["member"] == 2
    np.testing.assert_array_equal(remote["mut_pred"].values, local["mut_pred"].values)  # the same weights, same cluster


def test_s3__missing_model_file_is_one_line_naming_the_url(tmp_path, s3, capsys, monkeypatch):
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    url = s3.url("models/absent.pt")
    code = main(["predict", "--fasta", str(EXAMPLE_FASTA), "--model", url, "--store", str(tmp_path / "x.zarr"),
                 "--n-workers", "1", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and url in err[0] and err[0].startswith("deepmr predict: error: ")
