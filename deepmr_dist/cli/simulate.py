"""``deepmr simulate CONFIG``: the paper's simulation study from a YAML config."""

from __future__ import annotations

import argparse
from pathlib import Path

from deepmr_dist.cli import help_of
from deepmr_dist.cli.cluster_options import add_cluster_options, cluster_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help=help_of("simulate"),
    )
    p.add_argument("config", help="study YAML, e.g. pipelines/paper_simulation.yaml")
    p.add_argument("--out", help="study directory (default: the config's output)")
    p.add_argument("--rounds", type=int, help="rounds per scenario (overrides the config)")
    p.add_argument(
        "--rescore", action="store_true",
        help="redo the analysis of finished rounds (instruments, MR, meta-analysis) from their stored ISM predictions",
    )
    p.add_argument("--dry-run", action="store_true", help="print the study's plan (scenarios, rounds, sizes) and stop")
    add_cluster_options(p)  # over the config's cluster: section
    p.set_defaults(func=run_simulate)


def run_simulate(args: argparse.Namespace) -> int:
    """Run (or plan) the study of ``args.config``; ``deepmr run`` calls this for a study YAML too."""
    from deepmr_dist.cluster import connect
    from deepmr_dist.errors import InputError
    from deepmr_dist.io.location import is_local
    from deepmr_dist.pipeline.api import load_study
    from deepmr_dist.pipeline.study import describe_study, run_study

    config = load_study(args.config, rounds=getattr(args, "rounds", None), cluster=cluster_overrides(args))
    out = getattr(args, "out", None) or config.output
    if not is_local(out):  # Path("s3://b/x") would be a local folder named after the bucket
        raise InputError(
            f"study directory {out}: a simulation study is written to a local or shared directory, not an fsspec URL "
            "(each round's store and tables live under it)"
        )
    if args.dry_run:
        print(describe_study(config, out))
        return 0
    with connect(**config.cluster.connect_options()) as client:
        run_study(config, out, client=client, progress=not args.quiet, rescore=getattr(args, "rescore", False))
    print((Path(out) / "table1.md").read_text())
    print(f"{out}: rounds.csv, table1.csv, bias_coverage.csv, table1.md, figures/")
    return 0
