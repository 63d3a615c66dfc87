"""Start a SLURM-backed Dask cluster of GPU workers and run `deepmr predict` on it.

Requires the `slurm` extra (dask-jobqueue). Adjust queue, account and resources to your site:

    python deploy/slurm_cluster.py --jobs 8 -- --model /shared/m0.pt --model /shared/m1.pt \
        --bed /shared/peaks.bed --genome /shared/hg38.fa --width 1000 --store /shared/run.zarr
"""

from __future__ import annotations

import argparse
import sys

from dask_jobqueue import SLURMCluster

from deepmr_dist.cli import main as deepmr_main


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs, one GPU worker each")
    parser.add_argument("--queue", default="gpu")
    parser.add_argument("--account", default=None)
    parser.add_argument("--walltime", default="04:00:00")
    parser.add_argument("--memory", default="32GB")
    args, rest = parser.parse_known_args()
    return args, [a for a in rest if a != "--"]


if __name__ == "__main__":
    args, predict_args = parse()
    cluster = SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=4,
        processes=1,
        memory=args.memory,
        walltime=args.walltime,
        job_extra_directives=["--gres=gpu:1"],
        worker_extra_args=["--resources", "GPU=1", "--nthreads", "1"],
    )
    cluster.scale(jobs=args.jobs)
    print(f"scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}", file=sys.stderr)
    try:
        sys.exit(deepmr_main(["predict", *predict_args, "--cluster", cluster.scheduler_address]))
    finally:
        cluster.close()
