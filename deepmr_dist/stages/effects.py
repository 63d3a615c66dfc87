"""Stage 2: mutation effects with covariance-aware standard errors, lazily.

For member i, mutant m and reference r of one locus and task,
``d_i = f_i(m) - f_i(r)``; ``effect = mean_i d_i`` and ``effect_se = sd_i d_i``,
which equals ``sqrt(var(f(m)) + var(f(r)) - 2 cov(f(m), f(r)))`` across members.
Computing the SD of the differences directly (in float64) avoids the
cancellation of the three-term form; round-off below zero is clamped to 0.
Everything is elementwise within a locus: one compiled kernel call per block
of whole chunks (:mod:`deepmr_dist.ism.effect_sizes`, :data:`EFFECTS_BLOCK_BYTES`)
reads its predictions once and writes both outputs in their storage dtype, so
the dask graph is blockwise along ``locus`` and memory stays proportional to one block.

With a :class:`~deepmr_dist.stages.calibration.Calibration` (fitted on held-out
labelled loci), ``effect_se`` of each task is multiplied by its factor inside
the same kernel (no extra pass over the data); ``effect`` is unchanged. See :mod:`deepmr_dist.stages.calibration` for what
exactly is calibrated.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.stages.calibration import Calibration
from deepmr_dist.errors import DeepMRError, InputError, StoreError
from deepmr_dist.io.block_writes import block_loci


BASES = np.array(list("ACGTN"))
"""Letter of each base code."""

EFFECT_DTYPES = ("float32", "float64")
"""How effects may be stored; they are always computed in float64."""


def compute_effects(
    ism: xr.Dataset, *, ddof: int = 0, calibration: Calibration | None = None, dtype: str = "float32"
) -> xr.Dataset:
    """Mutation effects and their standard errors from an ``ism`` Dataset (lazy if ``ism`` is).

    Parameters
    ----------
    ism
        Dataset with ``ref_pred`` (locus, member, task) and ``mut_pred``
        (locus, member, position, allele, task).
    ddof
        Delta degrees of freedom of the variance across members: 0 as the
        paper, 1 for the unbiased sample variance.
    calibration
        Recalibration of the ensemble's SD: ``effect_se`` of each task is
        multiplied by ``calibration``'s factor for it. It must cover every task
        of ``ism``, match its ensemble size and ``ddof``, and share no locus id
        with ``ism``.
    dtype
        ``"float32"`` (default: half the bytes, and the precision of the
        predictions they come from) or ``"float64"``. The arithmetic is float64
        either way, inside the same blockwise task as the cast.

    Returns
    -------
    xr.Dataset
        ``effect`` and ``effect_se`` (locus, position, allele, task) of ``dtype``,
        NaN at each position's reference allele. Attrs ``ddof``, ``n_members``
        and, when calibrated, ``calibration`` (:meth:`Calibration.summary`).
        Write it with :func:`deepmr_dist.io.store.write_group` (the pipeline's
        runner does, to the ``effects`` group).

    Raises
    ------
    StoreError
        If ``ism`` has a ``complete`` ledger and some loci have no predictions yet.
    """
    if "complete" in ism:
        done = np.asarray(ism["complete"].values)
        if not done.all():
            missing = ism["locus"].values[~done]
            raise StoreError(
                f"{missing.size} loci have no ISM predictions yet (first: {missing[0]!r}); "
                "run `deepmr predict` on this store first"
            )
    if dtype not in EFFECT_DTYPES:
        raise InputError(f"effects dtype must be one of {', '.join(EFFECT_DTYPES)}, got {dtype!r}")
    if ddof not in (0, 1):
        raise DeepMRError(f"ddof must be 0 or 1, got {ddof}")
    n_members = ism.sizes["member"]
    if n_members - ddof < 1:
        raise DeepMRError(f"{n_members} member(s) cannot give a standard error with ddof={ddof}")
    factor = None if calibration is None else np.asarray(calibration.se_factor(ism, ddof).values, dtype=np.float64)
    effect, effect_se = _moments(ism, ddof, factor, dtype)
    dims = schema.VARIABLES["effect"].dims
    coords = {name: ism[name] for name in dims if name in ism.coords}
    out = xr.Dataset({"effect": (dims, effect), "effect_se": (dims, effect_se)}, coords=coords)
    out = out.assign_coords(_variant_coords(ism, effect.chunks[0] if hasattr(effect, "dask") else None))
    for name in ("effect", "effect_se"):
        out[name].attrs["description"] = schema.VARIABLES[name].description
    out.attrs["ddof"] = ddof
    out.attrs["n_members"] = n_members
    if calibration is not None:
        out.attrs["calibration"] = calibration.summary()
    return schema.validate(out, schema.EFFECTS)


def _moments(ism: xr.Dataset, ddof: int, factor: np.ndarray | None, dtype: str) -> tuple[Any, Any]:
    """``effect`` and ``effect_se`` arrays (locus, position, allele, task): one kernel call per locus block.

    Dask-backed predictions give dask arrays of one task per block of whole ``mut_pred`` chunks
    along ``locus`` (:data:`EFFECTS_BLOCK_BYTES`; every other dim whole), which reads the block once
    and writes both outputs
    (:func:`deepmr_dist.ism.effect_sizes.effect_moments`); in-memory ones give numpy arrays.
    """
    from deepmr_dist.ism.effect_sizes import effect_moments

    mut = ism["mut_pred"].transpose(*schema.VARIABLES["mut_pred"].dims).data
    ref = ism["ref_pred"].transpose(*schema.VARIABLES["ref_pred"].dims).data
    kernel = partial(effect_moments, ddof=ddof, factor=factor, dtype=dtype)
    if not hasattr(mut, "dask"):
        both = kernel(np.asarray(mut), np.asarray(ref))
        return both[0], both[1]
    import dask.array as da

    mut = mut.rechunk({0: _block_loci(mut), 1: -1, 2: -1, 3: -1, 4: -1})
    ref = ref.rechunk((mut.chunks[0], -1, -1))
    both = da.blockwise(kernel, "xlpat", mut, "lmpat", ref, "lmt", new_axes={"x": 2}, concatenate=True, dtype=dtype)
    return both[0], both[1]


EFFECTS_BLOCK_BYTES = 16 * 2**20
"""About what one effects block's predictions take: blocks of whole ``mut_pred`` chunks up to this size.

