"""``deepmr report STORE``: one self-contained HTML file with every figure, the config, versions, sizes, timings."""

from __future__ import annotations

import argparse

from deepmr_dist.pipeline.report import write_report
from deepmr_dist.cli import help_of


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help=help_of("report"))
    p.add_argument("--store", required=True, help="run store with MR and meta-analysis results (`deepmr run`)")
    p.add_argument("--out", help="HTML file (default: report.html beside the store's tables)")
    p.add_argument("--outputs", help="directory of the run's tables and config (default: the store path without suffix)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    path = write_report(args.store, args.out, outputs=args.outputs)
    print(f"{path} ({path.stat().st_size / 2**10:,.0f} KiB)")
    return 0
