"""``deepmr export``: effects, instruments or local CEs of a run store as TSV, Parquet, VCF or bedGraph."""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from deepmr_dist.cli import help_of
from deepmr_dist.cli.storage_options import add_storage_options, put_file, storage_options

log = logging.getLogger(__name__)

SUFFIXES = {"tsv": ".tsv", "parquet": ".parquet", "vcf": ".vcf", "bedgraph": ".bedgraph"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from deepmr_dist.pipeline.export import FORMATS

    kinds = "; ".join(f"{what}: {', '.join(formats)}" for what, formats in FORMATS.items())
    p = subparsers.add_parser(
        "export", help=help_of("export"),
        description=f"Write part of a run store as a file other tools read ({kinds}). Effects: one row per "
        "(locus, position, alternative allele) with ref, alt, genome chrom/pos/variant_id for BED loci, and "
        "effect_<task>, effect_se_<task>. Instruments: locus, bx, bxse, by, byse per instrument of --pair, "
        "selected as the MR stage did: the input of `deepmr mr` and MendelianRandomization::mr_input. "
        "Missing values: NA (TSV), . (VCF).",
    )  # fmt: skip
    p.add_argument("--store", required=True, help="run store (directory or fsspec URL)")
    add_storage_options(p)
    p.add_argument("--what", required=True, choices=list(FORMATS), help="what to export")
    p.add_argument("--format", dest="fmt", choices=list(SUFFIXES), help="file format (default: the first one --what takes)")
    p.add_argument("--pair", help="EXPOSURE->OUTCOME (instruments)")
    p.add_argument(
        "--out", help="output file, a path or fsspec URL (default: STORE without .zarr + _WHAT.FORMAT, beside the store)"
    )
    p.set_defaults(func=run_export)


def default_out(store: str, what: str, fmt: str) -> str:
    """``STORE`` without its extension plus ``_WHAT.FORMAT``, on the store's filesystem: ``s3://b/run.zarr`` -> ``s3://b/run_effects.tsv``."""
    head, slash, name = store.rstrip("/").rpartition("/")
    stem = name.rpartition(".")[0] or name
    return f"{head}{slash}{stem}_{what}{SUFFIXES[fmt]}"


def run_export(args: argparse.Namespace) -> int:
    from deepmr_dist.io.location import is_local, normalize
    from deepmr_dist.io.store import open_run
    from deepmr_dist.pipeline.export import FORMATS, export

    options = storage_options(args)
    fmt = args.fmt or FORMATS[args.what][0]
    out = args.out or default_out(args.store, args.what, fmt)
    store, store_options = normalize(args.store, options)
    groups = open_run(store, storage_options=store_options)
    if is_local(out):
        rows = export(groups, args.what, fmt, Path(normalize(out, None)[0]), pair=args.pair)
    else:  # written locally, then copied up
        with tempfile.TemporaryDirectory(prefix="deepmr-export-") as folder:
            local = Path(folder) / out.rpartition("/")[2]
            rows = export(groups, args.what, fmt, local, pair=args.pair)
            put_file(local, out, options)
    log.info("wrote %s: %d row(s)", out, rows)
    print(out)
    return 0
