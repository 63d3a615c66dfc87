"""``deepmr meta``: meta-analysis of a table of estimates (one row per study).

Input (CSV/TSV or Parquet by suffix): columns ``[group,] estimate, se``.
Output: one row per group and method, columns ``group, method, k, estimate,
se, ci_lower, ci_upper, pvalue, tau2, i2, h2, q, q_pvalue, pi_lower, pi_upper,
reason, n_excluded``; with ``--hksj`` each method also gets rows
``<method>_hksj`` (Hartung-Knapp) and ``<method>_hksj_adhoc`` (truncated).
"""

from __future__ import annotations

import argparse
import sys

import pandas as pd

from deepmr_dist.errors import InputError
from deepmr_dist.meta import META_METHODS, meta_analysis
from deepmr_dist.io.tables import exclusion_message, read_meta_table, write_table
from deepmr_dist.cli import help_of

__all__ = ["register", "run", "parse_methods"]


def parse_methods(text: str, valid: tuple[str, ...], option: str = "--method") -> list[str]:
    """Split a comma-separated method list and check every name against ``valid``.

    Raises
    ------
    InputError
        Naming the unknown method(s) and listing the valid ones.
    """
    methods = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in valid]
    if unknown or not methods:
        what = f"unknown method(s) {', '.join(map(repr, unknown))}" if unknown else "no method given"
        raise InputError(f"{option}: {what}; valid methods: {', '.join(valid)}")
    return list(dict.fromkeys(methods))


def check_alpha(alpha: float) -> float:
    """Raise :class:`InputError` unless ``0 < alpha < 1``."""
    if not 0.0 < alpha < 1.0:
        raise InputError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``meta`` subcommand."""
    parser = subparsers.add_parser(
        "meta",
        help=help_of("meta"),
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", help="CSV/TSV or Parquet table with columns [group,] estimate, se")
    parser.add_argument(
        "--method",
        default="dl",
        help=f"comma-separated estimators among {', '.join(META_METHODS)} (default: dl)",
    )
    parser.add_argument("--hksj", action="store_true", help="add Hartung-Knapp rows (<method>_hksj, <method>_hksj_adhoc)")
    parser.add_argument("--alpha", type=float, default=0.05, help="1 - confidence level (default 0.05)")
    parser.add_argument("--out", required=True, help="output table (.csv, .tsv or .parquet)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepmr meta``; returns the exit status."""
    methods = parse_methods(args.method, META_METHODS)
    alpha = check_alpha(args.alpha)
    table = read_meta_table(args.input)
    message = exclusion_message(table)
    if message:
        print(f"deepmr meta: warning: {message}", file=sys.stderr)
    est, se = table["estimate"], table["se"]
    frames = []
    for method in methods:
        variants = [(method, False, False)]
        if args.hksj:
            variants += [(f"{method}_hksj", True, False), (f"{method}_hksj_adhoc", False, True)]
        for label, hksj, adhoc in variants:
            res = meta_analysis(est, se, method, hksj=hksj, hksj_adhoc=adhoc, alpha=alpha)
            frames.append(res.to_frame(label, table.ids).assign(n_excluded=table.n_excluded))
    out = pd.concat(frames, ignore_index=True)
    out = _group_major(out, table.ids)
    write_table(out, args.out)
    return 0


def _group_major(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """Order rows by group (input order), then method (command-line order)."""
    rank = {g: i for i, g in enumerate(ids)}
    key = frame["group"].map(rank)
    return frame.iloc[key.argsort(kind="stable").to_numpy()].reset_index(drop=True)
