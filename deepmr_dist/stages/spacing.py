"""Motif-spacing stratification of global causal effects (the paper's S1 Fig).

Does the causal effect of TF A on TF B depend on how far apart their motifs
sit? From a BED of motif instances, every locus gets, per (exposure TF,
outcome TF) pair, the distance between the two TFs' instances; the distances
are binned, and the local CEs of the loci of each bin are meta-analysed.

Definitions
-----------
Instance inside a locus
    An instance counts for a locus when it lies wholly inside the locus
    interval on the same chromosome: ``locus.start <= start`` and
    ``end <= locus.end`` (BED coordinates, 0-based, half-open). Instances that
    straddle a locus boundary are ignored; overlapping loci may share an
    instance.
Distance
    The minimum, over every pair ``(a, b)`` of an exposure-TF instance ``a``
    and an outcome-TF instance ``b`` inside the locus, of the centre-to-centre
    distance ``|centre(a) - centre(b)|`` in bp, with ``centre = (start + end) / 2``
    (so distances are multiples of 0.5). Symmetric in the two TFs; NaN when
    the locus lacks either TF.
Bins
    Left-closed, right-open: bin ``i`` holds distances ``d`` with
    ``edges[i] <= d < edges[i + 1]``. The default edges ``(0, 35, 70, 150, inf)``
    give the bins ``"0-35"``, ``"35-70"``, ``"70-150"`` and ``">=150"``. A NaN
    distance, or one outside ``[edges[0], edges[-1])``, gets no bin (``""``).

Functions
---------
:func:`motif_instances` reads the BED; :func:`locus_spacing` computes the
``(pair, locus)`` distances; :func:`spacing_bins` labels them;
:func:`stratified_global_ce` runs :func:`deepmr_dist.meta.meta_analysis` on
each (pair, method, bin)'s loci, with the same exclusion of undefined local
estimates as :func:`deepmr_dist.stages.causal_effects.global_ce`.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from deepmr_dist.stages.causal_effects import pair_label
from deepmr_dist.errors import InputError
from deepmr_dist.meta import check_method, meta_analysis

__all__ = [
    "DEFAULT_EDGES",
    "STRATIFIED_COLUMNS",
    "locus_spacing",
    "motif_instances",
    "spacing_bins",
    "stratified_global_ce",
]

DEFAULT_EDGES: tuple[float, ...] = (0.0, 35.0, 70.0, 150.0, np.inf)
"""Bin edges in bp of the paper's S1 Fig (left-closed, right-open bins)."""

STRATIFIED_COLUMNS: tuple[str, ...] = (
    "pair", "method", "bin", "k", "estimate", "se", "ci_lower", "ci_upper", "tau2",
)  # fmt: skip
"""Columns of :func:`stratified_global_ce`, in order."""

INSTANCE_COLUMNS: tuple[str, ...] = ("chrom", "start", "end", "name", "score", "strand", "line")
"""Columns of :func:`motif_instances`."""

_HEADER_PREFIXES = ("#", "track", "browser")
_STRANDS = frozenset({"+", "-", "."})


# --------------------------------------------------------------------------- reading


def _parse_line(fields: list[str], where: str) -> tuple[str, int, int, str, float, str]:
    """Validate one tab-split BED line; ``where`` is ``"path:line"`` for messages."""
    if len(fields) < 4:
        raise InputError(
            f"{where}: a motif BED line needs at least 4 tab-separated columns "
            f"(chrom, start, end, name), got {len(fields)}"
        )
    chrom, start_text, end_text, name = (f.strip() for f in fields[:4])
    if not chrom:
        raise InputError(f"{where}: empty chromosome name")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise InputError(f"{where}: start and end must be integers, got {start_text!r}, {end_text!r}") from None
    if start < 0 or end <= start:
        raise InputError(f"{where}: invalid interval {chrom}:{start}-{end} (need 0 <= start < end)")
    if name in ("", "."):
        raise InputError(f"{where}: column 4 (name) must name the TF, got {name!r}")
    score = np.nan
    if len(fields) > 4 and fields[4].strip() not in ("", "."):
        try:
            score = float(fields[4])
        except ValueError:
            raise InputError(f"{where}: column 5 (score) must be a number or '.', got {fields[4]!r}") from None
    strand = fields[5].strip() if len(fields) > 5 and fields[5].strip() else "."
    if strand not in _STRANDS:
        raise InputError(f"{where}: column 6 (strand) must be '+', '-' or '.', got {fields[5]!r}")
    return chrom, start, end, name, score, strand


