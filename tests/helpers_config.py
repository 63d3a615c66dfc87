"""The pipeline config of the bundled example, as tests of the plan and the runner start from it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config


def example_config(tmp_path: Path, **changes: Any) -> PipelineConfig:
    """The 48 example loci and ensemble, chunks of 16 loci, IVW and MR-Egger, the store in ``tmp_path``.

    ``changes`` replace (or add) top-level keys of the config.
    """
    data = {
        "sequences": {"fasta": str(EXAMPLE_FASTA)},
        "model": {"sources": [EXAMPLE_ENSEMBLE]},
        "ism": {"chunk_loci": 16},
        "mr": {"methods": ["ivw", "egger"]},
        "store": str(tmp_path / "run.zarr"),
        **changes,
    }
    return parse_config(data, PipelineConfig, "pipeline.yaml")
