"""``deepmr report``: one self-contained HTML file with every figure, config, versions, sizes and timings."""

from __future__ import annotations

import base64
import re

import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.errors import StoreError
from deepmr_dist.pipeline.runner import run_pipeline
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.stages.predict import ISMSettings, predict
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.pipeline.report import TOP_LOCI, write_report
from deepmr_dist.io.sequence import read_fasta

PNG = b"\x89PNG\r\n\x1a\n"


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", text)]


def test_report__embeds_every_figure_and_lists_config_versions_sizes_timings(tmp_path, capsys, client):
    config = parse_config(
        {
            "sequences": {"fasta": str(EXAMPLE_FASTA)},
            "model": {"sources": [EXAMPLE_ENSEMBLE]},
            "mr": {"methods": ["egger", "ivw"]},
            "store": str(tmp_path / "run.zarr"),
        },
        PipelineConfig,
        "test",
    )
    result = run_pipeline(config, client=client, progress=False)
    report = result.outputs / "report.html"
    text = report.read_text()
    images = _images(text)
    # a forest plot per method, an MR scatter per pair (egger), the instrument histogram, and per pair
    # a heatmap and a logo of each of its top loci
    assert len(images) == 2 + 2 + 1 + 2 * 2 * TOP_LOCI
    assert all(image.startswith(PNG) for image in images)
    assert "src='http" not in text and "<script" not in text  # self-contained
    for needle in ("Global causal effects", "task0-&gt;task1", "Loci", "instruments circled", "no estimate", "Pipeline config", "mr:", "Timings", "ism",
                   "on disk (MiB)", "torch", "xarray", "model_fingerprint"):
        assert needle in text, needle

    out = tmp_path / "elsewhere" / "r.html"
    assert main(["report", "--store", str(tmp_path / "run.zarr"), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(_images(out.read_text())) == len(images)


def test_report__store_without_mr_results_is_refused(tmp_path, client):
    path = str(tmp_path / "ism_only.zarr")
    loci = read_fasta(EXAMPLE_FASTA).isel(locus=slice(0, 4))
    predict(loci, ModelSpec((EXAMPLE_ENSEMBLE,)), path, client=client, settings=ISMSettings(chunk_loci=4), progress=False)
    with pytest.raises(StoreError, match="no MR and meta-analysis results"):
        write_report(path)
