"""``deepmr effects``: mutation effects and standard errors from a run store."""

from __future__ import annotations

import argparse

from deepmr_dist.cluster import connect
from deepmr_dist.io import progress, store
from deepmr_dist.io.lock import lock
from deepmr_dist.io.verify import verify_ism
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.cli import help_of
from deepmr_dist.cli.cluster_options import add_cluster_options, cluster_settings
from deepmr_dist.cli.storage_options import add_storage_options, storage_options
from deepmr_dist.cli.verify import add_lock_options
from deepmr_dist.io.location import check_reachable, normalize

VERIFY_HELP = (
    "how the ISM chunks are checked before they are read: cheap (every chunk present and as long as written; "
    "default) or full (also every chunk decoded and its checksum compared: one more read of mut_pred)"
)
"""Help of ``--verify`` (also ``deepmr run``'s)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "effects",
        help=help_of("effects"),
        description="Write the store's 'effects' group from its ISM predictions, after verifying them; the group is "
        "written under a staging name and swapped in whole, so a failed run leaves the previous one.",
    )
    p.add_argument("--store", required=True, help="run store written by `deepmr predict`")
    add_storage_options(p)
    p.add_argument("--ddof", type=int, choices=(0, 1), default=0, help="0 as the paper (default) or 1")
    p.add_argument("--verify", choices=("cheap", "full"), default="cheap", help=VERIFY_HELP)
    add_lock_options(p)
    add_cluster_options(p)
    p.set_defaults(func=run_effects)


def run_effects(args: argparse.Namespace) -> int:
    path, options = normalize(args.store, storage_options(args))
    store.check_run_store(path, options)  # refused before anything, even a lease, is written
    cluster = cluster_settings(args).connect_options()  # refused before the lease is taken
    with lock(path, "deepmr effects", timeout=args.lock_timeout, break_stale=args.break_lock, storage_options=options):
        with connect(**cluster) as client:
            check_reachable(path, options, client)
            verify_ism(path, full=args.verify == "full", storage_options=options).raise_if_damaged()
            ism = store.open_run(path, storage_options=options)["ism"]
            try:
                with progress.shown(None if args.quiet else "effects"):  # a bar on stderr
                    effects = store.write_group(path, compute_effects(ism, ddof=args.ddof), "effects", storage_options=options)
            except Exception:  # e.g. a chunk damaged in a way only decoding shows
                verify_ism(path, full=True, storage_options=options).raise_if_damaged()
                raise
    sizes = ", ".join(f"{k}={v}" for k, v in effects.sizes.items())
    print(f"{args.store}: wrote group 'effects' ({sizes}, ddof={args.ddof})")
    return 0
