"""``deepmr report STORE``: one self-contained HTML file describing a run.

The report embeds every figure as a base64 PNG (no files beside it), and
lists the run's config, the software versions, what each store group holds
(dims, in-memory and on-disk sizes), the stage timings and the global CE
table. Figures: the forest plot of each MR method, the MR scatter of the locus
with the most instruments for each pair (for the Egger-type methods run), and
the motif-spacing heatmap when the run has one (``spacing.csv`` beside the store).
Loci: for the top loci by instrument count of each pair, the position x allele
heatmaps of the exposure and outcome effects with the instruments marked, and
the logo of the reference bases weighted by mean |effect|; the histogram of
instruments per locus and the share of loci where each method is undefined,
with the reasons.
"""

from __future__ import annotations

import html
import io
import json
import platform
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from deepmr_dist import schema
from deepmr_dist.errors import StoreError
from deepmr_dist.io.location import filesystem, normalize, sibling
from deepmr_dist.pipeline.outputs import Outputs, global_table_from
from deepmr_dist.pipeline.locus_plots import effect_heatmap, effect_logo, instrument_histogram, top_loci, undefined_table
from deepmr_dist.pipeline.plots import EGGER_METHODS, figure_to_base64_png, forest_plot, mr_scatter, spacing_heatmap
from deepmr_dist.io.store import FINGERPRINT_ATTR, open_run

__all__ = ["PACKAGES", "TOP_LOCI", "write_report"]

TOP_LOCI = 3
"""Loci per pair shown with their effect heatmaps and logos (those with the most instruments)."""

PACKAGES = ("deepmr-dist", "torch", "dask", "distributed", "xarray", "zarr", "numpy", "scipy", "pandas")


def write_report(
    store_path: str,
    out: str | Path | None = None,
    *,
    outputs: str | Path | Outputs | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> Path | str:
    """Write the HTML report of the run store at ``store_path``.

    Parameters
    ----------
    store_path
        A run store: a directory or an fsspec URL.
    out
        Local HTML file; default ``report.html`` in ``outputs``.
    outputs
        Folder or fsspec URL of the run's side files (``pipeline.yaml``,
        ``timings.json``, ``spacing.csv``); default the store path without its
        suffix, on the same filesystem.
    storage_options
        fsspec options of the store (and of ``outputs`` given as a path or URL).

    Returns
    -------
    Path or str
        The HTML file: a local path, or the URL of a remote ``outputs``.

    Raises
    ------
    StoreError
        If the store has no ``meta`` group yet (run the MR and meta-analysis stages first).
    """
    groups = open_run(store_path, storage_options=storage_options)
    if schema.META not in groups or schema.MR not in groups:
        raise StoreError(f"{store_path} has no MR and meta-analysis results yet; run `deepmr run` to the end first")
    if not isinstance(outputs, Outputs):
        outputs = Outputs(*normalize(str(outputs) if outputs is not None else sibling(store_path), storage_options))
    sections = [
        _section("Global causal effects", _global_table(groups[schema.META], store_path, storage_options)),
        _section("Figures", _figures(groups, outputs)),
        _section("Loci", _loci(groups)),
        _section("Store contents", _contents(store_path, groups, storage_options)),
        _section("Run", _run_facts(groups[schema.ISM], outputs)),
        _section("Software", _versions(groups[schema.ISM])),
    ]
    title = f"deepmr report: {html.escape(str(store_path))}"
    document = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{title}</title><style>{_CSS}</style></head><body>"
        f"<h1>{title}</h1><p class='meta'>written {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(document)
        return Path(out)
    outputs.write_bytes("report.html", document.encode())
    return outputs.local / "report.html" if outputs.local is not None else outputs.url("report.html")


# --------------------------------------------------------------------------- sections


def _global_table(global_: xr.Dataset, store_path: str, storage_options: Mapping[str, Any] | None) -> str:
    table = global_table_from(global_.load())
    table.insert(len(table.columns) - 1, "tau", np.sqrt(table["tau2"]))
    body = table.drop(columns=["exposure", "outcome"]).to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="NA")
    truth = _true_global_ce(store_path, storage_options)
    note = "" if truth is None else f"<p>True global CE (simulation): <b>{truth:.4f}</b></p>"
    return body + note


