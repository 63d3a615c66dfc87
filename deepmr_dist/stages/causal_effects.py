"""Stages 3 and 4: local causal effects per locus (MR) and global ones (meta-analysis).

:func:`local_ce` runs blockwise over the ``locus`` chunks of a (lazy) effects
Dataset: each block holds every candidate instrument of its loci, so it is
read once, every requested (exposure, outcome) pair is estimated from it by
the numpy kernels of :mod:`deepmr_dist.mr`, and memory stays per block.
:func:`global_ce` meta-analyses the local estimates of each (pair, method)
across loci with :func:`deepmr_dist.meta.meta_analysis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.stages import instruments
from deepmr_dist.errors import InputError
from deepmr_dist.io import progress
from deepmr_dist.io.block_writes import block_loci
from deepmr_dist.meta import META_REASONS, check_method, meta_analysis

__all__ = [
    "GLOBAL_VARIABLES",
    "LOCAL_VARIABLES",
    "compact_instruments",
    "global_ce",
    "local_ce",
    "pair_label",
]

LOCAL_VARIABLES: dict[str, str] = {
    v.name: v.field for v in schema.variables_of(schema.MR) if v.field and v.dtype == "float64"
}
"""Float variables of :func:`local_ce` and the ``MRResult`` field each comes from (from :mod:`deepmr_dist.schema`)."""

GLOBAL_VARIABLES: dict[str, str] = {
    v.name: v.field for v in schema.variables_of(schema.META) if v.field and v.dtype == "float64"
}
"""Float variables of :func:`global_ce` and the ``MetaResult`` field each comes from (from :mod:`deepmr_dist.schema`)."""

_DIMS = schema.variable(schema.MR, "local_ce").dims  # (pair, locus, method)
_CODE_FIELDS = ("reason", "note")
"""String fields of :class:`deepmr_dist.mr.MRResult` stored as fixed-width codes."""
_CANDIDATE_DIMS = ("position", "allele")


def pair_label(exposure: str, outcome: str) -> str:
    """The ``pair`` coordinate value: ``"EXPOSURE->OUTCOME"``."""
    return f"{exposure}->{outcome}"


def compact_instruments(mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Move the instruments of each row to the front, NaN-pad, and cut to the widest row.

    Parameters
    ----------
    mask : ndarray of bool, shape (n, m)
        True for instruments.
    *arrays : ndarray, shape (n, m)

    Returns
    -------
    list of ndarray, each float64 of shape ``(n, max(1, max_k))``; instruments
    keep their order within the row.
    """
    selection = InstrumentSelection(mask)
    return [selection.take(arr) for arr in arrays]


class InstrumentSelection:
    """Where each row's instruments are, computed once and applied to any array of the mask's shape.

    One exposure's selection serves every outcome paired with it (and every
    MR method): only the outcome's effects are gathered again.

    Parameters
    ----------
    mask : ndarray of bool, shape (n, m)
        True for instruments.

    Attributes
    ----------
    counts : ndarray of int, shape (n,)
        Instruments of each row.
    """

    def __init__(self, mask: np.ndarray) -> None:
        self.counts = mask.sum(axis=1)
        self.width = max(int(self.counts.max(initial=0)), 1)
        self.empty = mask.shape[1] == 0
        self.order = np.argsort(~mask, axis=1, kind="stable")[:, : self.width]
        self.keep = np.take_along_axis(mask, self.order, axis=1)

    def take(self, arr: np.ndarray) -> np.ndarray:
        """``arr``'s instruments of each row moved to the front, NaN-padded: float64 ``(n, max(1, max_k))``."""
        if self.empty:  # no candidates at all: one all-NaN column
            return np.full((self.order.shape[0], 1), np.nan)
        picked = np.take_along_axis(np.asarray(arr, dtype=np.float64), self.order, axis=1)
        return np.where(self.keep, picked, np.nan)


def _described(ds: xr.Dataset, group: str) -> xr.Dataset:
    """``ds`` with each registered variable's description in its attrs, validated against the schema."""
    for var in schema.variables_of(group):
        ds[var.name].attrs["description"] = var.description
    return schema.validate(ds, group)


# --------------------------------------------------------------------------- local CE


