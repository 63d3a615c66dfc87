"""``report.html`` rendered in headless Chromium: every embedded figure decodes and the page is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import parse_config
from deepmr_dist.pipeline.runner import run_pipeline

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium)")]

# Appended to a copy of the report: counts the images the browser decoded (naturalWidth > 0) and the broken ones.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = `images ${images.length} loaded ${loaded} broken ${images.length - loaded}`;
});
</script>"""


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_report__every_figure_loads_in_headless_chromium(tmp_path, client):
    config = parse_config({"sequences": {"fasta": str(EXAMPLE_FASTA)}, "model": {"sources": [EXAMPLE_ENSEMBLE]},
                           "mr": {"methods": ["egger", "ivw"]}, "store": str(tmp_path / "run.zarr")},
                          PipelineConfig, "test")  # fmt: skip
    report = run_pipeline(config, client=client, progress=False).outputs / "report.html"
    n_images = report.read_text().count("src='data:image/png;base64,")
    assert n_images > 10

    probed = tmp_path / "probed.html"
    probed.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri()).stdout
    title = re.search(r"<title>images (\d+) loaded (\d+) broken (\d+)</title>", dom)
    assert title, dom[:500]
    assert tuple(map(int, title.groups())) == (n_images, n_images, 0)

    shot = tmp_path / "report.png"
    _chromium(f"--screenshot={shot}", "--window-size=1280,4000", report.as_uri())
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    not_white = np.mean(pixels.min(axis=-1) < 0.95)
    colourful = np.mean(pixels.max(axis=-1) - pixels.min(axis=-1) > 0.2)  # the plots' colours, not only text
    assert not_white > 0.05 and colourful > 0.01, (not_white, colourful)
