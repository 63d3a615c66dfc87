"""``deepmr meta``: meta-analysis of a table of estimates (one row per study).

Input (CSV/TSV or Parquet by suffix): columns ``[group,] estimate, se``
(optional row key ``study``). Duplicated rows (same group and values, or same
group and study) stop the command unless ``--duplicates keep|drop``.
Output: one row per group and method, columns ``group, method, k, estimate,
se, ci_lower, ci_upper, pvalue, tau2, i2, h2, q, q_pvalue, pi_lower, pi_upper,
reason, n_excluded`` (those of a run's ``global_ce`` table after its pair);
with ``--hksj`` each method also gets rows ``<method>_hksj`` (Hartung-Knapp)
and ``<method>_hksj_adhoc`` (truncated). A missing number, and an empty
``reason`` (the estimate is defined), are written ``NA``.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

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
from deepmr_dist.cli.storage_options import add_storage_options, storage_options

__all__ = [
    "add_duplicates_option",
    "check_alpha",
    "parse_methods",
    "register",
    "report_rows",
    "run",
    "stats_parser",
    "write_output",
]

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


def stats_parser(subparsers: argparse._SubParsersAction, command: str, doc: str) -> argparse.ArgumentParser:
    """The parser of ``deepmr mr`` or ``deepmr meta``: its one-line help, and its module's docstring ``doc`` as description."""
    return subparsers.add_parser(
        command, help=help_of(command), description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def write_output(frame: pd.DataFrame, columns: Sequence[str], path: str, options: Mapping[str, Any] | None) -> None:
    """Write a result table: ``columns`` first, in order, then any others; empty text cells missing; one log line.

    Missing numbers and empty codes are both written :data:`deepmr_dist.schema.TABLE_NA`
    (:func:`deepmr_dist.pipeline.outputs.with_missing_text`, as a run's tables).
    """
    from deepmr_dist.pipeline.outputs import with_missing_text

    frame = frame[[c for c in columns if c in frame.columns] + [c for c in frame.columns if c not in columns]]
    write_table(with_missing_text(frame), path, options)
    log.info("wrote %s: %d row(s)", path, len(frame))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``meta`` subcommand."""
    parser = stats_parser(subparsers, "meta", __doc__)
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
    add_storage_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``deepmr meta``; returns the exit status."""
    methods = parse_methods(args.method, meta_methods)
    alpha = check_alpha(args.alpha)
    options = storage_options(args)
    table = read_meta_table(args.input, duplicates=args.duplicates, storage_options=options)
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
    from deepmr_dist.pipeline.outputs import GLOBAL_COLUMNS

    out = _group_major(pd.concat(frames, ignore_index=True), table.ids)
    write_output(out, ("group", "method", *GLOBAL_COLUMNS.values()), args.out, options)
    return 0


def _group_major(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """Order rows by group (input order), then method (command-line order)."""
    rank = {g: i for i, g in enumerate(ids)}
    key = frame["group"].map(rank)
    return frame.iloc[key.argsort(kind="stable").to_numpy()].reset_index(drop=True)
