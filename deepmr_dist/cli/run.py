"""``deepmr run PIPELINE.yaml``: a declarative pipeline, stage by stage and resumable."""

from __future__ import annotations

import argparse
import time

from deepmr_dist.cli import help_of
from deepmr_dist.cli.effects import VERIFY_HELP
from deepmr_dist.cli.cluster_options import add_cluster_options, cluster_overrides
from deepmr_dist.cli.storage_options import add_storage_options, storage_options
from deepmr_dist.cli.verify import add_lock_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help=help_of("run"),
        description="Run every stage of a pipeline; rerunning skips finished stages and ISM chunks.",
    )
    p.add_argument(
        "pipeline",
        help="pipeline YAML (e.g. pipelines/quickstart.yaml) or simulation study YAML (pipelines/paper_simulation.yaml)",
    )
    p.add_argument("--store", help="run store (overrides the pipeline's store)")
    add_storage_options(p)
    p.add_argument(
        "--dry-run", action="store_true",
        help="print the plan (entry points called, loci, forward passes, store size, chunking) and stop; "
        "the model is built to learn its tasks",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace a deepmr store made by another run, or one whose ism group is damaged"
    )
    p.add_argument("--verify", choices=("cheap", "full"), default="cheap", help=VERIFY_HELP)
    add_lock_options(p)
    add_cluster_options(p)  # over the pipeline's cluster: section
    p.set_defaults(func=run_run)


def run_run(args: argparse.Namespace) -> int:
    from deepmr_dist.pipeline.api import is_study

    if is_study(args.pipeline):  # a simulation study: what `deepmr simulate` runs
        from deepmr_dist.cli.simulate import run_simulate

        return run_simulate(argparse.Namespace(**{**vars(args), "config": args.pipeline}))
    from deepmr_dist.pipeline.api import load_pipeline, run
    from deepmr_dist.pipeline.outputs import output_location
    from deepmr_dist.pipeline.plan import plan

    config = load_pipeline(args.pipeline, store=args.store, cluster=cluster_overrides(args),
                           storage_options=storage_options(args))  # fmt: skip
    if args.dry_run:
        print(plan(config).describe())
        print(f"store: {config.store}; outputs: {output_location(config).location}")
        return 0
    started = time.perf_counter()
    result = run(config, progress=not args.quiet, overwrite=args.overwrite, verify=args.verify,
                 break_lock=args.break_lock, lock_timeout=args.lock_timeout)  # fmt: skip
    for row in result.global_table.itertuples():
        print(
            f"{row.pair}\t{row.method}\tglobal CE {row.estimate:.4f} [{row.ci_lower:.4f}, {row.ci_upper:.4f}]\t"
            f"tau {row.tau2 ** 0.5:.4f}\tk {row.k}"
        )
    if result.true_global_ce is not None:
        print(f"true global CE (simulation): {result.true_global_ce:.4f}")
    print(f"{result.store}; tables in {result.outputs}; {time.perf_counter() - started:.0f} s")
    return 0
