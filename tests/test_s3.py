"""Stores, outputs and model files on a real S3 API: moto's server on 127.0.0.1 (tests/moto_s3.py)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
import zarr

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, embedded_client
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


# ----------------------------------------------------------------------------- a worker killed mid-run


def _complete_loci(url: str, storage_options: dict) -> int:
    """Loci marked complete in the store at ``url`` (0 while it is being created)."""
    try:
        return int(zarr.open_array(url, path="ism/complete", mode="r", storage_options=storage_options)[:].sum())
    except Exception:  # not created yet, or caught mid-write
        return 0


def _assert_identical_groups(actual: xr.Dataset, expected: xr.Dataset) -> None:
    """Every variable and coordinate of two groups: same names, dims, dtypes and bits (NaN == NaN)."""
    assert set(actual.variables) == set(expected.variables)
    for name, variable in expected.variables.items():
        assert actual[name].dims == variable.dims and actual[name].dtype == variable.dtype, name
        np.testing.assert_array_equal(actual[name].values, variable.values, err_msg=name)


@pytest.mark.slow  # 13-31 s on 2 shared cores: a cluster of its own, an undisturbed run, the killed one and a rerun
def test_s3__worker_killed_mid_predict__the_store_equals_an_undisturbed_run(tmp_path, s3, capsys):
    url, local = s3.url("killed/run.zarr"), str(tmp_path / "run.zarr")
    common = ["--fasta", str(EXAMPLE_FASTA), "--model", EXAMPLE_ENSEMBLE, "--chunk-loci", "2", "--full-recompute", "--quiet"]
    options = ["--storage-options", json.dumps(s3.storage_options)]
    with embedded_client() as client:  # 2 worker processes of 1 thread, each under a nanny that restarts it
        address = client.scheduler.address
        assert main(["predict", *common, "--cluster", address, "--store", local]) == 0  # undisturbed

        codes: list[int] = []
        run = threading.Thread(target=lambda: codes.append(main(["predict", *common, "--cluster", address, "--store", url, *options])))
        run.start()
        deadline = time.monotonic() + 120
        while _complete_loci(url, s3.storage_options) < 2 and run.is_alive():
            assert time.monotonic() < deadline, "timed out waiting for the first complete chunk"
            time.sleep(0.05)
        done = _complete_loci(url, s3.storage_options)
        victim = next(iter(client.run(os.getpid).values()))  # a worker process of the cluster this test started
        os.kill(victim, signal.SIGKILL)
        assert run.is_alive() and 2 <= done < 48, f"the run ended before its worker was killed ({done} loci done)"
        run.join(300)
        assert codes == [0]  # the killed worker's tasks ran again on the other worker or on its restarted self
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()
        capsys.readouterr()
        assert main(["predict", *common, "--cluster", address, "--store", url, *options]) == 0  # the rerun: nothing left
        assert "computed 0 chunk(s)" in capsys.readouterr().out

    remote = xr.open_zarr(url, group="ism", consolidated=False, storage_options=s3.storage_options)
    _assert_identical_groups(remote, xr.open_zarr(local, group="ism", consolidated=False))
    assert int(remote["complete"].sum()) == 48


# ----------------------------------------------------------------------------- --storage-options on every command

AWS_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                 "AWS_PROFILE")  # fmt: skip


@pytest.fixture()
def no_aws_environment(monkeypatch):
    """Neither credentials nor endpoint in the environment: the bucket is reachable through storage options alone."""
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def _fs(s3):
    import s3fs

    return s3fs.S3FileSystem(**s3.storage_options)


def test_s3__mr_and_meta_read_tables_from_the_bucket_and_write_there(tmp_path, s3, no_aws_environment):
    rng = np.random.default_rng(3)
    bx, byse = rng.uniform(0.2, 1.0, 6), rng.uniform(0.05, 0.1, 6)
    by = 0.7 * bx + rng.normal(0, byse)
    table = pd.DataFrame({"locus": "L1", "bx": bx, "bxse": 0.02, "by": by, "byse": byse})
    fs, options = _fs(s3), ["--storage-options", json.dumps(s3.storage_options)]
    fs.pipe_file(f"{s3.bucket}/tables/in.csv", table.to_csv(index=False).encode())
    assert main(["mr", s3.url("tables/in.csv"), "--method", "ivw", "--out", s3.url("tables/mr.parquet"), *options]) == 0
    mr = pd.read_parquet(s3.url("tables/mr.parquet"), storage_options=s3.storage_options)
    w = 1 / byse**2  # IVW: sum(w bx by) / sum(w bx^2), the closed form
    assert mr["estimate"].item() == pytest.approx(np.sum(w * bx * by) / np.sum(w * bx**2), rel=1e-12)

    studies = pd.DataFrame({"estimate": [0.1, 0.4, 0.25], "se": [0.1, 0.2, 0.05]})
    fs.pipe_file(f"{s3.bucket}/tables/studies.parquet", studies.to_parquet(index=False))
    assert main(["meta", s3.url("tables/studies.parquet"), "--method", "fe", "--out", s3.url("tables/meta.csv"), *options]) == 0
    meta = pd.read_csv(fs.open(f"{s3.bucket}/tables/meta.csv"))
    w = 1 / studies["se"] ** 2  # fixed effect: the inverse-variance weighted mean
    assert meta["estimate"].item() == pytest.approx(float((w * studies["estimate"]).sum() / w.sum()), rel=1e-12)
    assert not Path(s3.bucket).exists() and not Path("s3:").exists()


def test_s3__a_missing_table_on_the_bucket_is_one_line_naming_it(tmp_path, s3, capsys, no_aws_environment):
    url = s3.url("tables/absent.csv")
    code = main(["meta", url, "--out", str(tmp_path / "meta.csv"), "--storage-options", json.dumps(s3.storage_options)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err == [f"deepmr meta: error: {url}: file not found"]


@pytest.fixture(scope="module")
def example_run(tmp_path_factory, client) -> Path:
    """A local store of the example through `deepmr run` (ism, effects, mr, meta), no report."""
    folder = tmp_path_factory.mktemp("example_run")
    store = folder / "run.zarr"
    assert main(["run", _pipeline(folder / "p.yaml", str(store), None), "--cluster", client.scheduler.address, "--quiet"]) == 0
    return store


def test_s3__export_and_report_read_the_store_on_the_bucket_and_write_there(tmp_path, s3, example_run, capsys,
                                                                            no_aws_environment):  # fmt: skip
    fs, url = _fs(s3), s3.url("exported/run.zarr")
    fs.put(str(example_run), f"{s3.bucket}/exported/run.zarr", recursive=True)  # the same store, on the bucket
    options = ["--storage-options", json.dumps(s3.storage_options)]
    for what, extra in (("effects", []), ("instruments", ["--pair", "task0->task1"])):
        local = tmp_path / f"{what}.tsv"
        assert main(["export", "--store", str(example_run), "--what", what, *extra, "--out", str(local)]) == 0
        remote = s3.url(f"exported/{what}.tsv")
        assert main(["export", "--store", url, *options, "--what", what, *extra, "--out", remote]) == 0
        assert fs.cat_file(remote.removeprefix("s3://")) == local.read_bytes(), what
    assert main(["export", "--store", url, *options, "--what", "local_ce"]) == 0  # default: beside the store, on the bucket
    assert fs.exists(f"{s3.bucket}/exported/run_local_ce.tsv")

    # the exported instruments are `deepmr mr`'s input, read from the bucket
    assert main(["mr", s3.url("exported/instruments.tsv"), "--method", "ivw", "--out", s3.url("exported/mr.csv"), *options]) == 0
    assert main(["mr", str(tmp_path / "instruments.tsv"), "--method", "ivw", "--out", str(tmp_path / "mr.csv")]) == 0
    assert fs.cat_file(f"{s3.bucket}/exported/mr.csv") == (tmp_path / "mr.csv").read_bytes()

    capsys.readouterr()
    assert main(["report", "--store", url, *options, "--out", s3.url("exported/report.html")]) == 0
    assert capsys.readouterr().out.startswith(f"{s3.url('exported/report.html')} (")
    document = fs.cat_file(f"{s3.bucket}/exported/report.html").decode()
    assert document.startswith("<!DOCTYPE html>") and "task0-&gt;task1" in document and "Forest plot" in document
    assert not Path(s3.bucket).exists() and not Path("s3:").exists()


def test_s3__simulate_refuses_a_study_directory_at_a_url_in_one_line(capsys):
    code = main(["simulate", "pipelines/simulation_reduced.yaml", "--out", "s3://bucket/study", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith("deepmr simulate: error: study directory s3://bucket/study: ")
    assert not Path("s3:").exists()


# ----------------------------------------------------------------------------- models at URLs, trained members


def test_s3__model_urls_read_with_storage_options_alone_equal_the_local_files(tmp_path, s3, client, capsys, no_aws_environment):
    fs = _fs(s3)
    local_models, remote_models = [], []
    for index, member in enumerate(simulation_ensemble(2, 100)):
        path = tmp_path / f"m{index}.pt"
        torch.save(member.state_dict(), path)
        fs.put_file(str(path), f"{s3.bucket}/options/m{index}.pt")
        local_models += ["--model", str(path)]
        remote_models += ["--model", s3.url(f"options/m{index}.pt")]
    assert client.run(lambda: sorted(set(AWS_VARIABLES) & set(os.environ))) == dict.fromkeys(client.run(os.getpid), [])
    common = ["--fasta", str(EXAMPLE_FASTA), "--chunk-loci", "16", "--cluster", client.scheduler.address, "--quiet"]
    url, options = s3.url("options/run.zarr"), ["--storage-options", json.dumps(s3.storage_options)]
    assert main(["predict", *common, *remote_models, "--store", url, *options]) == 0
    assert main(["predict", *common, *local_models, "--store", str(tmp_path / "local.zarr"), *options]) == 0  # unused here
    for store in (url, str(tmp_path / "local.zarr")):  # the options serve a store on the bucket and are ignored for a local one
        capsys.readouterr()
        assert main(["inspect", "--store", store, *options]) == 0 and "ISM complete: 48/48 loci" in capsys.readouterr().out
        assert main(["verify", "--store", store, *options, "--full"]) == 0
    remote = xr.open_zarr(url, group="ism", consolidated=False, storage_options=s3.storage_options)
    local = xr.open_zarr(tmp_path / "local.zarr", group="ism", consolidated=False)
    assert remote.attrs["model_fingerprint"] == local.attrs["model_fingerprint"]  # the same weights
    for name in ("ref_pred", "mut_pred"):
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)


def test_s3__model_storage_options_default_to_the_store_s_and_are_never_written_or_shown(s3):
    from deepmr_dist.models.ensemble import ModelSpec
    from deepmr_dist.pipeline.config import PipelineConfig
    from deepmr_dist.pipeline.config_types import dump_config, parse_config
    from deepmr_dist.pipeline.plan import model_spec

    data = {"sequences": {"fasta": str(EXAMPLE_FASTA)}, "model": {"sources": [s3.url("m0.pt")]},
            "store": s3.url("run.zarr"), "storage_options": s3.storage_options}  # fmt: skip
    assert model_spec(parse_config(data, PipelineConfig, "p.yaml")).storage_options == s3.storage_options
    own = {"anon": True}
    config = parse_config({**data, "model": {**data["model"], "storage_options": own}}, PipelineConfig, "p.yaml")
    spec = model_spec(config)
    assert spec.storage_options == own
    assert "anon" not in dump_config(config) and "storage_options" not in config.model.model_dump()
    assert "testing" not in repr(ModelSpec((s3.url("m0.pt"),), storage_options=s3.storage_options))


def _simulation_pipeline(path: Path, store: str) -> str:
    data = {
        "sequences": {"simulation": {"generator": {"n_train": 300, "n_test": 8, "n_calibration": 0}}},
        "model": {"train_simulation": True, "members": 2, "training": {"epochs": 1}},
        "ism": {"chunk_loci": 8}, "mr": {"methods": ["ivw"]}, "store": store, "report": False,
    }  # fmt: skip
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.slow  # 14-24 s on 2 shared cores: two simulation runs on the bucket (train, ISM, MR), one on a local path
def test_s3__trained_members_go_to_the_bucket_and_a_rerun_reuses_them(tmp_path, s3, client, capsys, no_aws_environment):
    fs, url = _fs(s3), s3.url("sim/run.zarr")
    run = ["run", _simulation_pipeline(tmp_path / "s3.yaml", url), "--storage-options", json.dumps(s3.storage_options),
           "--cluster", client.scheduler.address]  # fmt: skip
    assert main(run) == 0
    members = [f"{s3.bucket}/sim/run/members/member-{i}.{suffix}" for i in range(2) for suffix in ("pt", "json")]
    stamps = [fs.info(member)["LastModified"] for member in members]  # raises if one is missing

    capsys.readouterr()
    assert main(run) == 0  # the rerun loads the members from the bucket, by the ledger's fingerprint
    assert "model: unchanged, skipped" in capsys.readouterr().err
    fs.invalidate_cache()
    assert [fs.info(member)["LastModified"] for member in members] == stamps

    local = tmp_path / "run.zarr"
    assert main(["run", _simulation_pipeline(tmp_path / "local.yaml", str(local)), "--cluster", client.scheduler.address,
                 "--quiet"]) == 0  # fmt: skip
    for index in range(2):  # the same training on the same cluster: the same weights
        remote = torch.load(fs.open(f"{s3.bucket}/sim/run/members/member-{index}.pt"), weights_only=True)
        expected = torch.load(tmp_path / "run" / "members" / f"member-{index}.pt", weights_only=True)
        assert remote.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(remote[name], tensor), name
    table = pd.read_csv(fs.open(f"{s3.bucket}/sim/run/global_ce.csv"))
    pd.testing.assert_frame_equal(table, pd.read_csv(tmp_path / "run" / "global_ce.csv"))
    assert not Path(s3.bucket).exists()
