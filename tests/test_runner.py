"""The one runner: the stage table, fingerprints that chain through the stages, what a rerun recomputes,
and whole pipelines through it (``deepmr run``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml
import zarr

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist import schema
from deepmr_dist.cli import main
from deepmr_dist.errors import InputError
from deepmr_dist.io import store
from deepmr_dist.io.lock import read_lease
from deepmr_dist.pipeline.outputs import output_location
from deepmr_dist.pipeline.plan import plan
from deepmr_dist.models.examples import simulation_ensemble
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import load_config, parse_config
from deepmr_dist.pipeline.runner import LEDGER, STAGES, run_pipeline
from helpers_config import example_config
from helpers_lock import lock_held_by_a_thread

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, sources: list[str], **changes) -> PipelineConfig:
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {"sources": sources},
        "ism": {"chunk_loci": 16},
        "mr": {"methods": ["ivw", "egger"]},
        "store": str(tmp_path / "run.zarr"),
        "report": False,
        **changes,
    }
    return parse_config(data, PipelineConfig, "pipeline.yaml")


def _members(folder: Path, seeds: list[int]) -> list[str]:
    """State-dict files of the example CNN (100 bp), one per seed, at ``folder/m<i>.pt``."""
    paths, ensemble = [], simulation_ensemble(max(seeds) + 1, 100)
    for index, seed in enumerate(seeds):
        path = folder / f"m{index}.pt"
        torch.save(ensemble[seed].state_dict(), path)
        paths.append(str(path))
    return paths


def test_stage_table__names_and_groups_are_unique_per_config_and_reads_come_after_writes():
    for simulation in (False, True):
        data = {"sequences": {"simulation": {}} if simulation else {"fasta": "a.fa"},
                "model": {"train_simulation": True} if simulation else {"sources": ["m.pt"]},
                "effects": {"calibration": simulation}}  # fmt: skip
        config = parse_config(data, PipelineConfig, "p.yaml")
        present = [stage for stage in STAGES if stage.when(config)]
        names = [stage.name for stage in present]
        assert len(names) == len(set(names))
        groups = [stage.group for stage in present if stage.group]
        assert len(groups) == len(set(groups)) and set(groups) <= set(schema.GROUPS)
        for index, stage in enumerate(present):
            assert set(stage.after) <= {"calibration"} | set(names[:index]), stage.name


def test_stage_table__ism_makes_the_store_before_any_other_group_is_written():
    # A store holding only a calibration group is not one predict continues: a fresh calibrated run failed at ism.
    config = parse_config({"sequences": {"simulation": {}}, "model": {"train_simulation": True},
                           "effects": {"calibration": True}}, PipelineConfig, "p.yaml")  # fmt: skip
    groups = [stage.group for stage in STAGES if stage.when(config) and stage.group]
    assert groups[0] == schema.ISM and schema.CALIBRATION in groups


def test_run_pipeline__reruns_exactly_the_stages_downstream_of_a_change(tmp_path, client):
    sources = _members(tmp_path, [0, 1])
    config = _config(tmp_path, sources)
    first = run_pipeline(config, client=client, progress=False)
    assert first.skipped == []
    assert store.stage_fingerprint(config.store, schema.MR) is not None

    again = run_pipeline(config, client=client, progress=False)
    assert again.skipped == ["ism", "effects", "mr", "meta"]
    np.testing.assert_array_equal(again.global_table["estimate"], first.global_table["estimate"])

    reml = _config(tmp_path, sources, meta={"method": "reml"})
    assert run_pipeline(reml, client=client, progress=False).skipped == ["ism", "effects", "mr"]

    # a group whose write was interrupted has no fingerprint: recomputed, and what reads it is not
    del zarr.open_group(config.store, path=schema.MR, mode="r+").attrs[store.STAGE_ATTR]
    assert run_pipeline(reml, client=client, progress=False).skipped == ["ism", "effects", "meta"]

    # new weights behind the same file names: the store's fingerprint changes, and with it every stage after ISM
    _members(tmp_path, [0, 5])
    retrained = run_pipeline(reml, client=client, progress=False, overwrite=True)
    assert retrained.skipped == []
    assert not np.array_equal(retrained.global_table["estimate"], first.global_table["estimate"])


def test_run_pipeline__trained_members_are_reused_by_their_fingerprint_in_the_ledger(tmp_path, client):
    data = {
        "sequences": {"simulation": {"generator": {"n_train": 300, "n_test": 8, "n_calibration": 0}}},
        "model": {"train_simulation": True, "members": 2, "training": {"epochs": 1}},
        "ism": {"chunk_loci": 8}, "mr": {"methods": ["ivw"]}, "store": str(tmp_path / "sim.zarr"), "report": False,
    }  # fmt: skip
    config = parse_config(data, PipelineConfig, "p.yaml")
    first = run_pipeline(config, client=client, progress=False)
    member = Path(first.members.sources[0])
    stamp = member.stat().st_mtime_ns
    assert set((first.outputs / LEDGER).read_text().split('"')) >= {"model"}
    again = run_pipeline(config, client=client, progress=False)
    assert "model" in again.skipped and member.stat().st_mtime_ns == stamp
    assert again.true_global_ce == pytest.approx(first.true_global_ce)

    member.unlink()  # a missing member is retrained even though its fingerprint is recorded
    third = run_pipeline(config, client=client, progress=False)
    assert "model" not in third.skipped and member.exists()


# ----------------------------------------------------------------------------- whole pipelines


def test_run_pipeline__all_pairs_from_one_pass_and_resume_skips_finished_stages(tmp_path, client):
    config = example_config(tmp_path)
    dry = plan(config)
    assert (dry.n_loci, dry.length, dry.n_members) == (48, 100, 3)
    assert dry.pairs == [("task0", "task1"), ("task1", "task0")]
    assert dry.forward_passes == 48 * 3 * 301

    first = run_pipeline(config, client=client, progress=False)
    local = xr.open_zarr(config.store, group="mr", consolidated=False)
    assert list(local["pair"].values) == ["task0->task1", "task1->task0"]
    table = pd.read_csv(first.outputs / "global_ce.csv")
    assert len(table) == 4 and set(table["method"]) == {"ivw", "egger"}
    assert (first.outputs / "local_ce.parquet").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(first.outputs / "global_ce.parquet"), first.global_table, check_dtype=False)

    mr_meta = Path(config.store) / "mr" / "zarr.json"
    stamp = mr_meta.stat().st_mtime_ns
    again = run_pipeline(config, client=client, progress=False)
    assert mr_meta.stat().st_mtime_ns == stamp  # MR not recomputed
    pd.testing.assert_frame_equal(again.global_table, first.global_table)

    changed = example_config(tmp_path, mr={"methods": ["ivw", "egger", "weighted_median"], "n_boot": 50})
    third = run_pipeline(changed, client=client, progress=False)
    assert mr_meta.stat().st_mtime_ns != stamp  # a changed MR section reruns MR, not ISM
    assert set(third.global_table["method"]) == {"ivw", "egger", "weighted_median"}
    np.testing.assert_allclose(
        third.global_table.query("method == 'ivw'")["estimate"].values,
        first.global_table.query("method == 'ivw'")["estimate"].values,
    )


def test_cli_run__quickstart_estimates_the_true_global_ce(tmp_path, capsys, client):
    store = tmp_path / "quickstart.zarr"
    code = main(["run", str(REPO / "pipelines" / "quickstart.yaml"), "--store", str(store),
                 "--cluster", client.scheduler.address, "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    estimate = float(printed.split("egger_paper\tglobal CE ")[1].split()[0])
    truth = float(printed.split("true global CE (simulation): ")[1].split()[0])
    assert truth > 1.0  # gamma ~ 10: a strong effect
    assert abs(np.log(estimate / truth)) < np.log(1.5), printed
    assert (output_location(parse_config({"sequences": {"fasta": "x"}, "model": {"sources": ["m"]}, "store": str(store)},
                                         PipelineConfig, "t")).local / "members" / "member-0.pt").exists()


def test_run_pipeline__bed_loci_with_motif_spacing_stratification(tmp_path, client):
    rng = np.random.default_rng(0)
    genome = tmp_path / "genome.fa"
    genome.write_text(">chr1\n" + "".join(rng.choice(list("ACGT"), 4000)) + "\n")
    regions = tmp_path / "peaks.bed"
    regions.write_text("".join(f"chr1\t{300 * i + 20}\t{300 * i + 80}\tpeak{i}\n" for i in range(12)))
    motifs = tmp_path / "motifs.bed"
    lines = []
    for i in range(12):  # locus i spans [300 i, 300 i + 100): GATA at +5, TAL1 at +5 + gap
        gap = (10, 50, 80)[i % 3]
        lines += [f"chr1\t{300 * i + 5}\t{300 * i + 15}\tGATA\n", f"chr1\t{300 * i + 5 + gap}\t{300 * i + 15 + gap}\tTAL1\n"]
    motifs.write_text("".join(lines))
    config = parse_config(
        {
            "sequences": {"bed": str(regions), "genome": str(genome), "width": 100},
            "model": {"sources": [EXAMPLE_ENSEMBLE]},
            "mr": {"methods": ["ivw"]},
            "spacing": {"motifs_bed": str(motifs), "motif_names": {"task0": "GATA", "task1": "TAL1"}},
            "store": str(tmp_path / "bed.zarr"),
        },
        PipelineConfig,
        "test",
    )
    result = run_pipeline(config, client=client, progress=False)
    table = pd.read_csv(result.outputs / "spacing.csv")
    ivw = table[(table["pair"] == "task0->task1") & (table["method"] == "ivw")].set_index("bin")
    assert ivw.loc["0-35", "k"] == 4 and ivw.loc["35-70", "k"] == 4 and ivw.loc["70-150", "k"] == 4
    assert ivw.loc[">=150", "k"] == 0
    assert "Global CE by motif spacing" in (result.outputs / "report.html").read_text()


def _run_yaml(tmp_path: Path, data: dict, client) -> PipelineConfig:
    """Write ``data`` as a pipeline YAML and run it through ``deepmr run``."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--cluster", client.scheduler.address, "--quiet"]) == 0
    return load_config(path, PipelineConfig)