One Dask task reads, computes and writes each block (:mod:`deepmr_dist.io.block_writes`); each task
costs a few milliseconds of scheduling on a small machine, as much as a 64-locus chunk's arithmetic,
so blocks of several chunks (4 of ``bench_scale.py``'s 4 MB chunks) took the effects pass from 2.4
to about 2 read passes of its predictions there.
"""


def _block_loci(mut: Any) -> int:
    """Loci per effects block: a whole number of ``mut``'s locus chunks, about :data:`EFFECTS_BLOCK_BYTES` each."""
    chunk = mut.chunks[0][0]
    return block_loci(chunk, chunk * int(np.prod(mut.shape[1:])) * mut.dtype.itemsize, EFFECTS_BLOCK_BYTES)


def _variant_coords(ism: xr.Dataset, chunks: tuple[int, ...] | None) -> dict[str, xr.DataArray]:
    """Genomic coordinates of every mutation, lazily in the effects' locus ``chunks`` (``None``: in memory).

    ``ref`` (locus, position): the reference base letter (``N`` for an
    unknown base); ``alt`` (allele): the alternative base. For loci with
    genome intervals (BED input: ``chrom`` and ``start`` coordinates):
    ``variant_chrom`` (locus) and ``variant_position`` (locus, position), the
    1-based position as VCF writes it. A variant id ``chrom:pos:ref>alt`` is
    ``deepmr export``'s to build (a string per mutation would outweigh the effects).
    """
    coords: dict[str, xr.DataArray] = {}
    if "sequence" in ism:
        codes = ism["sequence"].data if chunks is not None and hasattr(ism["sequence"].data, "map_blocks") else None
        letters = (codes.rechunk((chunks, -1)).map_blocks(lambda block: BASES[np.minimum(block, 4)], dtype="<U1")
                   if codes is not None else BASES[np.minimum(ism["sequence"].values, 4)])  # fmt: skip
        coords["ref"] = xr.DataArray(letters, dims=("locus", "position"))
    coords["alt"] = xr.DataArray(np.asarray(ism["allele"].values, dtype="<U1"), dims=("allele",))
    if "chrom" in ism.coords and "start" in ism.coords:
        import dask.array as da

        start = da.from_array(np.asarray(ism["start"].values, dtype=np.int64), chunks=(chunks or (ism.sizes["locus"],),))
        position = np.asarray(ism["position"].values, dtype=np.int64)
        coords["variant_chrom"] = xr.DataArray(np.asarray(ism["chrom"].values).astype(object), dims=("locus",))
        coords["variant_position"] = xr.DataArray(start[:, None] + position[None, :] + 1, dims=("locus", "position"))
    return coords
