"""The `deepmr` command end to end on the bundled example: predict -> effects -> inspect -> lazy queries."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

import deepmr_dist
from deepmr_dist.cli import COMMANDS, main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "loci.fa"
MODEL = "deepmr_dist.models.examples:simulation_ensemble"


def test_cli__predict_effects_inspect_on_the_bundled_example(tmp_path, capsys):
    store = str(tmp_path / "run.zarr")
    args = ["--model", MODEL, "--fasta", str(EXAMPLE), "--store", store, "--n-workers", "1", "--quiet"]
    assert main(["predict", *args, "--chunk-loci", "24", "--tasks", "1,0", "--task-names", "exposure,outcome"]) == 0
    captured = capsys.readouterr()
    assert "48 loci in 2 chunks; computed 2 chunk(s), 43,200 mutant predictions" in captured.out
    assert "Dask dashboard" not in captured.err and "locus/s" not in captured.err  # --quiet: no INFO lines, no progress bar
    assert main(["effects", "--store", store, "--n-workers", "1", "-v"]) == 0
    err = capsys.readouterr().err
    assert "deepmr effects: [deepmr_dist.cluster] Dask dashboard at " in err
    assert "deepmr effects: debug: [deepmr_dist.cluster] embedded LocalCluster of 1 worker(s)" in err
    assert main(["inspect", "--store", store]) == 0
    out = capsys.readouterr().out
    assert "ISM complete: 48/48 loci" in out and "[effects]" in out

    run = deepmr_dist.open_run(store)
    assert set(run) == {"ism", "effects"}
    effects = xr.open_zarr(store, group="effects", consolidated=False)
    assert effects.task.values.tolist() == ["outcome", "exposure"]
    one = effects.effect.sel(locus="locus007", task="exposure").values
    ism = run["ism"].sel(locus="locus007", task="exposure")
    expected = (ism.mut_pred.astype("f8") - ism.ref_pred.astype("f8")).mean("member").values
    assert one.dtype == np.float32  # computed in float64, stored rounded once to float32 (half an ulp)
    np.testing.assert_allclose(one, expected, rtol=2.0**-24 * 1.01)
    assert np.isnan(one).sum() == 100  # one reference allele per position

    # rerun is a no-op: nothing left to compute
    assert main(["predict", *args, "--chunk-loci", "24", "--tasks", "1,0", "--task-names", "exposure,outcome"]) == 0
    assert "computed 0 chunk(s)" in capsys.readouterr().out


def test_cli__effects_on_incomplete_store_is_refused(tmp_path, capsys):
    from deepmr_dist.io import store
    from deepmr_dist.io.sequence import read_fasta

    path = str(tmp_path / "partial.zarr")
    template = store.ism_template(read_fasta(EXAMPLE), ["m0"], ["t0"], 16)
    store.create_store(path, template, fingerprint="x", attrs={}, chunk_loci=16)
    assert main(["effects", "--store", path, "--n-workers", "1", "--quiet"]) == 1
    assert "48 loci have no ISM predictions yet (first: 'locus000')" in capsys.readouterr().err


def test_import__the_package_loads_neither_torch_nor_distributed_until_an_api_name_is_used():
    import subprocess
    import sys

    code = (
        "import sys, deepmr_dist as dmr\n"
        "assert 'torch' not in sys.modules and 'distributed' not in sys.modules and 'dask' not in sys.modules\n"
        "assert callable(dmr.open_run) and 'dask' in sys.modules and 'torch' not in sys.modules\n"
        "assert sorted(dmr.__all__) == sorted(dir(dmr))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_cli__help_and_version_import_no_subcommand(capsys):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from deepmr_dist.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert not any(m.startswith('deepmr_dist.cli.') for m in sys.modules), sorted(sys.modules)\n"
        "assert 'torch' not in sys.modules and 'pandas' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=120, capture_output=True, text=True)
    assert "predict" in out.stdout and "simulate" in out.stdout
    version = subprocess.run([sys.executable, "-m", "deepmr_dist.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("deepmr-dist ")


def test_cli_run__a_study_yaml_dry_run_prints_the_studys_plan(capsys):
    from pathlib import Path

    from deepmr_dist.cli import main

    study = Path(__file__).resolve().parent.parent / "pipelines" / "paper_simulation.yaml"
    assert main(["run", str(study), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 scenarios (unconfounded, random, sequence, both) x 50 rounds = 200 rounds" in out
    assert "1,505,000 forward passes" in out  # 1,000 test loci x (3 x 100 + 1) x 5 members
    assert main(["simulate", str(study), "--dry-run", "--rounds", "3"]) == 0
    assert "x 3 rounds = 12 rounds" in capsys.readouterr().out


def test_is_study__tells_a_study_from_a_pipeline(tmp_path):
    from pathlib import Path

    from deepmr_dist.pipeline.api import is_study

    pipelines = Path(__file__).resolve().parent.parent / "pipelines"
    assert is_study(pipelines / "paper_simulation.yaml") and is_study(pipelines / "simulation_reduced.yaml")
    assert not is_study(pipelines / "quickstart.yaml") and not is_study(pipelines / "bpnet_four_tf_pairs.yaml")
    (tmp_path / "broken.yaml").write_text("rounds: [1,\n")
    assert not is_study(tmp_path / "broken.yaml")  # left to the pipeline loader to report


def test_configs__load_without_torch_or_distributed():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from deepmr_dist.pipeline.api import load_pipeline, load_study\n"
        "load_pipeline('pipelines/quickstart.yaml'); load_study('pipelines/paper_simulation.yaml')\n"
        "assert 'torch' not in sys.modules and 'distributed' not in sys.modules, 'heavy import'\n"
    )
    from pathlib import Path

    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)


# ----------------------------------------------------------------------------- options, messages, exit codes


@pytest.mark.parametrize("command", list(COMMANDS))
def test_cli__every_subcommand_takes_verbose_and_quiet(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "-v, --verbose" in out and "-q, --quiet" in out, out


def meta_table(path: Path, bad_row: bool = False) -> str:
    frame = pd.DataFrame({"group": ["g"] * 4, "estimate": [0.1, 0.3, 0.2, 0.25], "se": [0.1, 0.2, 0.15, 0.1]})
    if bad_row:
        frame.loc[1, "se"] = -1.0
    frame.to_csv(path, index=False)
    return str(path)


def test_cli__info_by_default_nothing_with_quiet_debug_with_verbose(tmp_path, capsys):
    table, out = meta_table(tmp_path / "in.csv"), str(tmp_path / "out.csv")
    logger = logging.getLogger("deepmr_dist")
    before = (list(logger.handlers), logger.level, logger.propagate)
    assert main(["meta", table, "--out", out]) == 0
    assert capsys.readouterr().err == f"deepmr meta: wrote {out}: 1 row(s)\n"
    assert main(["meta", table, "--out", out, "-q"]) == 0
    assert capsys.readouterr().err == ""
    assert main(["meta", table, "--out", out, "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "deepmr meta: debug: [deepmr_dist.cli] deepmr-dist " in err
    assert f"deepmr meta: debug: [deepmr_dist.cli.meta] {table}: 1 group(s), 0 row(s) excluded" in err
    assert f"deepmr meta: [deepmr_dist.cli.meta] wrote {out}: 1 row(s)" in err
    assert (list(logger.handlers), logger.level, logger.propagate) == before  # main leaves logging as it found it


def test_cli__quiet_keeps_warnings(tmp_path, capsys):
    table = meta_table(tmp_path / "in.csv", bad_row=True)
    assert main(["meta", table, "--out", str(tmp_path / "out.csv"), "-q"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"deepmr meta: warning: {table}: excluded 1 invalid row(s)"), err


@pytest.mark.parametrize(
    ("command", "method", "message"),
    [
        ("meta", "dl,sj", "deepmr meta: error: --method: unknown meta-analysis method 'sj'; valid: fe, dl, reml, pm"),
        ("mr", "ivw,bogus", "deepmr mr: error: --method: unknown MR method(s) 'bogus'; valid: ivw, "),
    ],
)
def test_cli__bad_method_exits_1_with_one_line_and_no_traceback(tmp_path, command, method, message):
    table = tmp_path / "in.csv"
    if command == "meta":
        meta_table(table)
    else:
        frame = {"locus": ["l"] * 3, "bx": [0.5, 0.4, 0.6], "bxse": [0.1] * 3, "by": [1.0, 0.8, 1.2], "byse": [0.1] * 3}
        pd.DataFrame(frame).to_csv(table, index=False)
    proc = subprocess.run(
        [sys.executable, "-m", "deepmr_dist.cli", command, str(table), "--method", method, "--out", str(tmp_path / "o.csv")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stdout == "" and proc.stderr.count("\n") == 1 and proc.stderr.startswith(message), proc.stderr
    assert not (tmp_path / "o.csv").exists()


def test_cli__usage_errors_exit_2(tmp_path, capsys):
    table = meta_table(tmp_path / "in.csv")
    for argv in (["meta", table], ["nope"], ["meta", table, "--out", "o.csv", "-q", "-v"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2, argv
    assert "not allowed with argument" in capsys.readouterr().err


def test_cli_run__bad_names_in_a_pipeline_yaml_name_the_field_and_the_valid_choices(tmp_path, capsys):
    quickstart = (Path(__file__).resolve().parents[1] / "pipelines" / "quickstart.yaml").read_text()
    bad = quickstart.replace("rule: pooled_z", "rule: pooled").replace("method: dl", "method: sj")
    (tmp_path / "bad.yaml").write_text(bad + "tasks:\n  transform: exp\n")
    assert main(["run", str(tmp_path / "bad.yaml"), "--dry-run", "-q"]) == 1
    err = capsys.readouterr().err
    assert "instruments.rule: unknown instrument rule 'pooled'; valid: pooled_z, mutation_z" in err
    assert "meta.method: unknown meta-analysis method 'sj'; valid: fe, dl, reml, pm" in err
    assert "tasks.transform: unknown transform 'exp'; valid: none, sigmoid, log1p" in err


def test_cli__file_url_store_creates_its_folders(tmp_path, capsys, client):
    store = tmp_path / "deep" / "er" / "run.zarr"
    args = ["--model", MODEL, "--fasta", str(EXAMPLE), "--store", f"file://{store}", "--cluster", client.scheduler.address]
    assert main(["predict", *args, "--chunk-loci", "24", "--quiet"]) == 0
    assert "computed 2 chunk(s)" in capsys.readouterr().out
    assert xr.open_zarr(store, group="ism", consolidated=False)["complete"].values.all()


def test_cli__memory_store_with_worker_processes_is_refused_in_one_line(capsys, client):
    args = ["--model", MODEL, "--fasta", str(EXAMPLE), "--store", "memory://eco/run.zarr", "--cluster", client.scheduler.address]
    assert main(["predict", *args, "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepmr predict: error: memory://eco/run.zarr: a memory:// store lives in one process")


@pytest.mark.parametrize("text, why", [("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object, got list")])
def test_cli__bad_storage_options_are_one_line(tmp_path, capsys, text, why):
    assert main(["verify", "--store", str(tmp_path / "x.zarr"), "--storage-options", text]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--storage-options {why}" in err[0]
