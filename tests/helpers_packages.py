"""A package of test models written to disk, importable here and in the processes a test starts."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def importable_package(root: Path, name: str, source: str) -> Iterator[str]:
    """Package ``name`` (its ``__init__.py`` is ``source``, dedented) under ``root``, for as long as the block runs.

    ``root`` is put first on ``sys.path`` and on ``PYTHONPATH``, so worker and ``deepmr`` processes
    started inside the block import the package too. Yields ``name``.
    """
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(textwrap.dedent(source))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        yield name
