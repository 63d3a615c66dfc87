"""``deepmr report STORE``: one self-contained HTML file with every figure, the config, versions, sizes, timings."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from deepmr_dist.cli import help_of
from deepmr_dist.cli.storage_options import add_storage_options, put_file, storage_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("report", help=help_of("report"))
    p.add_argument(
        "--store", required=True, help="run store with MR and meta-analysis results (`deepmr run`): a directory or fsspec URL"
    )
    add_storage_options(p)
    p.add_argument("--out", help="HTML file, a path or fsspec URL (default: report.html beside the store's tables)")
    p.add_argument(
        "--outputs", help="folder or fsspec URL of the run's tables and config (default: the store path without suffix)"
    )
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from deepmr_dist.io.location import filesystem, is_local, normalize, sibling
    from deepmr_dist.pipeline.outputs import Outputs
    from deepmr_dist.pipeline.report import write_report

    options = storage_options(args)
    store, store_options = normalize(args.store, options)
    outputs = Outputs(*normalize(args.outputs or sibling(args.store), options))
    if args.out is None or is_local(args.out):
        out = None if args.out is None else normalize(args.out, None)[0]
        path = str(write_report(store, out, outputs=outputs, storage_options=store_options))
    else:  # written locally, then copied up
        with tempfile.TemporaryDirectory(prefix="deepmr-report-") as folder:
            put_file(write_report(store, Path(folder) / "report.html", outputs=outputs, storage_options=store_options),
                     args.out, options)  # fmt: skip
        path = args.out
    fs, target = filesystem(*normalize(path, options))
    print(f"{path} ({fs.size(target) / 2**10:,.0f} KiB)")
    return 0
