"""``deepmr export``: effects, instruments or local CEs of a run store as TSV, Parquet, VCF or bedGraph."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from deepmr_dist.cli import help_of

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
    p.add_argument("--store", required=True, help="run store")
    p.add_argument("--what", required=True, choices=list(FORMATS), help="what to export")
    p.add_argument("--format", dest="fmt", choices=list(SUFFIXES), help="file format (default: the first one --what takes)")
    p.add_argument("--pair", help="EXPOSURE->OUTCOME (instruments)")
    p.add_argument("--out", help="output file (default: STORE without .zarr + _WHAT.FORMAT)")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from deepmr_dist.io.store import open_run
    from deepmr_dist.pipeline.export import FORMATS, export

    fmt = args.fmt or FORMATS[args.what][0]
    out = Path(args.out) if args.out else Path(str(Path(args.store).with_suffix("")) + f"_{args.what}{SUFFIXES[fmt]}")
    rows = export(open_run(args.store), args.what, fmt, out, pair=args.pair)
    log.info("wrote %s: %d row(s)", out, rows)
    print(out)
    return 0