def _check_pairs(effects: xr.Dataset, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = [(str(e), str(o)) for e, o in pairs]
    if not pairs:
        raise InputError("local_ce: no (exposure, outcome) pairs given")
    labels = [pair_label(e, o) for e, o in pairs]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise InputError(f"local_ce: duplicate pair(s) {', '.join(dupes)}")
    instruments.check_tasks(effects, sorted({t for pair in pairs for t in pair}))
    return pairs


def _check_effects(effects: xr.Dataset) -> None:
    for name in ("effect", "effect_se"):
        if name not in effects:
            raise InputError(f"effects dataset lacks variable {name!r}")
        dims = set(effects[name].dims)
        if dims != {"locus", "position", "allele", "task"}:
            raise InputError(
                f"effects/{name} has dims {effects[name].dims}, expected (locus, position, allele, task)"
            )


def _code_dtype(field: str) -> np.dtype:
    """Fixed-width unicode dtype wide enough for every code of the MR ``reason`` or ``note`` registry.

    A fixed width (not ``object``) lets Zarr writes stay lazy: xarray would
    otherwise load an object-dtype dask array to pick a string encoding.
    """
    from deepmr_dist.mr import NOTES, REASONS

    codes = REASONS if field == "reason" else NOTES
    return np.dtype(f"<U{max(1, *(len(code) for code in codes))}")


def _as_codes(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    values = np.asarray(values, dtype=object)
    width = max((len(str(v)) for v in values), default=0)
    if width > dtype.itemsize // 4:
        raise RuntimeError(f"MR kernel returned an unregistered code among {sorted(set(values))}")
    return values.astype(dtype)


def _record_dtype() -> np.dtype:
    """One record per (pair, locus, method): every float variable, the two counts and the two codes."""
    fields = [(name, np.float64) for name in LOCAL_VARIABLES]
    fields += [("n_instruments", np.int64), ("n_excluded", np.int64)]
    fields += [(field, _code_dtype(field)) for field in _CODE_FIELDS]
    return np.dtype(fields)


def _block_local_ce(
    eff: np.ndarray,
    ses: np.ndarray,
    *,
    tasks: list[str],
    pairs: list[tuple[str, str]],
    methods: list[str],
    rule: str,
    threshold: float,
    stats: dict[str, tuple[float, float]],
    mr_options: dict[str, Any],
) -> np.ndarray:
    """MR of every pair on one locus block: ``(locus, position, allele, task)`` effects in, records ``(pair, locus, method)`` out."""
    from deepmr_dist.mr import estimate

    n_loci, n_pos, n_all, n_task = eff.shape
    eff = np.asarray(eff, dtype=np.float64).reshape(n_loci, n_pos * n_all, n_task)
    ses = np.asarray(ses, dtype=np.float64).reshape(n_loci, n_pos * n_all, n_task)
    out = np.zeros((len(pairs), n_loci, len(methods)), dtype=_record_dtype())
    for name in LOCAL_VARIABLES:
        out[name] = np.nan
    selected: dict[str, tuple[InstrumentSelection, np.ndarray, np.ndarray]] = {}
    for p, (exposure, outcome) in enumerate(pairs):
        ie, io = tasks.index(exposure), tasks.index(outcome)
        if exposure not in selected:  # one selection per exposure, shared by its outcomes and methods
            center, scale = stats.get(exposure, (np.nan, np.nan))
            selection = InstrumentSelection(
                instruments.instrument_mask(eff[:, :, ie], ses[:, :, ie], rule, threshold, center, scale)
            )
            selected[exposure] = (selection, selection.take(eff[:, :, ie]), selection.take(ses[:, :, ie]))
        selection, bx, bxse = selected[exposure]
        by, byse = selection.take(eff[:, :, io]), selection.take(ses[:, :, io])
        out["n_excluded"][p] = (selection.counts - instruments.usable(bx, bxse, by, byse).sum(axis=1))[:, None]
        results = estimate(bx, bxse, by, byse, methods=tuple(methods), **mr_options)
        for m, method in enumerate(methods):
            res = results[method]
            for name, field in LOCAL_VARIABLES.items():
                out[name][p, :, m] = np.asarray(getattr(res, field), dtype=np.float64)
            out["n_instruments"][p, :, m] = np.nan_to_num(np.asarray(res.n, dtype=np.float64), nan=0.0).astype(np.int64)
            for field in _CODE_FIELDS:
                out[field][p, :, m] = _as_codes(getattr(res, field), out.dtype[field])
    return out


MR_BLOCK_BYTES = 8 * 2**20
"""About what one MR block's effects take as float64 (per variable): blocks of whole stored chunks up to this size.

Each block is one call of the MR kernels per pair, whose fixed cost per call (input checks,
scaling, inference) is amortised over more loci in bigger blocks: 320-locus blocks of 200 bp x 4
tasks took about 20 % less time than the 64-locus chunks they were made of (AMD EPYC, one thread).
"""


def _mr_block_loci(ds: xr.Dataset) -> int:
    """Loci per MR block: a whole number of ``ds``'s locus chunks, about :data:`MR_BLOCK_BYTES` of float64 each."""
    chunk = ds["effect"].chunksizes["locus"][0]
    per_locus = 8 * ds.sizes["position"] * ds.sizes["allele"] * ds.sizes["task"]
    return block_loci(chunk, per_locus * chunk, MR_BLOCK_BYTES)


def local_ce(
    effects: xr.Dataset,
    *,
    pairs: Sequence[tuple[str, str]],
    methods: Sequence[str],
    rule: str = "pooled_z",
    threshold: float,
    ddof: int = 0,
    **mr_options: Any,
) -> xr.Dataset:
    """Local causal effect of every (exposure, outcome) pair at every locus, lazily.

    Parameters
    ----------
    effects : xr.Dataset
        ``effect`` and ``effect_se`` with dims ``(locus, position, allele, task)``,
        preferably dask-backed and chunked along ``locus`` only (other dims are
        rechunked whole; a numpy-backed Dataset becomes one block).
    pairs : sequence of (str, str)
        ``(exposure, outcome)`` task names.
    methods : sequence of str
        MR estimators (:data:`deepmr_dist.mr.METHODS`).
    rule, threshold, ddof
        Instrument selection, see :mod:`deepmr_dist.stages.instruments`; with
        ``pooled_z`` the pooled mean/SD of every exposure are computed here in
        one global reduction before the lazy graph is built.
    **mr_options
        Passed to :func:`deepmr_dist.mr.estimate` (``alpha``, ``egger_t_dist``,
        ``n_boot``, ``seed``).

    Returns
    -------
    xr.Dataset
        Dims ``(pair, locus, method)``, dask-backed in blocks of whole locus
        chunks of ``effects`` (about :data:`MR_BLOCK_BYTES` each): float ``local_ce, local_se, ci_lower, ci_upper, pvalue,
        intercept, intercept_se, intercept_pvalue, q, i2gx``, int
        ``n_instruments`` and ``n_excluded`` (selected instruments left out
        as invalid, :func:`deepmr_dist.stages.instruments.usable`), fixed-width str ``reason`` ("" where defined,
        else a code of :data:`deepmr_dist.mr.REASONS`) and ``note`` ("" or a
        caveat code of :data:`deepmr_dist.mr.NOTES`). Coords:
        ``pair`` ("EXPOSURE->OUTCOME"), ``exposure(pair)``, ``outcome(pair)``,
        ``locus``, ``method``. Attrs record the selection and MR options.
    """
    _check_effects(effects)
    instruments.check_rule(rule, threshold)
    pairs = _check_pairs(effects, pairs)
    from deepmr_dist.mr import check_methods

    methods = list(check_methods(methods))
    tasks = sorted({t for pair in pairs for t in pair})
    stats: dict[str, tuple[float, float]] = {}
    if rule == "pooled_z":
        stats = instruments.pooled_stats(effects, [e for e, _ in pairs], ddof=ddof)
    ds = effects[["effect", "effect_se"]].sel(task=tasks).reset_coords(drop=True)
    ds = ds.chunk({"position": -1, "allele": -1, "task": -1})  # numpy -> one dask block; dask: whole non-locus dims
    ds = ds.chunk({"locus": _mr_block_loci(ds)})
    order = ("locus", *_CANDIDATE_DIMS, "task")
    kernel = partial(_block_local_ce, tasks=tasks, pairs=pairs, methods=methods, rule=rule, threshold=float(threshold),
                     stats=stats, mr_options=mr_options)  # fmt: skip
    records = da.blockwise(
        kernel, "plm", ds["effect"].transpose(*order).data, "lxat", ds["effect_se"].transpose(*order).data, "lxat",
        new_axes={"p": len(pairs), "m": len(methods)}, concatenate=True, dtype=_record_dtype(),
    )  # fmt: skip
    result = xr.Dataset({name: (_DIMS, records[name]) for name in records.dtype.names}, coords={"locus": ds["locus"].values})
    result = result.assign_coords(
        pair=[pair_label(e, o) for e, o in pairs],
        exposure=("pair", [e for e, _ in pairs]),
        outcome=("pair", [o for _, o in pairs]),
        method=methods,
    )
    locus_coords = {
        name: coord for name, coord in effects.coords.items() if coord.dims == ("locus",) and name != "locus"
    }
    result = result.assign_coords(locus_coords)  # e.g. locus intervals travel along
    result.attrs = {
        "instrument_rule": rule,
        "instrument_threshold": float(threshold),
        "instrument_ddof": int(ddof),
        **{f"mr_{k}": v for k, v in mr_options.items()},
    }
    if rule == "pooled_z":
        result.attrs["pooled_stats"] = {e: list(stats[e]) for e in stats}
    return _described(result, schema.MR)


# --------------------------------------------------------------------------- global CE

I2GX_DILUTION = 0.9
"""I^2_GX below which Bowden et al. (2016) expect MR-Egger's regression dilution to matter (and recommend SIMEX)."""


def _dilution_summary(i2gx: np.ndarray, dims: tuple[str, ...]) -> dict[str, tuple]:
    """Mean local I^2_GX and the share of loci below :data:`I2GX_DILUTION`, per (pair, method); NaN without any."""
    finite = np.isfinite(i2gx)
    count = finite.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(finite, i2gx, 0.0).sum(axis=-1) / count
        below = (finite & (i2gx < I2GX_DILUTION)).sum(axis=-1) / count
    return {"mean_i2gx": (dims, mean), "share_i2gx_below_0_9": (dims, below)}



def _gathered(arrays: dict[str, xr.DataArray]) -> dict[str, np.ndarray]:
    """The values of lazy ``(..., locus)`` arrays, their locus chunks computed on the workers and joined here.

    Computing the arrays whole would join every chunk in one worker, which then holds them
    twice beside its compiled kernels (a worker at 80 % of 1 GiB for 180,000 loci, paused).
    """
    lazy = {name: arr.chunk({dim: -1 for dim in arr.dims if dim != "locus"}) for name, arr in arrays.items() if arr.chunks is not None}
    pieces = {name: arr.data.to_delayed().ravel().tolist() for name, arr in lazy.items()}
    values = progress.compute(*(piece for blocks in pieces.values() for piece in blocks), what="local CEs")
    out, start = {}, 0
    for name, arr in arrays.items():
        if name not in pieces:
            out[name] = np.asarray(arr.values)
            continue
        blocks = values[start : start + len(pieces[name])]
        start += len(pieces[name])
        out[name] = np.concatenate([np.asarray(block) for block in blocks], axis=-1)
    return out


def global_ce(
    local: xr.Dataset,
    *,
    meta_method: str = "dl",
    hksj: bool = False,
    hksj_adhoc: bool = False,
    alpha: float = 0.05,
) -> xr.Dataset:
    """Meta-analyse local CEs across loci, per (pair, method).

    Loci whose ``local_ce`` or ``local_se`` is undefined (NaN, or a
    non-positive SE) are excluded and counted in ``n_loci_undefined``;
    ``k`` is the number of loci used. The local estimates are computed (one
    pass over the lazy graph for both variables, a progress bar inside
    :func:`deepmr_dist.io.progress.shown`) and held in memory as
    ``(pair x method, locus)`` float64 arrays.

    Parameters
    ----------
    local : xr.Dataset
        Output of :func:`local_ce` (lazy or computed).
    meta_method : {"fe", "dl", "reml", "pm"}
    hksj, hksj_adhoc, alpha
        As :func:`deepmr_dist.meta.meta_analysis`.

    Returns
    -------
    xr.Dataset
        Dims ``(pair, method)``: float ``global_ce, global_se, ci_lower,
        ci_upper, pvalue, tau2, i2, h2, q, q_pvalue, pi_lower, pi_upper``, int
        ``k, n_loci_undefined``, str ``reason``, and the dilution summary
        ``mean_i2gx`` and ``share_i2gx_below_0_9`` (NaN for methods without
        I^2_GX); attrs ``meta_method``,
        ``hksj``, ``hksj_adhoc``, ``alpha``.
    """
    check_method(meta_method)
    names = ["local_ce", "local_se", *(["i2gx"] if "i2gx" in local else [])]
    pair_method = _gathered({name: local[name].transpose("pair", "method", "locus") for name in names})
    n_pairs, n_methods, n_loci = pair_method["local_ce"].shape
    est = pair_method["local_ce"].reshape(n_pairs * n_methods, n_loci)
    se = pair_method["local_se"].reshape(n_pairs * n_methods, n_loci)
    res = meta_analysis(est, se, meta_method, hksj=hksj, hksj_adhoc=hksj_adhoc, alpha=alpha)
    dims = schema.variable(schema.META, "global_ce").dims  # (pair, method)
    shape = (n_pairs, n_methods)
    data_vars = {name: (dims, getattr(res, field).reshape(shape)) for name, field in GLOBAL_VARIABLES.items()}
    data_vars["k"] = (dims, res.k.reshape(shape))
    data_vars["n_loci_undefined"] = (dims, (n_loci - res.k).reshape(shape))
    i2gx = pair_method["i2gx"] if "i2gx" in pair_method else np.full((n_pairs, n_methods, n_loci), np.nan)
    data_vars.update(_dilution_summary(i2gx, dims))
    width = max(len(code) for code in META_REASONS)
    data_vars["reason"] = (dims, res.reason.astype(f"<U{width}").reshape(shape))
    coords = {name: local[name] for name in ("pair", "method", "exposure", "outcome") if name in local.coords}
    out = xr.Dataset(data_vars, coords=coords)
    out.attrs = {
        "meta_method": meta_method,
        "hksj": bool(hksj),
        "hksj_adhoc": bool(hksj_adhoc),
        "alpha": float(alpha),
        "n_loci": int(n_loci),
    }
    return _described(out, schema.META)

