"""``deepmr export``: a run store's effects, instruments or local CEs as files other tools read.

What and how (:data:`FORMATS` says which formats each kind takes):

``effects``
    One row per (locus, position, alternative allele): ``locus``, ``position``
    (0-based in the window), ``ref``, ``alt``, and for BED loci ``chrom``,
    ``pos`` (1-based genome coordinate, as VCF) and ``variant_id``
    (``chrom:pos:ref>alt``); then ``effect_<task>`` and ``effect_se_<task>`` per
    task. ``tsv``/``parquet`` write that table; ``vcf`` writes a VCF 4.3 with
    one INFO pair ``EFFECT_<task>``/``SE_<task>`` per task (loci without
    genome coordinates get their locus id as CHROM and the window position as
    POS, stated in the header); ``bedgraph`` writes one track per task of the
    per-position maximum |effect| over the three alternative alleles (BED
    loci only: a bedGraph needs genome coordinates).
``instruments`` (with ``pair``)
    Each locus's instruments of the pair, selected as the store's MR stage did
    (the rule, threshold and pooled statistics recorded in the ``mr`` group):
    columns ``locus, bx, bxse, by, byse``, the input of ``deepmr mr`` and of
    ``MendelianRandomization::mr_input``, so any local CE can be rechecked.
``local_ce``
    The local CE table, as ``deepmr run`` writes it.

Effects are written one locus chunk at a time (never the whole array in memory).
Missing values are written as ``NA`` in TSV and ``.`` in VCF.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.errors import InputError, StoreError
from deepmr_dist.pipeline.outputs import local_table_from
from deepmr_dist.stages import instruments
from deepmr_dist.stages.causal_effects import InstrumentSelection

__all__ = ["FORMATS", "export"]

FORMATS: dict[str, tuple[str, ...]] = {
    "effects": ("tsv", "parquet", "vcf", "bedgraph"),
    "instruments": ("tsv", "parquet"),
    "local_ce": ("tsv", "parquet"),
}
"""What can be exported, and in which formats (the first is the default)."""

NA = "NA"
"""Missing values in TSV output (as R writes them)."""

ALLELES = np.array(list("ACGT"))


def export(groups: dict[str, xr.Dataset], what: str, fmt: str, out: Path, *, pair: str | None = None) -> int:
    """Write ``what`` of a run's groups (:func:`deepmr_dist.io.store.open_run`) to ``out`` as ``fmt``; return the rows written.

    Raises
    ------
    InputError
        An unknown ``what``/``fmt`` combination, a missing or unknown ``pair``, or a
        bedGraph of loci without genome coordinates.
    StoreError
        If the store lacks the group ``what`` needs.
    """
    if what not in FORMATS:
        raise InputError(f"unknown export {what!r}; valid: {', '.join(FORMATS)}")
    if fmt not in FORMATS[what]:
        raise InputError(f"{what} can be exported as {', '.join(FORMATS[what])}, not {fmt!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if what == "local_ce":
        return _write_frame(local_table_from(_group(groups, schema.MR).load()), out, fmt)
    if what == "instruments":
        if pair is None:
            raise InputError("exporting instruments needs --pair EXPOSURE->OUTCOME")
        return _write_frame(instrument_table(_group(groups, schema.EFFECTS), _group(groups, schema.MR), pair), out, fmt)
    effects, ism = _group(groups, schema.EFFECTS), _group(groups, schema.ISM)
    writer = {"tsv": _effects_tsv, "parquet": _effects_parquet, "vcf": _effects_vcf, "bedgraph": _effects_bedgraph}[fmt]
    return writer(effects, ism, out)


def _group(groups: dict[str, xr.Dataset], name: str) -> xr.Dataset:
    if name not in groups:
        raise StoreError(f"the store has no {name!r} group yet; run the stage that writes it first")
    return groups[name]


def _write_frame(frame: pd.DataFrame, out: Path, fmt: str) -> int:
    if fmt == "parquet":
        frame.to_parquet(out, index=False)
    else:
        frame.to_csv(out, sep="\t", index=False, na_rep=NA)
    return len(frame)


# --------------------------------------------------------------------------- instruments


def instrument_table(effects: xr.Dataset, local: xr.Dataset, pair: str) -> pd.DataFrame:
    """Every locus's instruments of ``pair`` as selected by the MR stage: ``locus, bx, bxse, by, byse``.

    Raises
    ------
    InputError
        If ``pair`` is not one of the ``mr`` group's pairs, or the group records no selection.
    """
    pairs = [str(p) for p in local["pair"].values]
    if pair not in pairs:
        raise InputError(f"the store's MR results have no pair {pair!r}; they have {', '.join(pairs)}")
    if "instrument_rule" not in local.attrs:
        raise InputError("the mr group records no instrument selection (instrument_rule); rerun its stage")
    exposure, outcome = (str(local[name].sel(pair=pair).values) for name in ("exposure", "outcome"))
    rule, threshold = local.attrs["instrument_rule"], float(local.attrs["instrument_threshold"])
    recorded = local.attrs.get("pooled_stats", {})
    if rule == "pooled_z" and exposure not in recorded:
        recorded = instruments.pooled_stats(effects, [exposure], ddof=int(local.attrs.get("instrument_ddof", 0)))
    center, scale = recorded.get(exposure, (np.nan, np.nan))
    frames = []
    for block in _locus_blocks(effects):
        order = ("locus", "position", "allele")
        values = {
            (var, task): np.asarray(block[var].sel(task=task).transpose(*order).values, dtype=np.float64)
            for var in ("effect", "effect_se") for task in (exposure, outcome)
        }  # fmt: skip
        n_loci = values["effect", exposure].shape[0]
        flat = {key: arr.reshape(n_loci, -1) for key, arr in values.items()}
        mask = instruments.instrument_mask(flat["effect", exposure], flat["effect_se", exposure], rule, threshold, center, scale)
        selection = InstrumentSelection(mask)
        columns = {"bx": ("effect", exposure), "bxse": ("effect_se", exposure), "by": ("effect", outcome),
                   "byse": ("effect_se", outcome)}  # fmt: skip
        taken = {name: selection.take(flat[key]) for name, key in columns.items()}
        keep = selection.keep if not selection.empty else np.zeros_like(taken["bx"], dtype=bool)
        rows, _ = np.nonzero(keep)
        frames.append(pd.DataFrame({"locus": block["locus"].values[rows], **{k: v[keep] for k, v in taken.items()}}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["locus", "bx", "bxse", "by", "byse"])


# --------------------------------------------------------------------------- effects


def _locus_blocks(ds: xr.Dataset) -> Iterator[xr.Dataset]:
    """``ds`` one stored locus chunk at a time, loaded."""
    chunks = ds["effect"].chunksizes.get("locus", (ds.sizes["locus"],)) if "effect" in ds else (ds.sizes["locus"],)
    start = 0
    for size in chunks:
        yield ds.isel(locus=slice(start, start + size)).load()
        start += size


def _effect_rows(effects: xr.Dataset, ism: xr.Dataset) -> Iterator[pd.DataFrame]:
    """The long effects table, one locus chunk per frame (reference alleles left out)."""
    tasks = [str(t) for t in effects["task"].values]
    genomic = "chrom" in ism.coords and "start" in ism.coords
    sequences = ism["sequence"]
    start = 0
    for block in _locus_blocks(effects):
        n_loci = block.sizes["locus"]
        codes = np.asarray(sequences.isel(locus=slice(start, start + n_loci)).values)
        eff = np.asarray(block["effect"].transpose("locus", "position", "allele", "task").values, dtype=np.float64)
        ses = np.asarray(block["effect_se"].transpose("locus", "position", "allele", "task").values, dtype=np.float64)
        locus_index, position, allele = np.nonzero(~np.isnan(eff).all(axis=-1))
        ref = np.where(codes < 4, ALLELES[np.minimum(codes, 3)], "N")[locus_index, position]
        frame = {
            "locus": block["locus"].values.astype(object)[locus_index],
            "position": position,
            "ref": ref,
            "alt": ALLELES[allele],
        }
        if genomic:
            chrom = np.asarray(ism["chrom"].values[start : start + n_loci]).astype(object)[locus_index]
            pos = np.asarray(ism["start"].values[start : start + n_loci], dtype=np.int64)[locus_index] + position + 1
            frame.update({"chrom": chrom, "pos": pos,
                          "variant_id": [f"{c}:{p}:{r}>{a}" for c, p, r, a in zip(chrom, pos, ref, frame["alt"])]})  # fmt: skip
        for t, task in enumerate(tasks):
            frame[f"effect_{task}"] = eff[locus_index, position, allele, t]
            frame[f"effect_se_{task}"] = ses[locus_index, position, allele, t]
        yield pd.DataFrame(frame)
        start += n_loci


def _effects_tsv(effects: xr.Dataset, ism: xr.Dataset, out: Path) -> int:
    rows = 0
    with out.open("w") as handle:
        for index, frame in enumerate(_effect_rows(effects, ism)):
            frame.to_csv(handle, sep="\t", index=False, header=index == 0, na_rep=NA)
            rows += len(frame)
    return rows


def _effects_parquet(effects: xr.Dataset, ism: xr.Dataset, out: Path) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows, writer = 0, None
    try:
        for frame in _effect_rows(effects, ism):
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(out, table.schema)
            writer.write_table(table)
            rows += len(frame)
    finally:
        if writer is not None:
            writer.close()
    return rows


def _effects_vcf(effects: xr.Dataset, ism: xr.Dataset, out: Path) -> int:
    from deepmr_dist import __version__

    tasks = [str(t) for t in effects["task"].values]
    genomic = "chrom" in ism.coords
    header = ["##fileformat=VCFv4.3", f"##source=deepmr-dist {__version__} (in-silico mutagenesis effects)"]
    if not genomic:
        header.append("##note=loci have no genome coordinates: CHROM is the locus id, POS the 1-based window position")
    for task in tasks:
        header.append(f'##INFO=<ID=EFFECT_{task},Number=1,Type=Float,Description="Mean over members of mut - ref, task {task}">')
        header.append(f'##INFO=<ID=SE_{task},Number=1,Type=Float,Description="SD over members of mut - ref, task {task}">')
    header.append("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO")
    rows = 0
    with out.open("w") as handle:
        handle.write("\n".join(header) + "\n")
        for frame in _effect_rows(effects, ism):
            chrom = frame["chrom"] if genomic else frame["locus"]
            pos = frame["pos"] if genomic else frame["position"] + 1
            ids = frame["variant_id"] if genomic else "."
            info = [";".join(f"{name}_{task}={_vcf_number(value)}" for task in tasks
                             for name, value in (("EFFECT", row[f"effect_{task}"]), ("SE", row[f"effect_se_{task}"])))
                    for row in frame.to_dict("records")]  # fmt: skip
            body = pd.DataFrame({"CHROM": chrom, "POS": pos, "ID": ids, "REF": frame["ref"], "ALT": frame["alt"],
                                 "QUAL": ".", "FILTER": ".", "INFO": info})  # fmt: skip
            body.to_csv(handle, sep="\t", index=False, header=False)
            rows += len(body)
    return rows


def _vcf_number(value: float) -> str:
    return "." if not np.isfinite(value) else f"{value:.6g}"


def _effects_bedgraph(effects: xr.Dataset, ism: xr.Dataset, out: Path) -> int:
    if "chrom" not in ism.coords or "start" not in ism.coords:
        raise InputError("a bedGraph needs genome coordinates: these loci were not read from a BED file (use --format tsv)")
    tasks = [str(t) for t in effects["task"].values]
    rows = 0
    with out.open("w") as handle:
        for t, task in enumerate(tasks):
            handle.write(f'track type=bedGraph name="{task} max|effect|" description="deepmr: max |effect| per position"\n')
            start = 0
            for block in _locus_blocks(effects):
                n_loci = block.sizes["locus"]
                eff = np.abs(np.asarray(block["effect"].isel(task=t).transpose("locus", "position", "allele").values,
                                        dtype=np.float64))  # fmt: skip
                peak = np.where(np.isnan(eff).all(axis=-1), np.nan, np.nanmax(np.where(np.isnan(eff), -np.inf, eff), axis=-1))
                chrom = np.asarray(ism["chrom"].values[start : start + n_loci]).astype(object)
                first = np.asarray(ism["start"].values[start : start + n_loci], dtype=np.int64)
                locus_index, position = np.nonzero(np.isfinite(peak))
                begin = first[locus_index] + position
                frame = pd.DataFrame({"chrom": chrom[locus_index], "start": begin, "end": begin + 1,
                                      "value": peak[locus_index, position]})  # fmt: skip
                frame.to_csv(handle, sep="\t", index=False, header=False, float_format="%.6g")
                rows += len(frame)
                start += n_loci
    return rows
