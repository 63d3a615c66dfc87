"""Run a ``deepmr`` subcommand on Dask workers started as SLURM jobs (dask-jobqueue ``SLURMCluster``).

Each SLURM job runs one Dask worker process (``--cores`` threads); with ``--gpus-per-job 1`` the job
asks for ``--gres=gpu:1`` and the worker declares ``--resources GPU=1``, so ISM tasks run one at a
time on the job's GPU. The scheduler runs inside this script, so start the script where it may run
for the whole run and where the compute nodes can reach it: inside a small CPU job of its own
(``sbatch --wrap "python deploy/slurm_cluster.py ..."``) on sites that forbid long processes on login
nodes. Everything after ``--`` is the ``deepmr`` command line; ``--cluster ADDRESS`` is appended.
Needs the ``slurm`` extra (dask-jobqueue).

    python deploy/slurm_cluster.py --jobs 8 --gpus-per-job 1 --queue gpu --account mylab \\
        --prologue 'module load cuda/12.4' --prologue 'source /shared/venvs/deepmr/bin/activate' \\
        --python python --interface ib0 --local-directory '$TMPDIR' --log-directory logs/slurm \\
        -- run pipelines/bpnet_four_tf_pairs.yaml --store /shared/runs/bpnet.zarr
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import dask
from dask_jobqueue import SLURMCluster
from distributed import Client

from deepmr_dist.cli import main as deepmr_main
from deepmr_dist.cluster import SlurmOptions, TLSFiles, make_slurm_cluster


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The recipe's options and the ``deepmr`` command line after ``--``."""
    parser = argparse.ArgumentParser(
        prog="slurm_cluster.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    jobs = parser.add_argument_group("SLURM jobs (one Dask worker each)")
    jobs.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (default 4)")
    jobs.add_argument("--min-workers", type=int, default=None,
                      help="workers to wait for before running deepmr (default: --jobs)")
    jobs.add_argument("--wait-timeout", type=float, default=None,
                      help="seconds to wait for them (default: as long as the jobs queue)")
    jobs.add_argument("--queue", default=None, help="partition (-p)")
    jobs.add_argument("--account", default=None, help="account (-A)")
    jobs.add_argument("--walltime", default="04:00:00", help="per job (default 04:00:00)")
    jobs.add_argument("--cores", type=int, default=4, help="CPU cores per job = worker threads (default 4)")
    jobs.add_argument("--memory", default="32GB", help="memory per job = the worker's memory limit (default 32GB)")
    jobs.add_argument("--gpus-per-job", type=int, choices=(0, 1), default=0,
                      help="1: --gres=gpu:1 and a worker with --resources GPU=1; scale GPUs with --jobs")
    jobs.add_argument("--job-directive", action="append", default=[], metavar="OPTION",
                      help="extra #SBATCH option, e.g. --constraint=a100 (repeatable)")
    jobs.add_argument("--prologue", action="append", default=[], metavar="LINE",
                      help="shell line run before the worker, e.g. 'module load cuda' (repeatable, in order)")
    jobs.add_argument("--python", default=None,
                      help="Python that runs the worker (default: this one; 'python' after a venv prologue)")
    jobs.add_argument("--interface", default=None,
                      help="network interface of the workers and the scheduler, e.g. ib0 (default: any)")
    jobs.add_argument("--local-directory", default=None, help="worker scratch directory on the node, e.g. $TMPDIR")
    jobs.add_argument("--log-directory", default=None, help="where SLURM writes the jobs' output")
    tls = parser.add_argument_group("TLS (all three, or none)")
    tls.add_argument("--tls-ca-file", default=None, help="CA certificate")
    tls.add_argument("--tls-cert", default=None, help="certificate of the scheduler, the workers and deepmr")
    tls.add_argument("--tls-key", default=None, help="its private key")
    parser.add_argument("--print-job-script", action="store_true", help="print the job script and exit")
    parser.add_argument("deepmr", nargs="*", metavar="-- DEEPMR ARGS",
                        help="the deepmr command line, e.g. -- run pipeline.yaml")
    args = parser.parse_args(argv)
    tls_files = (args.tls_ca_file, args.tls_cert, args.tls_key)
    if any(tls_files) and not all(tls_files):
        parser.error("--tls-ca-file, --tls-cert and --tls-key go together")
    if not args.print_job_script and not args.deepmr:
        parser.error("give the deepmr command after --, e.g. -- run pipeline.yaml")
    if "--cluster" in args.deepmr:
        parser.error("the deepmr command must not carry --cluster; this script appends it")
    return args


def tls_files(args: argparse.Namespace) -> TLSFiles | None:
    """One certificate for the scheduler, the workers and the client, or None without TLS."""
    return TLSFiles(args.tls_ca_file, args.tls_cert, args.tls_key) if args.tls_ca_file else None


def make_cluster(args: argparse.Namespace) -> SLURMCluster:
    """The ``SLURMCluster`` of the options (its scheduler starts in this process; no job is submitted)."""
    options = SlurmOptions(
        jobs=args.jobs, queue=args.queue, account=args.account, walltime=args.walltime, memory=args.memory,
        cores=args.cores, gpus_per_job=args.gpus_per_job, job_script_prologue=tuple(args.prologue),
        job_directives=tuple(args.job_directive), interface=args.interface, local_directory=args.local_directory,
        log_directory=args.log_directory, python=args.python,
    )
    return make_slurm_cluster(options, tls_files(args))


def tls_client_config(args: argparse.Namespace) -> dict[str, str]:
    """Dask config under which ``deepmr``'s own client connects with the same certificate."""
    if not args.tls_ca_file:
        return {}
    return {
        "distributed.comm.tls.ca-file": args.tls_ca_file,
        "distributed.comm.tls.client.cert": args.tls_cert,
        "distributed.comm.tls.client.key": args.tls_key,
        "distributed.comm.require-encryption": True,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Start the cluster, wait for its workers, run ``deepmr`` against it and close it; deepmr's exit code."""
    args = parse_args(argv)
    with make_cluster(args) as cluster:
        if args.print_job_script:
            print(cluster.job_script())
            return 0
        cluster.scale(jobs=args.jobs)
        n = args.jobs if args.min_workers is None else args.min_workers
        print(f"scheduler {cluster.scheduler_address}, dashboard {cluster.dashboard_link}; "
              f"waiting for {n} worker(s)", file=sys.stderr)
        with Client(cluster) as client:
            client.wait_for_workers(n, timeout=args.wait_timeout)
            for name, worker in sorted(client.scheduler_info(n_workers=-1)["workers"].items()):
                print(f"worker {name}: {worker['nthreads']} thread(s), resources {worker['resources']}",
                      file=sys.stderr)
        with dask.config.set(tls_client_config(args)):
            return deepmr_main([*args.deepmr, "--cluster", cluster.scheduler_address])


if __name__ == "__main__":
    sys.exit(main())
