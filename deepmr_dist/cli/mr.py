"""``deepmr mr``: Mendelian randomization per locus from a table of instrument effects.

Input (CSV/TSV or Parquet by suffix): one row per instrument with columns
``locus, bx, bxse, by, byse`` (optional row key ``SNP``), or TwoSampleMR's
harmonised data (``SNP, beta.exposure, se.exposure, beta.outcome, se.outcome``,
detected from the header; the locus is ``id.exposure->id.outcome``, rows with
``mr_keep`` false are excluded). Duplicated rows (same locus and values, or same
locus and SNP) stop the command unless ``--duplicates keep|drop``. Output: one row
per locus and method with columns ``locus, method, n, estimate, se, ci_lower,
ci_upper, pvalue, intercept, intercept_se, intercept_ci_lower, intercept_ci_upper,
intercept_pvalue, rse, q, q_pvalue, i2, i2gx, fstat, reason, note, n_excluded``
(``n_excluded``: input rows of the locus dropped as invalid), those of a run's
``local_ce`` table after its pair; a missing number, and an empty ``reason`` or
``note`` (none applies), are written ``NA``.
"""

from __future__ import annotations

import argparse
import logging

import pandas as pd

from deepmr_dist import schema
from deepmr_dist.cli.meta import add_duplicates_option, check_alpha, parse_methods, report_rows, stats_parser, write_output
from deepmr_dist.errors import InputError
from deepmr_dist.io.tables import read_mr_table
from deepmr_dist.cli.storage_options import add_storage_options, storage_options

__all__ = ["MR_OUTPUT_COLUMNS", "register", "run"]

log = logging.getLogger(__name__)

MR_OUTPUT_COLUMNS: tuple[str, ...] = ("locus", "method", *schema.table_columns(schema.MR).values())
"""Columns of ``deepmr mr``'s output: the mr group's table columns (:func:`deepmr_dist.schema.table_columns`,
those of a run's ``local_ce`` table after its pair), the excluded-row count last."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``mr`` subcommand."""
    parser = stats_parser(subparsers, "mr", __doc__)
    parser.add_argument(
        "input",
        help="CSV/TSV or Parquet table with columns locus, bx, bxse, by, byse, or TwoSampleMR's harmonised "
        "SNP, beta.exposure, se.exposure, beta.outcome, se.outcome",
    )
    from deepmr_dist.mr import METHODS  # numpy and scipy only

    parser.add_argument(
        "--method", default="ivw", help=f"comma-separated MR estimators (default: ivw), of: {', '.join(METHODS)}"
    )
    parser.add_argument("--out", required=True, help="output table (.csv, .tsv or .parquet)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default 0.05)")
    parser.add_argument(
        "--t-dist",
        action="store_true",
        help="t-distribution intervals and p-values (MR-Egger family: the package's t-dist rule; "
        "IVW family, medians, mbe: n - 1 degrees of freedom); default normal",
    )
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates of the median and mode methods (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the bootstrap (default 0)")
    add_duplicates_option(parser, "instrument rows (same locus and values, or same locus and SNP)")
    add_storage_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepmr mr``; returns the exit status."""
    from deepmr_dist.mr import check_methods, estimate

    methods = parse_methods(args.method, check_methods)
    alpha = check_alpha(args.alpha)
    if args.n_boot < 2:
        raise InputError(f"--n-boot must be an integer >= 2, got {args.n_boot}")
    options = storage_options(args)
    table = read_mr_table(args.input, duplicates=args.duplicates, storage_options=options)
    log.debug("%s: %d loci, %d row(s) excluded", args.input, len(table.ids), table.total_excluded)
    report_rows(table)
    results = estimate(
        table["bx"], table["bxse"], table["by"], table["byse"],
        methods=tuple(methods), alpha=alpha, egger_t_dist=args.t_dist, t_dist=args.t_dist,
        n_boot=args.n_boot, seed=args.seed,
    )  # fmt: skip
    frames = [results[m].to_frame(m, table.ids).assign(n_excluded=table.n_excluded) for m in methods]
    out = pd.concat(frames, ignore_index=True)
    rank = {locus: i for i, locus in enumerate(table.ids)}
    out = out.iloc[out["locus"].map(rank).argsort(kind="stable").to_numpy()].reset_index(drop=True)
    write_output(out, MR_OUTPUT_COLUMNS, args.out, options)
    return 0
