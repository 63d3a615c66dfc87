"""``deepmr effects``: mutation effects and standard errors from a run store."""

from __future__ import annotations

import argparse

from deepmr_dist.cluster import connect
from deepmr_dist.io import store
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.cli import help_of


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "effects",
        help=help_of("effects"),
    )
    p.add_argument("--store", required=True, help="run store written by `deepmr predict`")
    p.add_argument("--ddof", type=int, choices=(0, 1), default=0, help="0 as the paper (default) or 1")
    p.add_argument("--cluster", default="local", help="'local' (default) or a scheduler address")
    p.add_argument("--n-workers", type=int, help="workers of the local cluster")
    p.set_defaults(func=run_effects)


def run_effects(args: argparse.Namespace) -> int:
    with connect(args.cluster, n_workers=args.n_workers):
        ism = store.open_run(args.store)["ism"]
        effects = store.write_group(args.store, compute_effects(ism, ddof=args.ddof), "effects")
    sizes = ", ".join(f"{k}={v}" for k, v in effects.sizes.items())
    print(f"{args.store}: wrote group 'effects' ({sizes}, ddof={args.ddof})")
    return 0
