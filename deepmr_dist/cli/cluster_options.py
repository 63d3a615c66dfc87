"""The cluster options every command that runs Dask tasks takes, defined once.

``--cluster``, ``--scheduler-file``, ``--cluster-config``, ``--n-workers``, ``--min-workers``,
``--gpu/--no-gpu``, ``--connect-timeout`` and ``--tls-ca-file/--tls-cert/--tls-key`` (as
``dask scheduler`` names them) become fields of
:class:`deepmr_dist.pipeline.config_types.ClusterSettings`: those of ``--cluster-config FILE`` (a
YAML mapping of its fields, e.g. the SLURM jobs), then the flags given, over the pipeline's
``cluster:`` section or the defaults. Without TLS flags Dask's own config and environment apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deepmr_dist.pipeline.config_types import ClusterSettings, parse_config, read_yaml_mapping

FLAG_FIELDS = (
    "n_workers", "min_workers", "gpu", "connect_timeout", "scheduler_file", "tls_ca_file", "tls_cert", "tls_key",
)
"""Options that set the :class:`ClusterSettings` field of their name."""


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Add the cluster options (all default to the config's or :class:`ClusterSettings`' values)."""
    group = parser.add_argument_group("cluster")
    group.add_argument(
        "--cluster", metavar="local|slurm|ADDRESS",
        help="'local' (an embedded cluster on 127.0.0.1, the default), 'slurm' (jobs of --cluster-config) "
        "or a scheduler address tcp://HOST:PORT or tls://HOST:PORT",
    )
    group.add_argument("--scheduler-file", metavar="PATH", help="the scheduler of `dask scheduler --scheduler-file PATH`")
    group.add_argument(
        "--cluster-config", metavar="FILE",
        help="YAML of cluster: fields (kind, jobs, queue, account, walltime, memory, cores, gpus_per_job, "
        "job_script_prologue, interface, local_directory, ...)",
    )
    group.add_argument("--n-workers", type=int, help="workers of the embedded cluster")
    group.add_argument("--min-workers", type=int, metavar="N", help="wait for N workers before submitting tasks")
    group.add_argument(
        "--gpu", action=argparse.BooleanOptionalAction, default=None,
        help="ISM tasks request GPU=1 and wait for workers declaring it (--no-gpu: run anywhere); "
        "default: from the cluster (its GPU workers, --cluster-config gpus_per_job)",
    )
    group.add_argument("--connect-timeout", type=float, metavar="S", help="seconds to wait for the scheduler (default 10)")
    group.add_argument("--tls-ca-file", metavar="PEM", help="CA certificate (TLS; default: Dask's config)")
    group.add_argument("--tls-cert", metavar="PEM", help="certificate of this client")
    group.add_argument("--tls-key", metavar="PEM", help="its private key")


def cluster_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ClusterSettings` fields the command line sets: ``--cluster-config``'s, then the flags'.

    Raises
    ------
    InputError
        If the ``--cluster-config`` file cannot be read or holds invalid fields (named by path).
    """
    overrides: dict[str, Any] = {}
    if args.cluster_config:
        path = Path(args.cluster_config)
        data = read_yaml_mapping(path)
        parse_config(data, ClusterSettings, str(path))  # every field checked, named by the file
        overrides.update(data)
    if args.cluster is not None:
        overrides.pop("scheduler_file", None)
        overrides.update(address=args.cluster, kind=ClusterSettings.model_validate({"address": args.cluster}).kind)
    for name in FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.scheduler_file is not None:
        overrides["kind"] = "scheduler_file"
    return overrides


def cluster_settings(args: argparse.Namespace, base: ClusterSettings | None = None) -> ClusterSettings:
    """``base`` (default :class:`ClusterSettings`' defaults) with the command line's cluster options."""
    return (base or ClusterSettings()).with_overrides(cluster_overrides(args))