def test_cli_run__random_initialised_bpnet_counts_heads_all_pairs(tmp_path, client):
    pytest.importorskip("bpnetlite")
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {
            "sources": ["deepmr_dist.models.bpnet:bpnet_ensemble"],
            "options": {"n_members": 2, "tasks": ["Oct4", "Sox2", "Nanog"], "n_filters": 8, "n_layers": 2},
        },
        "tasks": {"names": ["Oct4", "Sox2", "Nanog"], "output_index": 1},
        "ism": {"chunk_loci": 24},
        "mr": {"methods": ["ivw"]},
        "store": str(tmp_path / "bpnet.zarr"),
    }
    config = _run_yaml(tmp_path, data, client)
    table = pd.read_csv(output_location(config).local / "global_ce.csv")
    assert len(table) == 6  # all ordered pairs of three TFs
    ism = xr.open_zarr(config.store, group="ism", consolidated=False)
    assert list(ism["task"].values) == ["Oct4", "Sox2", "Nanog"] and ism.sizes["member"] == 2


def test_cli_run__deepsea_style_tasks_by_name_with_sigmoid(tmp_path, client):
    names = [f"cell{i}|{tf}" for i in range(3) for tf in ("GATA1", "TAL1", "DNase")]
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {
            "sources": ["deepmr_dist.models.architectures:deepsea_ensemble"],
            "options": {"n_members": 2, "length": 100, "n_tasks": len(names), "filters": [8, 8, 8],
                        "width": 4, "pool": 2, "hidden": 16},
        },
        "tasks": {"names": names, "keep": ["cell1|GATA1", "cell1|TAL1", "cell1|DNase"], "transform": "sigmoid"},
        "pairs": [["cell1|GATA1", "cell1|DNase"], ["cell1|TAL1", "cell1|DNase"]],
        "ism": {"chunk_loci": 24},
        "mr": {"methods": ["ivw", "egger"]},
        "store": str(tmp_path / "deepsea.zarr"),
    }
    config = _run_yaml(tmp_path, data, client)
    table = pd.read_csv(output_location(config).local / "global_ce.csv")
    assert sorted(table["pair"].unique()) == ["cell1|GATA1->cell1|DNase", "cell1|TAL1->cell1|DNase"]
    ref = xr.open_zarr(config.store, group="ism", consolidated=False)["ref_pred"].values
    assert ((ref > 0) & (ref < 1)).all()  # sigmoid outputs
    wrong = config.model_copy(update={"tasks": config.tasks.model_copy(update={"keep": ["cell1|GATA", "cell1|DNase"]})})
    with pytest.raises(InputError, match="unknown task.*cell1\\|GATA.*did you mean"):
        plan(wrong)


