"""The one runner: the stage table, fingerprints that chain through the stages, and what a rerun recomputes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from conftest import EXAMPLE_FASTA
from deepmr_dist import schema
from deepmr_dist.io import store
from deepmr_dist.models.examples import simulation_ensemble
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.runner import LEDGER, STAGES, run_pipeline


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
