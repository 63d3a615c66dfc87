"""``deepmr meta``: meta-analysis of a table of estimates (one row per study).

Input (CSV/TSV or Parquet by suffix): columns ``[group,] estimate, se``
(optional row key ``study``). Duplicated rows (same group and values, or same
group and study) stop the command unless ``--duplicates keep|drop``.
Output: one row per group and method, columns ``group, method, k, estimate,
se, ci_lower, ci_upper, pvalue, tau2, i2, h2, q, q_pvalue, pi_lower, pi_upper,
reason, n_excluded``; with ``--hksj`` each method also gets rows
``<method>_hksj`` (Hartung-Knapp) and ``<method>_hksj_adhoc`` (truncated).
A missing number is written ``NA``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Sequence

import pandas as pd

from deepmr_dist.errors import InputError
from deepmr_dist.meta import META_METHODS, check_method, meta_analysis
from deepmr_dist.io.tables import (
    DUPLICATE_POLICIES,
    PaddedTable,
    duplicate_message,
    exclusion_message,
    read_meta_table,
    write_table,
)
from deepmr_dist.cli import help_of

__all__ = ["add_duplicates_option", "register", "report_rows", "run", "parse_methods", "check_alpha"]

log = logging.getLogger(__name__)


def parse_methods(text: str, check: Callable[[list[str]], Sequence[str]], option: str = "--method") -> list[str]:
    """Split a comma-separated method list and check it with the library's one check of such names.

    Parameters
    ----------
    text : str
        The option's value, e.g. ``"ivw,Egger"`` (names are lower-cased).
    check : callable
        The library's check of a list of names (e.g. :func:`deepmr_dist.mr.check_methods`),
        returning them without repeats or raising :class:`InputError`.
    option : str
        The option, named in the error.

    Raises
    ------
    InputError
        ``check``'s message (naming the unknown method(s) and the valid ones) after ``option``.
    """
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    try:
        return list(check(names))
    except InputError as exc:
        raise InputError(f"{option}: {exc}") from None


def meta_methods(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` each checked by :func:`deepmr_dist.meta.check_method`, repeats dropped (none given is the unknown ``''``)."""
    return tuple(dict.fromkeys(check_method(name) for name in names or [""]))


def check_alpha(alpha: float) -> float:
    """Raise :class:`InputError` unless ``0 < alpha < 1``."""
    if not 0.0 < alpha < 1.0:
        raise InputError(f"--alpha must lie strictly between 0 and 1, got {alpha}")
    return alpha


def add_duplicates_option(parser: argparse.ArgumentParser, rows: str) -> None:
    """Add ``--duplicates error|keep|drop`` (what to do with duplicated ``rows``) to ``parser``."""
    parser.add_argument(
        "--duplicates",
        choices=DUPLICATE_POLICIES,
        default=DUPLICATE_POLICIES[0],
        help=f"duplicated {rows}: error (default) stops naming the first, keep uses them all, "
        "drop keeps the first of each; kept or dropped ones are counted in a log line",
    )


def report_rows(table: PaddedTable) -> None:
    """Log the excluded and the duplicated rows of an input table (one warning line each)."""
    for message in (exclusion_message(table), duplicate_message(table)):
        if message:
            log.warning("%s", message)


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
    add_duplicates_option(parser, "rows (same group and values, or same group and study)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepmr meta``; returns the exit status."""
    methods = parse_methods(args.method, meta_methods)
    alpha = check_alpha(args.alpha)
    table = read_meta_table(args.input, duplicates=args.duplicates)
    log.debug("%s: %d group(s), %d row(s) excluded", args.input, len(table.ids), table.total_excluded)
    report_rows(table)
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
    log.info("wrote %s: %d row(s)", args.out, len(out))
    return 0


def _group_major(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """Order rows by group (input order), then method (command-line order)."""
    rank = {g: i for i, g in enumerate(ids)}
    key = frame["group"].map(rank)
    return frame.iloc[key.argsort(kind="stable").to_numpy()].reset_index(drop=True)