def test_cli_run__resumes_after_the_process_is_killed_during_ism(tmp_path, client):
    import os
    import signal
    import subprocess
    import sys
    import time

    import zarr

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sequences: {{fasta: {EXAMPLE_FASTA}}}\nmodel: {{sources: ['{EXAMPLE_ENSEMBLE}']}}\n"
        "ism: {chunk_loci: 1, mutant_batch: 1, incremental: false}\nmr: {methods: [ivw]}\n"
        f"store: {tmp_path / 'run.zarr'}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "deepmr_dist.cli", "run", str(pipeline), "--cluster", client.scheduler.address, "--quiet"]
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def complete() -> int:
        try:
            return int(zarr.open_array(str(tmp_path / "run.zarr"), path="ism/complete", mode="r")[:].sum())
        except (FileNotFoundError, KeyError, zarr.errors.ArrayNotFoundError, zarr.errors.NodeTypeValidationError):
            return 0

    deadline = time.monotonic() + 180
    while complete() < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 0 < complete() < 48, "the run was not interrupted during ISM"
    assert not (tmp_path / "run" / "global_ce.csv").exists()

    config = load_config(pipeline, PipelineConfig)
    resumed = run_pipeline(config, client=client, progress=False)
    undisturbed = run_pipeline(config.model_copy(update={"store": str(tmp_path / "undisturbed.zarr")}), client=client, progress=False)
    # Bit for bit: both stores are made of the same 1-locus chunks and 1-mutant batches on the same 1-thread workers.
    np.testing.assert_array_equal(
        xr.open_zarr(config.store, group="ism", consolidated=False)["mut_pred"].values,
        xr.open_zarr(tmp_path / "undisturbed.zarr", group="ism", consolidated=False)["mut_pred"].values,
    )
    pd.testing.assert_frame_equal(resumed.global_table, undisturbed.global_table)


