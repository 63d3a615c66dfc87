"""The ``deepmr`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the
function that runs it. :data:`COMMANDS` names them with their one-line help,
so ``deepmr --help`` imports none of them and only the chosen subcommand's
module (and what it needs) is imported. ``main`` turns
:class:`deepmr_dist.errors.DeepMRError` into a one-line message.

Exit codes: 0 success; 1 a run that failed on its input, store or model (one
line on stderr naming what is wrong); 2 a usage error (argparse's message).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from deepmr_dist import __version__
from deepmr_dist.errors import DeepMRError

COMMANDS: dict[str, tuple[str, str]] = {
    "run": (
        "deepmr_dist.cli.run",
        "run a pipeline YAML: sequences, model, ISM, effects, MR of every pair, meta-analysis, tables",
    ),
    "predict": (
        "deepmr_dist.cli.predict",
        "in-silico mutagenesis of every locus with every ensemble member into a Zarr run store",
    ),
    "effects": (
        "deepmr_dist.cli.effects",
        "compute effect and effect_se (covariance-aware) into the store's 'effects' group",
    ),
    "inspect": ("deepmr_dist.cli.inspect", "summarise a run store: groups, sizes, completion, provenance"),
    "mr": ("deepmr_dist.cli.mr", "Mendelian randomization per locus from a table of instrument effects"),
    "meta": ("deepmr_dist.cli.meta", "meta-analyse a table of estimates (fixed effect, DL, REML, PM; optional HKSJ)"),
    "simulate": (
        "deepmr_dist.cli.simulate",
        "run (or resume) a simulation study: train, mutate, analyse and score every round; write Table 1",
    ),
    "report": ("deepmr_dist.cli.report", "write a self-contained HTML report of a run store"),
}
"""Subcommand name -> (module, one-line help), in the order ``deepmr --help`` lists them."""


EXIT_FAILED = 1
"""Exit code of a run stopped by a :class:`~deepmr_dist.errors.DeepMRError` (argparse's usage errors exit 2)."""


def help_of(command: str) -> str:
    """The one-line help of ``command`` (for its module's ``register``)."""
    return COMMANDS[command][1]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and registers its full parser.

    Parameters
    ----------
    command : str, optional
        The subcommand to build in full; the others get a placeholder with their help line.
    """
    parser = argparse.ArgumentParser(
        prog="deepmr",
        description="Deep Mendelian randomization on Dask/Zarr: ISM, effects, MR, meta-analysis.",
    )
    parser.add_argument("--version", action="version", version=f"deepmr-dist {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, text) in COMMANDS.items():
        if name == command:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is one), if any."""
    return next((arg for arg in argv if arg in COMMANDS), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepmr`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DeepMRError as exc:
        print(f"deepmr {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
