"""deepmr-dist: deep Mendelian randomization on Dask, Zarr and xarray.

The Python API, as short as the command line::

    import deepmr_dist as dmr

    result = dmr.run("pipelines/quickstart.yaml")      # deepmr run
    ism = dmr.predict(loci, "pkg.models:ensemble", "run.zarr")   # deepmr predict
    effects = dmr.effects(ism)                          # lazy effects of an ism Dataset
    local = dmr.local_ce(effects, pairs=[("A", "B")], methods=["egger", "ivw"], rule="mutation_z", threshold=3.0)
    glob = dmr.global_ce(local)
    groups = dmr.open_run("run.zarr")                   # every group of a store, lazily

Names are imported on first use (:pep:`562`), so ``import deepmr_dist`` loads
neither torch nor distributed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API: dict[str, tuple[str, str]] = {
    "run": ("deepmr_dist.pipeline.api", "run"),
    "predict": ("deepmr_dist.pipeline.api", "predict"),
    "load_pipeline": ("deepmr_dist.pipeline.api", "load_pipeline"),
    "effects": ("deepmr_dist.stages.effects", "compute_effects"),
    "local_ce": ("deepmr_dist.stages.causal_effects", "local_ce"),
    "global_ce": ("deepmr_dist.stages.causal_effects", "global_ce"),
    "open_run": ("deepmr_dist.io.store", "open_run"),
}
"""Public name -> (module, attribute), imported on first access."""

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        module, attribute = _API[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepmr_dist' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