# ----------------------------------------------------------------------------- verified ISM, the store lock


def test_run_pipeline__damaged_ism_chunks_are_recomputed_exactly_and_later_stages_kept(tmp_path, client):
    config = example_config(tmp_path, report=False)
    first = run_pipeline(config, client=client, progress=False)
    ism_path = Path(config.store) / "ism"
    expected = xr.open_zarr(config.store, group="ism", consolidated=False).load()

    (ism_path / "mut_pred" / "c" / "1" / "0" / "0" / "0" / "0").unlink()  # found by the listing
    again = run_pipeline(config, client=client, progress=False)
    assert "ism" not in again.skipped and {"effects", "mr", "meta"} <= set(again.skipped)
    xr.testing.assert_identical(xr.open_zarr(config.store, group="ism", consolidated=False).load(), expected)

    chunk = ism_path / "mut_pred" / "c" / "2" / "0" / "0" / "0" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[4:8] = (int.from_bytes(raw[4:8], "little") - 4).to_bytes(4, "little")  # same size: only decoding finds it
    chunk.write_bytes(bytes(raw))
    assert "ism" in run_pipeline(config, client=client, progress=False).skipped  # the listing cannot see it
    full = run_pipeline(config, client=client, progress=False, verify="full")
    assert "ism" not in full.skipped
    xr.testing.assert_identical(xr.open_zarr(config.store, group="ism", consolidated=False).load(), expected)
    pd.testing.assert_frame_equal(full.global_table, first.global_table)
    assert read_lease(config.store) is None


def test_run_pipeline__is_refused_while_another_writer_holds_the_store(tmp_path, client):
    from deepmr_dist.errors import StoreError

    config = example_config(tmp_path, report=False)
    with lock_held_by_a_thread(config.store, "another run"):
        with pytest.raises(StoreError, match="is locked by another writer: another run"):
            run_pipeline(config, client=client, progress=False)
        assert not output_location(config).local.exists()  # refused before any stage
