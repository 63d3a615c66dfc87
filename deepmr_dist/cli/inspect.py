"""``deepmr inspect``: what a run store holds, how far its run got, whether its chunks verify, who writes it."""

from __future__ import annotations

import argparse
import json

from deepmr_dist import schema
from deepmr_dist.io.lock import read_lease
from deepmr_dist.io.store import FINGERPRINT_ATTR, open_run
from deepmr_dist.io.verify import verify_ism
from deepmr_dist.cli import help_of
from deepmr_dist.cli.storage_options import add_storage_options, store_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("inspect", help=help_of("inspect"))
    p.add_argument("--store", required=True, help="run store")
    add_storage_options(p)
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    options = store_options(args)
    groups = open_run(args.store, storage_options=options)
    ism = groups[schema.ISM]
    done = int(ism["complete"].sum().compute())
    n = ism.sizes["locus"]
    verification = verify_ism(args.store, storage_options=options)
    lease = read_lease(args.store, options)
    damaged = f"; {verification.damaged_loci} of them in damaged chunks" if verification.damaged else ""
    print(f"run store {args.store}")
    print(f"  ISM complete: {done}/{n} loci ({100.0 * done / n:.1f} %){damaged}")
    print(f"  verified: {verification.summary()}")
    for chunk in verification.damaged:
        print(f"    {chunk.describe()}")
    if verification.damaged:
        print(f"    repair: deepmr verify --store {args.store} --repair, then the same deepmr predict")
    print(f"  lock: {'held by ' + lease.describe() if lease else 'free'}")
    print(f"  tasks: {', '.join(map(str, ism.task.values))}; members: {ism.sizes['member']}; length: {ism.sizes['position']} bp")
    for name, ds in groups.items():
        print(f"\n[{name}]")
        print("  dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
        for var in ds.data_vars.values():
            chunks = var.data.chunksize if hasattr(var.data, "chunksize") else var.shape
            print(f"  {var.name:<12} {str(var.dims):<50} {str(var.dtype):<8} {var.nbytes / 2**20:10.2f} MiB  chunks {chunks}")
    print("\nprovenance:")
    for key, value in ism.attrs.items():
        if key != FINGERPRINT_ATTR:  # mappings one entry a line; lists (919 task indices) on one line
            text = json.dumps(value, indent=2 if isinstance(value, dict) else None, default=str)
            print(f"  {key}: " + text.replace("\n", "\n  "))
    return 0
