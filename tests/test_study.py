"""The simulation study: one round end to end through the runner, resume and rescore, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from deepmr_dist.cli import main
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.errors import StoreError
from deepmr_dist.pipeline.config import StudyConfig
from deepmr_dist.pipeline.study import member_seeds, round_config, round_directory, run_round, run_study

# Small enough for CI, large enough that the ensemble learns the motifs (unconfounded scenario).
TINY = {
    "seed": 3,
    "scenarios": ["unconfounded"],
    "rounds": 1,
    "members": 3,
    "concurrent_rounds": 2,
    "generator": {"n_train": 1500, "n_test": 40, "n_calibration": 200},
    "training": {"epochs": 25},
    "analysis": {"chunk_loci": 20, "methods": ["egger_paper", "wald_mean"]},
}


def _config(**changes) -> StudyConfig:
    data = {**TINY, **changes}
    return parse_config(data, StudyConfig, "test")


# ----------------------------------------------------------------------------- config


def test_member_seeds__distinct_per_member_round_and_scenario():
    seeds = {s for scenario in (1, 2) for r in range(3) for s in member_seeds(0, scenario, r, 5)}
    assert len(seeds) == 2 * 3 * 5
    assert member_seeds(0, 1, 0, 5) == member_seeds(0, 1, 0, 5)


def test_round_config__is_a_pipeline_with_the_studys_settings_and_the_rounds_seeds(tmp_path):
    config = _config(analysis={**TINY["analysis"], "calibration": True, "meta_method": "reml"})
    pipeline = round_config(config, 1, 2, tmp_path / "r")
    simulation = pipeline.sequences.simulation
    assert (simulation.scenario, simulation.round, simulation.seed) == (1, 2, config.seed)
    assert simulation.generator == config.generator and pipeline.model.training == config.training
    assert pipeline.model.train_simulation and pipeline.model.seeds == member_seeds(config.seed, 1, 2, config.members)
    assert pipeline.pairs == [("exposure", "outcome")] and pipeline.ism.chunk_loci == 20
    assert (pipeline.effects.calibration, pipeline.meta.method, pipeline.mr.seed) == (True, "reml", config.seed)
    assert pipeline.mr.methods == ["egger_paper", "wald_mean"]
    assert (pipeline.store, pipeline.outputs, pipeline.report) == (str(tmp_path / "r" / "run.zarr"), str(tmp_path / "r"), False)


# ----------------------------------------------------------------------------- one round


def test_run_round__separates_a_large_effect_round_from_a_small_one(tmp_path, client):
    """gamma ~ 10 and gamma ~ 0.5: the estimated global CEs follow the true ones and the store holds every stage."""
    results = {}
    for label, gamma in (("large", 10.0), ("small", 0.5)):
        config = _config(generator={**TINY["generator"], "gamma_means": [gamma], "gamma_sd": 0.01})
        results[label] = run_round(config, 1, 0, tmp_path / label, client=client).set_index("method")
    large, small = results["large"].loc["egger_paper"], results["small"].loc["egger_paper"]
    assert large["true_ce"] > 4 * small["true_ce"] > 0
    assert large["estimate"] > small["estimate"] + 3 * np.hypot(large["se"], small["se"])
    for rows in results.values():
        for method in ("egger_paper", "wald_mean"):
            row = rows.loc[method]
            assert row["k"] >= 5 and row["n_true_loci"] >= 5
            assert abs(np.log(row["estimate"] / row["true_ce"])) < np.log(3), row
    store = tmp_path / "large" / "run.zarr"
    groups = {g: xr.open_zarr(store, group=g, consolidated=False) for g in ("ism", "effects", "mr", "meta", "truth")}
    assert list(groups["mr"]["method"].values) == ["egger_paper", "wald_mean"]
    assert groups["truth"]["true_ce"].sizes["locus"] == 40
    np.testing.assert_array_equal(groups["truth"]["locus"].values, groups["ism"]["locus"].values)
    summary = pd.read_csv(tmp_path / "large" / "summary.csv")
    assert summary["method"].tolist() == ["egger_paper", "egger_paper:plain_mean", "wald_mean"]
    assert (summary["train_s"] > 0).all()
    # the plain mean of a method's local estimates is the baseline's summary applied to that method
    methods = list(groups["mr"]["method"].values)
    local = groups["mr"]["local_ce"].isel(pair=0, method=methods.index("egger_paper")).values
    plain = summary.set_index("method").loc["egger_paper:plain_mean"]
    local = local[np.isfinite(local)]
    assert plain["estimate"] == pytest.approx(local.mean(), rel=1e-12) and plain["k"] == local.size
    assert plain["ci_upper"] - plain["ci_lower"] == pytest.approx(2 * 1.96 * local.std(ddof=1) / np.sqrt(local.size))


# ----------------------------------------------------------------------------- study: resume, refuse, CLI


def test_run_study__resumes_round_by_round_and_refuses_other_round_settings(tmp_path, client):
    config = _config(training={"epochs": 3})
    rounds = run_study(config, tmp_path, client=client, progress=False)
    first = round_directory(tmp_path, 1, 0) / "summary.csv"
    stamp = first.stat().st_mtime_ns
    assert len(rounds) == 3  # egger_paper, its plain mean, wald_mean

    more = run_study(_config(training={"epochs": 3}, rounds=2), tmp_path, client=client, progress=False)
    assert first.stat().st_mtime_ns == stamp  # round 0 read back, not recomputed
    assert sorted(more["round"].unique()) == [0, 1]
    pd.testing.assert_frame_equal(more[more["round"] == 0].reset_index(drop=True), rounds)
    for name in ("rounds.csv", "table1.csv", "bias_coverage.csv", "table1.md", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    assert "relative bias" in (tmp_path / "table1.md").read_text()
    assert list(pd.read_csv(tmp_path / "table1.csv").columns[:2]) == ["scenario", "scenario_name"]
    assert list((tmp_path / "figures").glob("*.png"))

    with pytest.raises(StoreError, match="other settings"):
        run_study(_config(training={"epochs": 4}), tmp_path, client=client, progress=False)

    # a rescore redoes the analysis only: members and ISM predictions stay, the MR methods change
    members = round_directory(tmp_path, 1, 0) / "members" / "member-0.pt"
    ism_chunk = sorted((round_directory(tmp_path, 1, 0) / "run.zarr" / "ism" / "mut_pred").rglob("c/*"))[0]
    stamps = members.stat().st_mtime_ns, ism_chunk.stat().st_mtime_ns
    analysis = {**TINY["analysis"], "methods": ["egger_paper", "wald_mean", "ivw"], "meta_method": "reml"}
    rescored = run_study(_config(training={"epochs": 3}, rounds=2, analysis=analysis), tmp_path, client=client,
                         progress=False, rescore=True)
    assert (members.stat().st_mtime_ns, ism_chunk.stat().st_mtime_ns) == stamps
    assert sorted(rescored["method"].unique()) == [
        "egger_paper", "egger_paper:plain_mean", "ivw", "ivw:plain_mean", "wald_mean"
    ]
    same = rescored[rescored["method"] == "wald_mean"].reset_index(drop=True)  # not meta-analysed: unchanged
    np.testing.assert_allclose(same["estimate"], more[more["method"] == "wald_mean"]["estimate"].to_numpy())
    np.testing.assert_array_equal(rescored[rescored["method"] == "egger_paper"]["train_s"].to_numpy(),
                                  more[more["method"] == "egger_paper"]["train_s"].to_numpy())
    # a rescore under other training settings retrains (the fingerprints changed) instead of mixing settings
    retrained = run_study(_config(training={"epochs": 4}, rounds=2, analysis=analysis), tmp_path, client=client,
                          progress=False, rescore=True)
    assert members.stat().st_mtime_ns != stamps[0] and ism_chunk.stat().st_mtime_ns != stamps[1]
    assert not np.array_equal(retrained["val_mse_exposure"].to_numpy(), rescored["val_mse_exposure"].to_numpy())


def test_cli_simulate__runs_a_config_and_prints_table1(tmp_path, capsys, client):
    config = tmp_path / "study.yaml"
    config.write_text(
        "scenarios: [both]\nrounds: 1\nmembers: 2\ngenerator: {n_train: 600, n_test: 20, n_calibration: 50}\n"
        "training: {epochs: 2}\nanalysis: {chunk_loci: 10}\n"
    )
    out = tmp_path / "study"
    code = main(["simulate", str(config), "--out", str(out), "--cluster", client.scheduler.address, "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "both" in printed and "0.78" in printed  # our row beside the paper's value
    assert (out / "both" / "round-000" / "summary.csv").exists()


def test_cli_simulate__bad_config_is_one_line_per_field(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text("rounds: 0\ntraining: {patience: -1}\n")
    assert main(["simulate", str(config)]) == 1
    err = capsys.readouterr().err
    assert "rounds:" in err and "training:" in err and "patience=-1" in err


def test_study_tables__spell_a_missing_value_na_as_every_table_does(tmp_path):
    from deepmr_dist.pipeline.study import _write_atomically

    path = tmp_path / "round-000" / "summary.csv"
    _write_atomically(pd.DataFrame({"method": ["ivw", "egger"], "estimate": [1.5, np.nan], "reason": [None, "too_few"]}), path)
    assert path.read_text().splitlines() == ["method,estimate,reason", "ivw,1.5,NA", "egger,NA,too_few"]
    back = pd.read_csv(path)
    assert np.isnan(back["estimate"][1]) and pd.isna(back["reason"][0])
    assert not list(path.parent.glob("*.partial"))
