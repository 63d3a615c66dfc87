"""``deepmr verify``: find missing or damaged ISM chunks of a run store and hand them back to ``predict``.

Also home of :func:`add_lock_options`, the ``--break-lock`` and ``--lock-timeout``
options of every command that writes a store.
"""

from __future__ import annotations

import argparse

from deepmr_dist.cli import help_of
from deepmr_dist.cli.storage_options import add_storage_options, store_options
from deepmr_dist.io import store
from deepmr_dist.io.lock import DEFAULT_LOCK_TIMEOUT, lock
from deepmr_dist.io.verify import mark_incomplete, Verification, verify_ism


def add_lock_options(parser: argparse.ArgumentParser) -> None:
    """``--break-lock`` and ``--lock-timeout`` (``args.break_lock``, ``args.lock_timeout``) of a command that writes a store."""
    group = parser.add_argument_group("store lock")
    group.add_argument(
        "--break-lock", action="store_true",
        help="break the store's lease if its heartbeat is older than --lock-timeout (its writer died on another "
        "machine; a dead writer of this machine is broken anyway)",
    )  # fmt: skip
    group.add_argument(
        "--lock-timeout", type=float, default=DEFAULT_LOCK_TIMEOUT, metavar="SECONDS",
        help=f"seconds without a heartbeat after which a lease is stale (default {DEFAULT_LOCK_TIMEOUT:g})",
    )  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help=help_of("verify"),
        description="Check every ISM chunk marked complete: present and as long as written (one listing per array), "
        "with --full also decoded and hashed against the checksum written with it. Exit 1 if a chunk is damaged, "
        "unless --repair marks the damaged chunks incomplete, so that rerunning the same `deepmr predict` "
        "(or `deepmr run`) recomputes exactly those.",
    )
    p.add_argument("--store", required=True, help="run store (directory or fsspec URL)")
    add_storage_options(p)
    p.add_argument("--full", action="store_true", help="also read every complete chunk and compare its checksums")
    p.add_argument("--repair", action="store_true", help="mark damaged chunks incomplete (takes the store's lock)")
    add_lock_options(p)
    p.set_defaults(func=run_verify)


def _print(verification: Verification) -> None:
    print(verification.summary())
    for chunk in verification.damaged:
        print(f"  {chunk.describe()}")


def run_verify(args: argparse.Namespace) -> int:
    options = store_options(args)
    if not args.repair:
        verification = verify_ism(args.store, full=args.full, storage_options=options)
        _print(verification)
        verification.raise_if_damaged()
        return 0
    store.check_run_store(args.store, options)  # nothing, not even a lease, is written into what is not a store
    with lock(args.store, "deepmr verify --repair", timeout=args.lock_timeout, break_stale=args.break_lock,
              storage_options=options):  # fmt: skip
        verification = verify_ism(args.store, full=args.full, storage_options=options)
        _print(verification)
        if not verification.ok:
            loci = mark_incomplete(args.store, verification, options)
            print(
                f"{args.store}: marked {len(verification.damaged)} chunk(s) ({loci} loci) incomplete; rerun the same "
                "`deepmr predict` (or `deepmr run`) to recompute exactly those"
            )
    return 0
