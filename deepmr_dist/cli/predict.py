"""``deepmr predict``: distributed saturation mutagenesis into a run store."""

from __future__ import annotations

import argparse

import xarray as xr

from deepmr_dist.cluster import connect
from deepmr_dist.errors import InputError
from deepmr_dist.ism.precision import PRECISIONS
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.models.heads import OutputHead, parse_tasks
from deepmr_dist.models.transforms import TRANSFORMS
from deepmr_dist.stages.predict import ISMSettings, PredictReport, predict
from deepmr_dist.io.sequence import DEFAULT_IUPAC, IUPAC_MODES, read_bed_regions, read_fasta, read_onehot
from deepmr_dist.cli import help_of
from deepmr_dist.cli.cluster_options import add_cluster_options, cluster_settings
from deepmr_dist.cli.storage_options import add_storage_options, storage_options
from deepmr_dist.cli.verify import add_lock_options


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help=help_of("predict"),
        description="Predict references and all single-base mutants with each ensemble member; "
        "resumable (rerun to finish an interrupted run).",
    )
    src = p.add_argument_group("sequences (one of)")
    src.add_argument("--fasta", help="FASTA of equal-length loci")
    src.add_argument("--bed", help="BED regions, centred to --width bp in --genome")
    src.add_argument("--genome", help="genome FASTA for --bed (indexed with pyfaidx)")
    src.add_argument("--width", type=int, help="window width for --bed")
    src.add_argument("--onehot", help=".npy one-hot array (n_loci, 4, length), A,C,G,T order")
    src.add_argument(
        "--iupac", choices=IUPAC_MODES, default=DEFAULT_IUPAC,
        help="IUPAC codes R,Y,K,M,S,W,B,D,H,V in --fasta or --genome: n reads them as N, counted in a warning "
        "(default; genomes carry a few), error refuses them",
    )
    mod = p.add_argument_group("model")
    mod.add_argument("--model", action="append", required=True, help="TorchScript file or package.module:factory; repeat per member")
    mod.add_argument("--mc-dropout", type=int, default=0, metavar="N", help="N frozen dropout masks instead of an ensemble")
    mod.add_argument("--mc-seed", type=int, default=0, help="seed of the dropout masks")
    mod.add_argument("--tasks", help="outputs to keep: indices or names (comma-separated)")
    mod.add_argument("--task-names", help="names of all model outputs, comma-separated, in output order")
    mod.add_argument("--output-index", type=int, help="element of a tuple output to use")
    mod.add_argument("--profile-axis", type=int, help="axis of the output to sum over (a profile)")
    mod.add_argument("--transform", choices=TRANSFORMS, default="none")
    run = p.add_argument_group("run")
    run.add_argument("--store", required=True, help="run store (directory or fsspec URL)")
    add_storage_options(run)
    run.add_argument("--chunk-loci", type=int, default=16, help="loci per store chunk and per task (default 16)")
    run.add_argument("--mutant-batch", type=_mutant_batch, default=2048,
                     help="mutants per forward pass, or 'auto': sized from the GPU's free memory (default 2048)")
    run.add_argument("--full-recompute", action="store_true", help="disable incremental recomputation")
    run.add_argument(
        "--precision", choices=PRECISIONS, default="fp32",
        help="ISM arithmetic (default fp32; tf32 and fp16 need a CUDA GPU, bf16 runs on CUDA or CPU autocast)",
    )  # fmt: skip
    run.add_argument(
        "--compile", action="store_true",
        help="torch.compile the networks run in full (--full-recompute, or models not run incrementally); "
        "compiles on each worker first (tens of seconds)",
    )  # fmt: skip
    run.add_argument(
        "--overwrite", action="store_true",
        help="replace a deepmr store made by another run, or one whose ism group is damaged (never anything else)",
    )
    add_lock_options(p)
    add_cluster_options(p)
    p.set_defaults(func=run_predict)


def _mutant_batch(text: str) -> int | str:
    """``--mutant-batch``: a count, or ``auto``."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {text!r}") from None


def load_loci(args: argparse.Namespace) -> xr.Dataset:
    """The sequences chosen by --fasta, --bed/--genome/--width or --onehot."""
    given = [name for name in ("fasta", "bed", "onehot") if getattr(args, name)]
    if len(given) != 1:
        raise InputError("give exactly one of --fasta, --bed (with --genome and --width) or --onehot")
    if args.fasta:
        return read_fasta(args.fasta, iupac=args.iupac)
    if args.onehot:
        return read_onehot(args.onehot)
    if not args.genome or not args.width:
        raise InputError("--bed needs --genome and --width")
    return read_bed_regions(args.bed, args.genome, args.width, iupac=args.iupac)


def head_from_args(args: argparse.Namespace) -> OutputHead:
    """The output head described by --tasks, --task-names, --output-index, --profile-axis, --transform.

    Raises
    ------
    InputError
        Tasks that do not resolve, or an unknown transform (listing the valid ones).
    """
    names = [s.strip() for s in args.task_names.split(",")] if args.task_names else None
    tasks, task_names = parse_tasks(args.tasks, names)
    return OutputHead(args.output_index, args.profile_axis, tasks, args.transform, task_names)


def run_predict(args: argparse.Namespace) -> int:
    loci = load_loci(args)
    options = storage_options(args)  # the store's, and those of --model URLs
    spec = ModelSpec(tuple(args.model), mc_dropout=args.mc_dropout, mc_seed=args.mc_seed, storage_options=options)
    settings = ISMSettings(
        head=head_from_args(args),
        chunk_loci=args.chunk_loci,
        mutant_batch=args.mutant_batch,
        incremental=not args.full_recompute,
        precision=args.precision,
        compile=args.compile,
    )
    with connect(**cluster_settings(args).connect_options()) as client:
        ism = predict(loci, spec, args.store, client=client, settings=settings, overwrite=args.overwrite, progress=not args.quiet,
                      break_lock=args.break_lock, lock_timeout=args.lock_timeout,
                      storage_options=options)  # fmt: skip
    report = PredictReport.of(ism)
    print(
        f"{report.store}: {report.n_loci} loci in {report.n_chunks} chunks; computed {report.chunks_computed} "
        f"chunk(s), {report.mutant_predictions:,} mutant predictions in {report.seconds:.1f} s "
        f"({report.rate:,.0f}/s)"
    )
    return 0
