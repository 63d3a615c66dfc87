"""What a pipeline config resolves to, and the ``--dry-run`` plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.plan import plan

REPO = Path(__file__).resolve().parents[1]


def _example(tmp_path: Path, **changes) -> PipelineConfig:
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {"sources": [EXAMPLE_ENSEMBLE]},
        "ism": {"chunk_loci": 16},
        "mr": {"methods": ["ivw", "egger"]},
        "store": str(tmp_path / "run.zarr"),
        **changes,
    }
    return parse_config(data, PipelineConfig, "pipeline.yaml")


def test_pipeline__pair_naming_a_missing_task_is_an_error(tmp_path, client):
    config = _example(tmp_path, pairs=[["task0", "accessibility"]])
    with pytest.raises(InputError, match=r"pairs\[0\] names task 'accessibility'.*\['task0', 'task1'\]"):
        plan(config)


def test_cli_run__dry_run_prints_the_plan(capsys):
    assert main(["run", str(REPO / "pipelines" / "quickstart.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "loci: 100 x 100 bp" in printed and "forward passes: 90,300" in printed and "chunk(s) of 25 loci" in printed