def _figures(groups: dict[str, xr.Dataset], outputs: Outputs) -> str:
    global_, local = groups[schema.META], groups[schema.MR]
    parts = []
    for method in global_["method"].values:
        parts.append(_img(forest_plot(global_, str(method)), f"Forest plot, {method}: global CE +- 2 SE and +- 2 tau per pair"))
    egger = [m for m in local["method"].values if m in EGGER_METHODS]
    if egger and schema.EFFECTS in groups:
        counts = local["n_instruments"].sel({"method": egger[0]}).load()
        for pair in local["pair"].values:
            per_locus = counts.sel(pair=pair)
            locus = str(per_locus["locus"].values[int(np.argmax(per_locus.values))])
            fig = mr_scatter(
                groups[schema.EFFECTS], local, locus, str(pair), method=str(egger[0]),
                rule=local.attrs["instrument_rule"], threshold=local.attrs["instrument_threshold"],
            )
            parts.append(_img(fig, f"MR scatter, {pair}, locus {locus} (most instruments), {egger[0]}"))
    if outputs.exists("spacing.csv"):
        table = pd.read_csv(io.BytesIO(outputs.read_bytes("spacing.csv")))
        method = str(table["method"].iloc[0]) if "method" in table else None
        parts.append(_img(spacing_heatmap(table, method=method), "Global CE by motif spacing"))
    return "".join(parts)


def _loci(groups: dict[str, xr.Dataset]) -> str:
    """Heatmaps and logos of the top loci of each pair, the instrument histogram, the undefined shares."""
    local = groups[schema.MR]
    parts = [_img(instrument_histogram(local.load()), "Instruments per locus, per pair")]
    table = undefined_table(local)
    parts.append("<p>Share of loci where each method has no estimate, and why:</p>"
                 + table.to_html(index=False, float_format=lambda v: f"{v:.3f}", border=0))  # fmt: skip
    if schema.EFFECTS not in groups:
        return "".join(parts)
    effects, method = groups[schema.EFFECTS], str(local["method"].values[0])
    rule, threshold = local.attrs["instrument_rule"], local.attrs["instrument_threshold"]
    for pair in map(str, local["pair"].values):
        exposure = str(local["exposure"].sel(pair=pair).values)
        for locus in top_loci(local, pair, method, TOP_LOCI):
            parts.append(_img(effect_heatmap(effects, local, locus, pair, rule=rule, threshold=threshold),
                              f"{pair}, locus {locus}: effects of every mutation, instruments circled"))  # fmt: skip
            parts.append(_img(effect_logo(effects, locus, exposure), f"{locus}: reference weighted by mean |effect| on {exposure}"))
    return "".join(parts)


def _contents(store_path: str, groups: dict[str, xr.Dataset], storage_options: Mapping[str, Any] | None) -> str:
    fs, root = filesystem(store_path, storage_options)
    rows = []
    for name, ds in groups.items():
        on_disk = fs.du(f"{root}/{name}")
        rows.append({
            "group": name,
            "dims": ", ".join(f"{k}={v}" for k, v in ds.sizes.items()),
            "variables": ", ".join(map(str, ds.data_vars)),
            "in memory (MiB)": ds.nbytes / 2**20,
            "on disk (MiB)": on_disk / 2**20,
        })
    return pd.DataFrame(rows).to_html(index=False, float_format=lambda v: f"{v:,.2f}", border=0)


def _run_facts(ism: xr.Dataset, outputs: Outputs) -> str:
    provenance = {k: v for k, v in ism.attrs.items() if k != FINGERPRINT_ATTR}
    parts = [f"<h3>ISM provenance</h3><pre>{html.escape(json.dumps(provenance, indent=2, default=str))}</pre>"]
    if outputs.exists("pipeline.yaml"):
        parts.append(f"<h3>Pipeline config</h3><pre>{html.escape(outputs.read_bytes('pipeline.yaml').decode())}</pre>")
    if outputs.exists("timings.json"):
        seconds = json.loads(outputs.read_bytes("timings.json"))
        frame = pd.DataFrame({"stage": list(seconds), "seconds": list(seconds.values())})
        parts.append("<h3>Timings</h3>" + frame.to_html(index=False, float_format=lambda v: f"{v:.1f}", border=0))
    return "".join(parts)


def _versions(ism: xr.Dataset) -> str:
    rows = []
    for package in PACKAGES:
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        rows.append({"package": package, "installed now": installed})
    frame = pd.DataFrame(rows)
    recorded = {"deepmr-dist": ism.attrs.get("deepmr_version"), "torch": ism.attrs.get("torch_version")}
    frame["recorded in the store"] = frame["package"].map(recorded).fillna("")
    return f"<p>Python {platform.python_version()} on {html.escape(platform.platform())}</p>" + frame.to_html(index=False, border=0)


def _true_global_ce(store_path: str, storage_options: Mapping[str, Any] | None) -> float | None:
    try:
        group = zarr.open_group(store_path, path=schema.TRUTH, mode="r", storage_options=storage_options)
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return None
    return float(group["global_true_ce"][()])


def _section(title: str, body: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _img(fig, caption: str) -> str:
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{figure_to_base64_png(fig)}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;font-size:0.9em}td,th{padding:3px 8px;border-bottom:1px solid #ddd;text-align:right}"
    "figure{display:inline-block;margin:1em}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
    ".meta{color:#666}"
)
