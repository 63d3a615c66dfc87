"""Progress bars of effects, MR and meta: distributed's progress drawn by tqdm on stderr, silenced by ``--quiet``."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import time
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import yaml
import zarr

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.io import progress, store


def finished_bars(text: str) -> set[str]:
    """Labels of the bars in ``text`` that reached 100 % (tqdm: ``LABEL: 100%|####| n/n [...]``)."""
    return {m.group(1) for part in re.split(r"[\r\n]", text) if (m := re.match(r"(.+?): +100%\|", part))}


def screen(text: str) -> list[str]:
    """The non-blank lines a terminal shows of ``text``: after each line's last carriage return."""
    return [shown for line in text.split("\n") if (shown := line.rsplit("\r", 1)[-1].strip())]


def _pipeline(root: Path, **sections) -> Path:
    """A pipeline of 16 example loci in 2 chunks, IVW and MR-Egger, ``sections`` changed."""
    config = {"sequences": {"fasta": str(root / "loci.fa")}, "model": {"sources": [EXAMPLE_ENSEMBLE]},
              "ism": {"chunk_loci": 8}, "mr": {"methods": ["ivw", "egger"]}, "store": str(root / "run.zarr"),
              "report": False, **sections}  # fmt: skip
    path = root / f"pipeline-{len(list(root.glob('pipeline-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory, client) -> tuple[Path, str]:
    """The folder of a store made by ``deepmr run -q`` (every stage computed), and what that run wrote on stderr."""
    root = tmp_path_factory.mktemp("progress")
    (root / "loci.fa").write_text("".join(f">{r}" for r in EXAMPLE_FASTA.read_text().split(">")[1:17]))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["run", str(_pipeline(root)), "--cluster", client.scheduler.address, "-q"]) == 0
    return root, err.getvalue()


def test_run__quiet_shows_no_bar(quiet_run):
    _, err = quiet_run
    assert "%|" not in err and not finished_bars(err), err


def test_run__effects_mr_and_meta_each_show_a_bar_on_stderr(quiet_run, client, capsys):
    root, _ = quiet_run
    # another ddof: effects, mr and meta are recomputed, ISM is not
    assert main(["run", str(_pipeline(root, effects={"ddof": 1})), "--cluster", client.scheduler.address]) == 0
    captured = capsys.readouterr()
    assert finished_bars(captured.err) == {"effects", "mr (pooled statistics)", "mr", "meta (local CEs)", "meta"}
    assert "%|" not in captured.out


def test_effects__shows_a_bar_unless_quiet(quiet_run, client, capsys):
    root, _ = quiet_run
    args = ["effects", "--store", str(root / "run.zarr"), "--cluster", client.scheduler.address]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert finished_bars(captured.err) == {"effects"} and "wrote group 'effects'" in captured.out
    assert main([*args, "--quiet"]) == 0
    assert "%|" not in capsys.readouterr().err


def test_effects__store_that_stops_it_gives_one_line_and_no_bar(quiet_run, client, tmp_path, capsys):
    root, _ = quiet_run
    path = tmp_path / "run.zarr"
    shutil.copytree(root / "run.zarr", path)
    zarr.open_group(str(path), path="ism", mode="r+")["complete"][0] = False
    assert main(["effects", "--store", str(path), "--cluster", client.scheduler.address]) == 1
    err = capsys.readouterr().err
    assert "%|" not in err and screen(err)[-1].startswith("deepmr effects: error: 1 loci have no ISM predictions"), err


def _boom(block: np.ndarray, block_info=None) -> np.ndarray:
    """``block``, except that the second block fails a second after it starts (the bar has been drawn by then)."""
    if block_info[0]["chunk-location"][0] == 1:
        time.sleep(1.0)
        raise ValueError("a task failed")
    return block


@pytest.mark.parametrize("fails", [False, True])
def test_wait__a_finished_write_leaves_its_bar_a_failed_one_clears_it(client, tmp_path, capsys, fails):
    values = da.zeros(64, chunks=8)
    data = values.map_blocks(_boom, dtype=values.dtype) if fails else values + 1.0
    ds = xr.Dataset({"x": (("locus",), data)})
    with dask.config.set(scheduler=client), progress.shown("effects"):
        if fails:
            with pytest.raises(ValueError, match="a task failed"):
                store.write_group(str(tmp_path / "s.zarr"), ds, "effects")
        else:
            store.write_group(str(tmp_path / "s.zarr"), ds, "effects")
    err = capsys.readouterr().err
    assert "effects: " in err and "%|" in err  # drawn, then (on failure) cleared
    lines = screen(err)
    assert [line for line in lines if "%|" in line] == ([] if fails else lines) and len(lines) == (0 if fails else 1)
    if not fails:
        assert finished_bars(lines[0]) == {"effects"}


def test_compute__without_shown_or_a_client_shows_nothing(client, capsys):
    x = da.arange(10, chunks=5)
    with dask.config.set(scheduler=client):
        assert progress.compute(x.sum(), what="w")[0] == 45  # a client, no shown
    with progress.shown("mr"):
        assert progress.compute(x.sum(), np.int64(3), what="w") == (45, 3)  # shown, the local scheduler
    assert capsys.readouterr().err == ""
