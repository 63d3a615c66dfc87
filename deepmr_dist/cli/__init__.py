"""The ``deepmr`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the
function that runs it. ``main`` only wires them together and turns
:class:`deepmr_dist.errors.DeepMRError` into a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deepmr_dist.errors import DeepMRError

SUBCOMMAND_MODULES = (
    "deepmr_dist.cli.predict",
    "deepmr_dist.cli.effects",
    "deepmr_dist.cli.inspect",
    "deepmr_dist.cli.mr",
    "deepmr_dist.cli.meta",
    "deepmr_dist.cli.simulate",
    "deepmr_dist.cli.run",
    "deepmr_dist.cli.report",
)


def build_parser() -> argparse.ArgumentParser:
    """Return the top-level parser with every available subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="deepmr",
        description="Deep Mendelian randomization on Dask/Zarr: ISM, effects, MR, meta-analysis.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepmr`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeepMRError as exc:
        print(f"deepmr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
