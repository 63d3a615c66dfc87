"""What a pipeline config resolves to, and the ``--dry-run`` plan."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepmr_dist.cli import main
from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.plan import plan
from helpers_config import example_config

REPO = Path(__file__).resolve().parents[1]


def test_pipeline__pair_naming_a_missing_task_is_an_error(tmp_path, client):
    config = example_config(tmp_path, pairs=[["task0", "accessibility"]])
    with pytest.raises(InputError, match=r"pairs\[0\] names task 'accessibility'.*\['task0', 'task1'\]"):
        plan(config)


def test_cli_run__dry_run_prints_the_plan(capsys):
    assert main(["run", str(REPO / "pipelines" / "quickstart.yaml"), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "loci: 100 x 100 bp" in printed and "forward passes: 90,300" in printed and "chunk(s) of 25 loci" in printed
