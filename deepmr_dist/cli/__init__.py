"""The ``deepmr`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to the
function that runs it. :data:`COMMANDS` names them with their one-line help,
so ``deepmr --help`` imports none of them and only the chosen subcommand's
module (and what it needs) is imported. ``main`` turns
:class:`deepmr_dist.errors.DeepMRError` into a one-line message.

Every subcommand also takes ``-v/--verbose`` and ``-q/--quiet`` (added by
:func:`build_parser`): for the duration of the command, the ``deepmr_dist``
loggers write to stderr from INFO (default), DEBUG (``-v``, each line naming
its logger) or WARNING (``-q``, which also turns progress bars off). What a
command exists to print (tables, summaries, plans) goes to stdout.

Exit codes: 0 success; 1 a run that failed on its input, store or model (one
line on stderr naming what is wrong); 2 a usage error (argparse's message);
130 interrupted (Ctrl-C, SIGINT: one line saying how to resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from deepmr_dist import __version__
from deepmr_dist.errors import DeepMRError
from deepmr_dist.io import provenance

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
    "verify": (
        "deepmr_dist.cli.verify",
        "find missing or damaged ISM chunks of a run store; --repair hands them back to predict",
    ),
    "mr": ("deepmr_dist.cli.mr", "Mendelian randomization per locus from a table of instrument effects"),
    "meta": ("deepmr_dist.cli.meta", "meta-analyse a table of estimates (fixed effect, DL, REML, PM; optional HKSJ)"),
    "simulate": (
        "deepmr_dist.cli.simulate",
        "run (or resume) a simulation study: train, mutate, analyse and score every round; write Table 1",
    ),
    "report": ("deepmr_dist.cli.report", "write a self-contained HTML report of a run store"),
    "export": (
        "deepmr_dist.cli.export",
        "write effects, instruments or local CEs of a run store as TSV, Parquet, VCF or bedGraph",
    ),
}
"""Subcommand name -> (module, one-line help), in the order ``deepmr --help`` lists them."""


EXIT_FAILED = 1
"""Exit code of a run stopped by a :class:`~deepmr_dist.errors.DeepMRError` (argparse's usage errors exit 2)."""
EXIT_INTERRUPTED = 130
"""Exit code of a command stopped by SIGINT (128 + 2, as shells report it)."""
RESUMABLE = ("run", "predict", "simulate")
"""Commands that keep what they finished (ISM chunks, stages, rounds) and resume when rerun."""

PACKAGE_LOGGER = "deepmr_dist"
"""The logger whose messages (and its children's) a command writes to stderr."""

log = logging.getLogger(__name__)


def help_of(command: str) -> str:
    """The one-line help of ``command`` (for its module's ``register``)."""
    return COMMANDS[command][1]


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """Add ``-v/--verbose`` and ``-q/--quiet`` (exclusive; ``args.verbose``, ``args.quiet``) to a subcommand's parser."""
    group = parser.add_argument_group("messages").add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", help="also debug messages, each naming its logger")
    group.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors; no progress bars")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported and registers its full parser.

    Parameters
    ----------
    command : str, optional
        The subcommand to build in full, with :func:`add_logging_options`; the
        others get a placeholder with their help line.
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
            add_logging_options(subparsers.choices[name])
        else:
            subparsers.add_parser(name, help=text)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is one), if any."""
    return next((arg for arg in argv if arg in COMMANDS), None)


class _Formatter(logging.Formatter):
    """``deepmr CMD: message`` at INFO, ``deepmr CMD: warning: message`` at other levels; optionally the logger's name."""

    def __init__(self, prefix: str, with_names: bool) -> None:
        super().__init__()
        self.prefix = prefix
        self.with_names = with_names

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        name = f"[{record.name}] " if self.with_names else ""
        text = f"{self.prefix}: {level}{name}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


@contextmanager
def logging_to_stderr(command: str, level: int) -> Iterator[None]:
    """Messages of the :data:`PACKAGE_LOGGER` loggers at ``level`` and above go to stderr during the block.

    The logger's handlers, level and propagation are restored afterwards, so
    that ``main`` can be called more than once in a process (as tests do).
    """
    logger = logging.getLogger(PACKAGE_LOGGER)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(f"deepmr {command}", with_names=level <= logging.DEBUG))
    saved_level, saved_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved_level)
        logger.propagate = saved_propagate


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepmr`` console script.

    A :class:`~deepmr_dist.errors.DeepMRError` is one line on stderr and exit code
    :data:`EXIT_FAILED`; SIGINT (Ctrl-C), at any point, one line saying how to resume and
    :data:`EXIT_INTERRUPTED`.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    try:
        args = build_parser(command).parse_args(argv)
        level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
        with logging_to_stderr(args.command, level):
            log.debug("deepmr-dist %s, Python %s: deepmr %s", __version__, sys.version.split()[0], shlex.join(argv))
            try:
                with provenance.command(argv):  # the line a store's history records for this command
                    return int(args.func(args) or 0)
            except DeepMRError as exc:
                print(f"deepmr {args.command}: error: {exc}", file=sys.stderr)
                return EXIT_FAILED
    except KeyboardInterrupt:
        kept = " to resume (finished chunks and stages are kept)" if command in RESUMABLE else ""
        print(f"deepmr {command or ''}".rstrip() + f": interrupted; rerun the same command{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