def motif_instances(path: str | Path) -> pd.DataFrame:
    """Read a BED file of motif instances.

    Columns: chrom, start, end (0-based, half-open), name (the TF) and
    optionally score (a number or ``"."``) and strand (``+``, ``-`` or ``.``);
    further columns are ignored. Blank lines and lines starting with ``#``,
    ``track`` or ``browser`` are skipped.

    Parameters
    ----------
    path : str or pathlib.Path
        The BED file (tab-separated).

    Returns
    -------
    pandas.DataFrame
        Columns :data:`INSTANCE_COLUMNS`: chrom (str), start, end (int64),
        name (str), score (float64, NaN where absent), strand (str, ``"."``
        where absent) and line (int64, the 1-based line number in the file).

    Raises
    ------
    InputError
        The file does not exist or holds no instance, or a line is malformed
        (the message names the file and line): fewer than 4 columns,
        non-integer coordinates, ``start < 0`` or ``end <= start``, an empty
        name, a non-numeric score or an unknown strand.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"motif BED file {path} does not exist")
    rows = []
    lines = []
    with path.open() as handle:
        for lineno, line in enumerate(handle, start=1):
            text = line.rstrip("\r\n")
            if not text.strip() or text.startswith(_HEADER_PREFIXES):
                continue
            rows.append(_parse_line(text.split("\t"), f"{path}:{lineno}"))
            lines.append(lineno)
    if not rows:
        raise InputError(f"motif BED file {path} contains no motif instances")
    frame = pd.DataFrame(rows, columns=list(INSTANCE_COLUMNS[:-1]))
    frame["line"] = np.asarray(lines, dtype=np.int64)
    return frame.astype({"start": np.int64, "end": np.int64, "score": np.float64})


# --------------------------------------------------------------------------- distances


def _loci_table(loci_intervals: xr.Dataset | xr.DataArray | pd.DataFrame) -> pd.DataFrame:
    """Locus name, chrom, start and end as a DataFrame with a default index, validated."""
    if isinstance(loci_intervals, xr.Dataset | xr.DataArray):
        missing = [c for c in ("chrom", "start", "end") if c not in loci_intervals.coords]
        if "locus" not in loci_intervals.coords or missing:
            raise InputError(
                "loci intervals: the dataset needs a 'locus' coordinate with 'chrom', 'start' and 'end' "
                f"coordinates along it; missing {', '.join(missing) or 'locus'}"
            )
        off_locus = [c for c in ("chrom", "start", "end") if loci_intervals[c].dims != ("locus",)]
        if off_locus:
            raise InputError(f"loci intervals: coordinate(s) {', '.join(off_locus)} must have dims ('locus',)")
        table = pd.DataFrame({name: loci_intervals[name].values for name in ("locus", "chrom", "start", "end")})
    else:
        missing = [c for c in ("chrom", "start", "end") if c not in loci_intervals.columns]
        if missing:
            raise InputError(
                f"loci intervals table lacks column(s) {', '.join(missing)}; "
                "expected chrom, start, end and the locus names as a 'locus' column or the index"
            )
        table = pd.DataFrame(
            {
                "locus": loci_intervals["locus"] if "locus" in loci_intervals.columns else loci_intervals.index,
                **{name: loci_intervals[name] for name in ("chrom", "start", "end")},
            }
        ).reset_index(drop=True)
    names = table["locus"].astype(str)
    dupes = sorted(set(names[names.duplicated()]))
    if dupes:
        raise InputError(f"loci intervals: duplicate locus name(s) {', '.join(dupes[:5])}")
    start = pd.to_numeric(table["start"], errors="coerce").to_numpy(dtype=np.float64)
    end = pd.to_numeric(table["end"], errors="coerce").to_numpy(dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(start) & np.isfinite(end) & (start == np.round(start)) & (end == np.round(end))
        bad = np.flatnonzero(~ok | (start < 0) | (end <= start))
    if bad.size:
        i = bad[0]
        raise InputError(
            f"loci intervals: locus {names[i]!r} has an invalid interval "
            f"{table['chrom'][i]}:{table['start'][i]}-{table['end'][i]} (need integers 0 <= start < end)"
        )
    return pd.DataFrame(
        {
            "locus": names,
            "chrom": table["chrom"].astype(str),
            "start": start.astype(np.int64),
            "end": end.astype(np.int64),
        }
    )


def _containment(instances: pd.DataFrame, loci: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Every (instance row, locus row) pair with the instance wholly inside the locus.

    Per chromosome, the loci that can contain an instance ``[s, e)`` are those
    with ``e - W <= locus.start <= s`` (``W`` the widest locus there), found by
    binary search on the sorted locus starts and then filtered on the end.
    """
    inst_rows, locus_rows = [], []
    inst_chrom = instances["chrom"].to_numpy(dtype=str)
    locus_chrom = loci["chrom"].to_numpy(dtype=str)
    for chrom in np.intersect1d(inst_chrom, locus_chrom):
        li = np.flatnonzero(locus_chrom == chrom)
        li = li[np.argsort(loci["start"].to_numpy()[li], kind="stable")]
        lstart, lend = loci["start"].to_numpy()[li], loci["end"].to_numpy()[li]
        ii = np.flatnonzero(inst_chrom == chrom)
        istart, iend = instances["start"].to_numpy()[ii], instances["end"].to_numpy()[ii]
        widest = int((lend - lstart).max())
        lo = np.searchsorted(lstart, iend - widest, side="left")
        hi = np.searchsorted(lstart, istart, side="right")
        counts = np.maximum(hi - lo, 0)
        which = np.repeat(np.arange(ii.size), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cand = np.repeat(lo, counts) + offsets
        inside = lend[cand] >= iend[which]
        inst_rows.append(ii[which[inside]])
        locus_rows.append(li[cand[inside]])
    if not inst_rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    return np.concatenate(inst_rows), np.concatenate(locus_rows)


def _min_distance(
    loc_a: np.ndarray, rel_a: np.ndarray, loc_b: np.ndarray, rel_b: np.ndarray, n_loci: int, stride: int
) -> np.ndarray:
    """Per locus, the minimum ``|rel_a - rel_b|`` over instances of the same locus (inf where none).

    ``rel`` are doubled centres relative to the locus start, in ``[0, stride)``;
    the key ``locus * stride + rel`` sorts B locus by locus, so the nearest B of
    an A in its own locus is one of the two B keys next to the A key.
    """
    best = np.full(n_loci, np.inf)
    if loc_a.size == 0 or loc_b.size == 0:
        return best
    key_b = loc_b * stride + rel_b
    order = np.argsort(key_b, kind="stable")
    key_b, loc_b, rel_b = key_b[order], loc_b[order], rel_b[order]
    pos = np.searchsorted(key_b, loc_a * stride + rel_a)
    nearest = np.full(loc_a.size, np.inf)
    for cand in (pos - 1, pos):
        ok = (cand >= 0) & (cand < key_b.size)
        c = np.where(ok, cand, 0)
        ok &= loc_b[c] == loc_a
        nearest = np.minimum(nearest, np.where(ok, np.abs(rel_a - rel_b[c]), np.inf))
    np.minimum.at(best, loc_a, nearest)
    return best


def locus_spacing(
    instances: pd.DataFrame,
    loci_intervals: xr.Dataset | xr.DataArray | pd.DataFrame,
    pairs: Sequence[tuple[str, str]],
    *,
    motif_names: Mapping[str, str] | None = None,
) -> xr.DataArray:
    """Distance between the exposure TF's and the outcome TF's motif instances in every locus.

    Parameters
    ----------
    instances : pandas.DataFrame
        Motif instances with columns chrom, start, end, name (e.g. from
        :func:`motif_instances`).
    loci_intervals : xr.Dataset, xr.DataArray or pandas.DataFrame
        The loci: an xarray object with a ``locus`` coordinate and ``chrom``,
        ``start``, ``end`` coordinates along it (a run store's groups, or the
        output of :func:`deepmr_dist.stages.causal_effects.local_ce`), or a DataFrame with
        columns chrom, start, end and the locus names in a ``locus`` column or
        the index. Coordinates are 0-based, half-open.
    pairs : sequence of (str, str)
        ``(exposure, outcome)`` task names.
    motif_names : mapping, optional
        The BED name of a task's motif, for tasks named differently from their
        motif (e.g. ``{"CTCF_counts": "CTCF"}``); unmapped tasks are looked up
        under their own name.

    Returns
    -------
    xr.DataArray
        ``motif_distance``, float64 in bp, dims ``(pair, locus)``; coords
        ``pair`` ("EXPOSURE->OUTCOME"), ``exposure(pair)``, ``outcome(pair)``,
        ``locus``. NaN where the locus lacks an instance of either TF. See the
        module docstring for the definition.

    Raises
    ------
    InputError
        Missing columns or coordinates, invalid or duplicate loci, no pairs, a
        pair whose two tasks map to the same motif, or a motif with no instance
        in ``instances``.
    """
    missing = [c for c in ("chrom", "start", "end", "name") if c not in instances.columns]
    if missing:
        raise InputError(f"motif instances lack column(s) {', '.join(missing)}")
    pairs = [(str(e), str(o)) for e, o in pairs]
    if not pairs:
        raise InputError("locus_spacing: no (exposure, outcome) pairs given")
    motif_names = dict(motif_names or {})
    motif = {task: motif_names.get(task, task) for pair in pairs for task in pair}
    same = [pair_label(e, o) for e, o in pairs if motif[e] == motif[o]]
    if same:
        raise InputError(f"pair(s) {', '.join(same)}: exposure and outcome map to the same motif")
    names = instances["name"].astype(str).to_numpy()
    absent = sorted({m for m in motif.values() if m not in set(names)})
    if absent:
        raise InputError(
            f"motif(s) {', '.join(map(repr, absent))} have no instance in the motif BED; "
            f"it names {', '.join(sorted(set(names))[:20])}"
        )
    loci = _loci_table(loci_intervals)
    inst_row, locus_row = _containment(instances, loci)
    starts = instances["start"].to_numpy(dtype=np.int64)
    ends = instances["end"].to_numpy(dtype=np.int64)
    rel = (starts + ends)[inst_row] - 2 * loci["start"].to_numpy()[locus_row]  # doubled centre offsets
    stride = 2 * int((loci["end"] - loci["start"]).max()) + 1
    member_name = names[inst_row]
    n_loci = len(loci)
    out = np.full((len(pairs), n_loci), np.nan)
    for p, (exposure, outcome) in enumerate(pairs):
        a = member_name == motif[exposure]
        b = member_name == motif[outcome]
        best = _min_distance(locus_row[a], rel[a], locus_row[b], rel[b], n_loci, stride)
        out[p] = np.where(np.isfinite(best), best / 2.0, np.nan)
    return xr.DataArray(
        out,
        dims=("pair", "locus"),
        coords={
            "pair": [pair_label(e, o) for e, o in pairs],
            "exposure": ("pair", [e for e, _ in pairs]),
            "outcome": ("pair", [o for _, o in pairs]),
            "locus": loci["locus"].to_numpy(dtype=object),
        },
        name="motif_distance",
        attrs={
            "units": "bp",
            "description": "minimum centre-to-centre distance between an exposure-TF and an outcome-TF "
            "motif instance lying wholly inside the locus; NaN when either TF is absent",
        },
    )


# --------------------------------------------------------------------------- bins


def _bin_labels(edges: np.ndarray) -> list[str]:
    labels = [f"{lo:g}-{hi:g}" for lo, hi in itertools.pairwise(edges)]
    if np.isinf(edges[-1]):
        labels[-1] = f">={edges[-2]:g}"
    return labels


def spacing_bins(distance: xr.DataArray, edges: Sequence[float] = DEFAULT_EDGES) -> xr.DataArray:
    """Label every distance with its bin.

    Parameters
    ----------
    distance : xr.DataArray
        Distances in bp (e.g. from :func:`locus_spacing`), any dims.
    edges : sequence of float
        At least two strictly increasing, non-negative edges; the last may be
        ``inf``. Bin ``i`` is ``[edges[i], edges[i + 1])``.

    Returns
    -------
    xr.DataArray
        str, same dims and coords as ``distance``: ``"lo-hi"`` (``">=lo"``
        for an infinite upper edge), ``""`` where the distance is NaN or
        outside ``[edges[0], edges[-1])``. ``attrs["labels"]`` lists the bins
        in order of distance and ``attrs["closed"]`` is ``"left"``.

    Raises
    ------
    InputError
        Fewer than two edges, a NaN, negative or non-increasing edge, or an
        infinite edge other than the last.
    """
    edges_arr = np.asarray(edges, dtype=np.float64)
    if (
        edges_arr.ndim != 1
        or edges_arr.size < 2
        or np.isnan(edges_arr).any()
        or (edges_arr < 0).any()
        or (np.diff(edges_arr) <= 0).any()
        or np.isinf(edges_arr[:-1]).any()
    ):
        raise InputError(
            f"spacing bin edges must be at least two strictly increasing non-negative numbers "
            f"(only the last may be inf), got {list(edges)}"
        )
    labels = _bin_labels(edges_arr)
    values = np.asarray(distance.values, dtype=np.float64)
    index = np.searchsorted(edges_arr, values, side="right") - 1  # NaN sorts last: index = n_edges - 1
    valid = np.isfinite(values) & (index >= 0) & (index < len(labels))
    table = np.asarray([*labels, ""], dtype=f"<U{max(map(len, labels))}")
    out = distance.copy(data=table[np.where(valid, index, len(labels))])
    out.name = "spacing_bin"
    out.attrs = {"labels": labels, "closed": "left", "units": distance.attrs.get("units", "bp")}
    return out


# --------------------------------------------------------------------------- meta-analysis


def _bin_order(bins: xr.DataArray) -> list[str]:
    """Bin labels in order: ``attrs["labels"]`` when present, else order of first appearance."""
    if "labels" in bins.attrs:
        return [str(label) for label in bins.attrs["labels"]]
    seen = pd.unique(pd.Series(np.asarray(bins.values, dtype=str).ravel()))
    return [str(label) for label in seen if label != ""]


def stratified_global_ce(
    local: xr.Dataset,
    spacing_bins: xr.DataArray,
    *,
    meta_method: str = "dl",
    hksj: bool = False,
    hksj_adhoc: bool = False,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Global CE per (pair, method, spacing bin): a meta-analysis of the loci of each bin.

    For each pair of ``spacing_bins`` and each method of ``local``, the local
    estimates of the loci whose bin is ``b`` are meta-analysed with
    :func:`deepmr_dist.meta.meta_analysis` (loci with an undefined local CE or
    SE are left out, as in :func:`deepmr_dist.stages.causal_effects.global_ce`). Loci of
    ``local`` that ``spacing_bins`` lacks get no bin.

    Parameters
    ----------
    local : xr.Dataset
        ``local_ce`` and ``local_se`` with dims ``(pair, locus, method)``, e.g.
        from :func:`deepmr_dist.stages.causal_effects.local_ce` (lazy or computed).
    spacing_bins : xr.DataArray
        str bin labels with dims ``(pair, locus)``, from :func:`spacing_bins`;
        ``""`` means no bin.
    meta_method : {"fe", "dl", "reml", "pm"}
    hksj, hksj_adhoc, alpha
        As :func:`deepmr_dist.meta.meta_analysis`.

    Returns
    -------
    pandas.DataFrame
        One row per (pair, method, bin), bins in the order of
        ``spacing_bins.attrs["labels"]`` (else order of first appearance), bins
        without loci included (``k = 0``, NaN estimates). Columns
        :data:`STRATIFIED_COLUMNS`; ``bin`` is an ordered categorical.

    Raises
    ------
    InputError
        An unknown ``meta_method`` (listing the valid ones) or a bad ``alpha``;
        ``local`` lacks ``local_ce``/``local_se``, ``spacing_bins`` has other
        dims, or names a pair or locus absent from ``local``.
    """
    check_method(meta_method)
    for name in ("local_ce", "local_se"):
        if name not in local or set(local[name].dims) != {"pair", "locus", "method"}:
            raise InputError(f"local dataset needs {name!r} with dims (pair, locus, method)")
    if set(spacing_bins.dims) != {"pair", "locus"}:
        raise InputError(f"spacing bins have dims {spacing_bins.dims}, expected (pair, locus)")
    pairs = [str(p) for p in spacing_bins["pair"].values]
    for dim, wanted in (("pair", pairs), ("locus", [str(x) for x in spacing_bins["locus"].values])):
        known = set(map(str, local[dim].values))
        extra = [x for x in wanted if x not in known]
        if extra:
            raise InputError(
                f"spacing bins name {dim}(s) absent from the local CEs: {', '.join(map(repr, extra[:5]))}"
            )
    labels = _bin_order(spacing_bins)
    bins = spacing_bins.astype(str).reindex(locus=local["locus"].values, fill_value="").transpose("pair", "locus")
    data = local[["local_ce", "local_se"]].sel(pair=pairs).transpose("pair", "method", "locus").compute()
    methods = [str(m) for m in data["method"].values]
    est = data["local_ce"].values.astype(np.float64)  # (pair, method, locus)
    se = data["local_se"].values.astype(np.float64)
    # (bin, pair, 1, locus): locus l of pair p is in bin b
    in_bin = np.asarray(bins.values)[None, :, None, :] == np.asarray(labels)[:, None, None, None]
    shape = (len(labels), len(pairs), len(methods), est.shape[-1])
    est_b = np.where(in_bin, est[None], np.nan).reshape(-1, shape[-1])
    se_b = np.where(in_bin, se[None], np.nan).reshape(-1, shape[-1])
    res = meta_analysis(est_b, se_b, meta_method, hksj=hksj, hksj_adhoc=hksj_adhoc, alpha=alpha)
    bin_idx, pair_idx, method_idx = (g.ravel() for g in np.indices(shape[:3]))
    table = pd.DataFrame(
        {
            "pair": np.asarray(pairs, dtype=object)[pair_idx],
            "method": np.asarray(methods, dtype=object)[method_idx],
            "bin": pd.Categorical(np.asarray(labels, dtype=object)[bin_idx], categories=labels, ordered=True),
            "k": res.k,
            **{name: getattr(res, name) for name in ("estimate", "se", "ci_lower", "ci_upper", "tau2")},
        }
    )
    order = np.lexsort((bin_idx, method_idx, pair_idx))
    return table.iloc[order].reset_index(drop=True)[list(STRATIFIED_COLUMNS)]
