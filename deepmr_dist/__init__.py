"""deepmr-dist: deep Mendelian randomization on Dask, Zarr and xarray.

The public entry point for reading results is :func:`open_run`, which returns
the run store's groups as lazy xarray Datasets.
"""

__version__ = "0.1.0"

from deepmr_dist.store import open_run  # noqa: E402

__all__ = ["__version__", "open_run"]
