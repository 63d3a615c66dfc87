"""Reading the committed R fixtures of ``tests/r/`` and checking that their R script still writes them."""

from __future__ import annotations

import csv
import math
import shutil
import subprocess
from pathlib import Path

import pytest

R_DIR = Path(__file__).resolve().parent / "r"


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a fixture as dicts, skipping ``#`` comment lines; returns ``(comments, rows)``."""
    with path.open(newline="") as f:
        lines = f.read().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    body = [line for line in lines if line and not line.startswith("#")]
    return comments, list(csv.DictReader(body))


def num(text: str) -> float:
    """R's number formatting back to float (``NA`` -> NaN; ``Inf``, ``-Inf`` as Python reads them)."""
    return math.nan if text == "NA" else float(text)


def assert_script_rewrites(script: Path, names: tuple[str, ...], tmp_path: Path, *, rtol: float, timeout: int = 600) -> None:
    """Rerun ``script`` into ``tmp_path`` and compare each fixture in ``names`` with the committed one.

    Numbers must agree to ``rtol`` (NaN with NaN), other cells exactly. Skipped where
    ``Rscript`` is absent or the versions in the first comment line differ.
    """
    if shutil.which("Rscript") is None:
        pytest.skip("Rscript not available")
    subprocess.run(["Rscript", str(script), str(tmp_path)], check=True, capture_output=True, timeout=timeout,
                   cwd=R_DIR.parent.parent)  # fmt: skip
    for name in names:
        committed_comments, committed = read_csv(R_DIR / name)
        fresh_comments, fresh = read_csv(tmp_path / name)
        if fresh_comments[0] != committed_comments[0]:
            pytest.skip(f"installed versions differ from the fixtures': {fresh_comments[0]!r}")
        assert len(fresh) == len(committed), name
        for old, new in zip(committed, fresh, strict=True):
            assert old.keys() == new.keys(), name
            for key in old:
                try:
                    a, b = num(old[key]), num(new[key])
                except ValueError:
                    assert old[key] == new[key], (name, key)
                    continue
                assert (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= rtol * abs(a), (name, key, a, b)
