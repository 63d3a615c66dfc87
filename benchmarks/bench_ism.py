"""Benchmark: saturation-mutagenesis throughput of the ISM engine vs tangermeme, in one run.

For each model (the paper's simulation CNN at 100 bp, bpnet-lite's BPNet at
1 kb, and, for GPUs, a ChromBPNet-sized BPNet: 512 filters, 8 dilated layers,
2,114 bp) an ensemble of randomly initialised members is run on the same
one-hot sequences by:

(f) this engine's ``make_ensemble_runners(fuse=True)`` (the default on GPUs):
    the members fused into one network, recomputed incrementally (runner
    construction, with the fusion's and the incremental engine's build-time
    checks, inside the timing), at each ``--precisions`` entry, with its
    largest absolute difference to the fp32 row;
(a) this engine member by member, ``saturation_mutagenesis`` with ``make_runner(incremental=True)``
    (runner construction, with its build-time check, is inside the timing);
(a') the same with ``build_incremental_runner(..., outputs=(i,))`` for a head
    reading output ``i`` of a tuple (BPNet counts): unused outputs are skipped;
(b) the same engine with full recomputation (``incremental=False``);
(c) tangermeme's ``saturation_mutagenesis`` (the named peer), called once per
    member with ``raw_outputs=True``, ``batch_size`` equal to ours and ``func``
    applying the same output head; its default ``fast=True`` is kept, so it
    runs its own fastISM when it estimates the job at more than 30 s (export,
    check and timing against full passes included, as a user would see them);
(c') tangermeme's fastISM in steady state, as it runs on a job large enough
    to use it: its private ``_FastISM`` on every edit of every sequence,
    export and reference caching excluded;
(d) the original DeepMR approach: 4L sequences per locus, identity copies
    included, built on the host with numpy and predicted member by member;
(e) the forward ceiling: the members' forward passes on pre-built batches of
    the 3L mutants (the cost of full recomputation without any overhead);
(h) with ``--compile``: full recomputation with the default runners
    (``make_ensemble_runners(incremental=False)``: fused on CUDA, member by
    member on the CPU for distinct members), and (h') the same with
    ``compile=True`` (``torch.compile``, inductor) in steady state: its first
    run, compiling included, is timed apart and printed beside it (and in the
    TSV's ``note``).

With ``--global-ce``, the quickstart pipeline (``pipelines/quickstart.yaml``,
its training shortened by ``--ce-train`` / ``--ce-epochs``) runs once per
``--precisions`` entry through ``deepmr_dist.run`` on an embedded cluster (the
members trained once, at fp32, and reused): ISM at that precision, then
effects, local CEs (mr) and the meta-analysis; each precision's largest absolute
difference of ``mut_pred`` to fp32 is printed beside the change of the global CE
of every MR method (absolute, and in units of the fp32 run's standard error).
``--models`` with no model runs only that.

Throughput is mutant predictions per second, loci x members x 3L divided by
wall time; ratios are against (c) and (c') at the same precision (tangermeme
runs inside the same autocast and TF32 settings). Rows run interleaved and each keeps its
best time over the repeats, which evens out load from other processes. Every
table names the CPU (``lscpu``'s model name) or GPU and the torch thread
count; ``--tsv`` also writes every row with them. Not part of the test suite. Usage::

    python benchmarks/bench_ism.py [--models simulation bpnet chrombpnet] [--threads 2]
        [--device cpu|cuda] [--precisions fp32 bf16 ...] [--tsv rows.tsv]
        [--global-ce] [--ce-pipeline pipelines/quickstart.yaml] [--ce-train 1000] [--ce-epochs 5]
        [--sim-loci 200] [--sim-members 5] [--sim-batch 4096]
        [--bpnet-loci 1] [--bpnet-members 5] [--bpnet-length 1000] [--bpnet-filters 64] [--bpnet-layers 8]
        [--bpnet-trimming 0] [--bpnet-batch 512] [--sim-repeats 3] [--bpnet-repeats 1]
        [--chrom-loci 1] [--chrom-members 5] [--chrom-length 2114] [--chrom-filters 512] [--chrom-layers 8]
        [--chrom-batch 128] [--peers full steady deepmr ceiling] [--compile] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmr_dist.ism.engine import make_ensemble_runners, make_runner, saturation_mutagenesis
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.ism.incremental.build import build_incremental_runner
from deepmr_dist.ism.precision import precision_context
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.heads import OutputHead


@dataclass
class Case:
    """One benchmarked ensemble: members, sequences, head and mutant batch size."""

    name: str
    members: list[nn.Module]
    x: torch.Tensor
    head: OutputHead
    batch: int

    @property
    def predictions(self) -> int:
        """Mutant predictions: loci x members x 3L."""
        n, _, length = self.x.shape
        return n * len(self.members) * 3 * length

    def apply_head(self, raw: Any) -> torch.Tensor:
        """The head on a raw output of any batch size."""
        first = raw[0] if isinstance(raw, (tuple, list)) else raw
        return self.head(raw, first.shape[0])


# ----------------------------------------------------------------------------- models


def one_hot(n: int, length: int, seed: int, device: str = "cpu") -> torch.Tensor:
    codes = torch.randint(0, 4, (n, length), generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(codes, 4).transpose(1, 2).float().contiguous().to(device)


def simulation_case(args: argparse.Namespace) -> Case:
    members = []
    for i in range(args.sim_members):
        torch.manual_seed(args.seed + i)
        model = SimulationCNN(length=100)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        members.append(model.eval().to(args.device))
    x = one_hot(args.sim_loci, 100, args.seed, args.device)
    return Case("simulation CNN (100 bp)", members, x, OutputHead(), args.sim_batch)


def bpnet_case(args: argparse.Namespace) -> Case:
    return _bpnet(args, "bpnet", f"BPNet {args.bpnet_filters}x{args.bpnet_layers}")


def chrombpnet_case(args: argparse.Namespace) -> Case:
    return _bpnet(args, "chrom", f"ChromBPNet-sized BPNet {args.chrom_filters}x{args.chrom_layers}")


def _bpnet(args: argparse.Namespace, prefix: str, title: str) -> Case:
    """bpnet-lite BPNets of ``--{prefix}-filters`` x ``--{prefix}-layers``, read through the counts head."""
    from bpnetlite import BPNet

    option = lambda name: getattr(args, f"{prefix}_{name}")  # noqa: E731
    members = []
    for i in range(option("members")):
        torch.manual_seed(args.seed + i)
        model = BPNet(
            n_filters=option("filters"), n_layers=option("layers"), n_outputs=2, n_control_tracks=0,
            trimming=option("trimming"), verbose=False,
        )  # fmt: skip
        members.append(model.eval().to(args.device))
    x = one_hot(option("loci"), option("length"), args.seed, args.device)
    name = f"{title} ({option('length')} bp, trimming {option('trimming')}), counts head"
    return Case(name, members, x, OutputHead(output_index=1), option("batch"))


# ----------------------------------------------------------------------------- methods


def run_fused(case: Case, precision: str) -> torch.Tensor:
    """The ensemble fused into one network (``fuse=True``), incremental where it can be."""
    runners = make_ensemble_runners(case.members, case.x.shape[2], head=case.head, fuse=True)
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch, precision=precision)[1]


def run_engine(case: Case, incremental: bool) -> torch.Tensor:
    length = case.x.shape[2]
    runners = [make_runner(m, length, incremental=incremental) for m in case.members]
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch)[1]


def run_full_default(case: Case, compile: bool) -> torch.Tensor:
    """Full recomputation with the default runners (fused on CUDA), through ``torch.compile`` with ``compile``."""
    runners = make_ensemble_runners(case.members, case.x.shape[2], incremental=False, head=case.head, compile=compile)
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch)[1]


def run_pruned(case: Case) -> torch.Tensor:
    """This engine with runners that compute only the output element the head reads."""
    length = case.x.shape[2]
    outputs = (case.head.output_index,)
    runners = [build_incremental_runner(m, length, outputs=outputs) for m in case.members]
    assert all(r is not None for r in runners)
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch)[1]


def run_tangermeme(case: Case, report: dict[str, Any], precision: str = "fp32") -> None:
    """tangermeme's default call per member, inside the same autocast / TF32 settings as ours."""
    import tangermeme.saturation_mutagenesis as tsm

    used: list[bool] = []
    fast_path = tsm._fast_path

    def spy(*a: Any, **k: Any) -> Any:
        result = fast_path(*a, **k)
        used.append(result[0] is not None)
        return result

    tsm._fast_path = spy
    try:
        with warnings.catch_warnings(), precision_context(precision, case.x.device), torch.no_grad():
            warnings.simplefilter("ignore")
            for member in case.members:
                tsm.saturation_mutagenesis(
                    member, case.x, batch_size=case.batch, raw_outputs=True, device=case.x.device, func=case.apply_head
                )
    finally:
        tsm._fast_path = fast_path
    report["fast"] = any(used)


def run_tangermeme_steady(case: Case) -> float:
    """Seconds of tangermeme's fast path on every edit, setup (export, caching) excluded."""
    import tangermeme.saturation_mutagenesis as tsm
    from tangermeme._fastism import _FastISM

    x = tsm._to_int8(case.x)
    length = x.shape[2]
    seconds = 0.0
    with torch.no_grad():
        for member in case.members:
            fast = _FastISM(member, x, None, 0, length, case.x.device, torch.float32, False)
            for i in range(x.shape[0]):
                _, chars, positions = tsm._single_edits(x[i], 0, length)
                fast._set_example(i)
                synchronize(case.x.device)
                start = time.perf_counter()
                fast.predict_edits(i, chars, positions, case.batch, case.apply_head)
                synchronize(case.x.device)
                seconds += time.perf_counter() - start
    return seconds


def run_deepmr(case: Case) -> None:
    """4L copies per locus built with numpy, every member predicting every copy."""
    sequences = case.x.numpy()
    n, alphabet, length = sequences.shape
    eye = np.eye(alphabet, dtype=sequences.dtype)
    for i in range(n):
        copies = np.repeat(sequences[i][None], alphabet * length, axis=0)
        for p in range(length):
            copies[p * alphabet : (p + 1) * alphabet, :, p] = eye
        batch = torch.from_numpy(copies).to(case.x.device)
        with torch.inference_mode():
            for member in case.members:
                for start in range(0, batch.shape[0], case.batch):
                    case.apply_head(member(batch[start : start + case.batch]))


def forward_ceiling(case: Case) -> float:
    """Seconds of forward passes alone on pre-built 3L mutants."""
    locus, position, base = mutation_list(case.x)
    mutants = case.x[locus].clone()
    rows = torch.arange(locus.shape[0])
    mutants[rows, :, position] = 0
    mutants[rows, base, position] = 1
    synchronize(case.x.device)
    start = time.perf_counter()
    with torch.inference_mode():
        for member in case.members:
            for s in range(0, mutants.shape[0], case.batch):
                case.apply_head(member(mutants[s : s + case.batch]))
    synchronize(case.x.device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- driver


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device = torch.device("cpu")) -> tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def methods(
    case: Case, peers: set[str], precisions: list[str], report: dict[str, Any], compile: bool = False
) -> dict[str, tuple[str, Callable[[], float]]]:
    """The timed rows: name -> (precision, run returning its seconds)."""
    device = case.x.device

    def engine(incremental: bool) -> float:
        key = "incremental" if incremental else "full"
        seconds, report[key] = timed(lambda: run_engine(case, incremental), device)
        return seconds

    def fused(precision: str) -> float:
        seconds, report[f"fused {precision}"] = timed(lambda: run_fused(case, precision), device)
        return seconds

    def tangermeme(precision: str) -> float:
        return timed(lambda: run_tangermeme(case, report, precision), device)[0]

    def full_default(compiled: bool) -> float:
        key = "full default compiled" if compiled else "full default"
        seconds, report[key] = timed(lambda: run_full_default(case, compiled), device)
        if compiled and "compile seconds" not in report:  # that was the first run: time the steady state too
            report["compile seconds"] = seconds
            seconds, report[key] = timed(lambda: run_full_default(case, compiled), device)
        return seconds

    rows: dict[str, tuple[str, Callable[[], float]]] = {}
    for precision in precisions:
        rows[f"(f) deepmr-dist, fused ensemble, {precision}"] = (precision, lambda p=precision: fused(p))
    rows["(a) deepmr-dist, incremental, member by member"] = ("fp32", lambda: engine(True))
    if case.head.output_index is not None:
        rows["(a') the same, head's output only"] = ("fp32", lambda: timed(lambda: run_pruned(case), device)[0])
    if "full" in peers:
        rows["(b) deepmr-dist, full recompute"] = ("fp32", lambda: engine(False))
    for precision in precisions:
        rows[f"(c) tangermeme, {precision}"] = (precision, lambda p=precision: tangermeme(p))
    if "steady" in peers:
        rows["(c') tangermeme fastISM, setup excluded, fp32"] = ("fp32", lambda: run_tangermeme_steady(case))
    if "deepmr" in peers:
        rows["(d) original DeepMR (4L copies on host)"] = ("fp32", lambda: timed(lambda: run_deepmr(case), device)[0])
    if "ceiling" in peers:
        rows["(e) forward ceiling (pre-built mutants)"] = ("fp32", lambda: forward_ceiling(case))
    if compile:
        rows["(h) full recompute, default runners, eager"] = ("fp32", lambda: full_default(False))
        rows["(h') the same, torch.compile"] = ("fp32", lambda: full_default(True))
    return rows


def processor(device: torch.device) -> str:
    """The GPU's name, or the CPU model string as ``lscpu`` prints it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return "unknown CPU"


def bench(
    case: Case, peers: set[str], precisions: list[str], repeats: int, tsv: csv.writer | None, compile: bool = False
) -> None:
    n, _, length = case.x.shape
    device = case.x.device
    where = f"{processor(device)}, {torch.get_num_threads()} torch threads, device {device.type}"
    print(f"\n== {case.name}: {n} loci x {len(case.members)} members x 3L = {case.predictions} mutant predictions")
    print(f"   {where}")
    print(f"   mutant batch {case.batch} (ours and tangermeme's batch_size); best of {repeats}, methods interleaved")
    report: dict[str, Any] = {}
    rows = methods(case, peers, precisions, report, compile)
    best = {name: float("inf") for name in rows}
    failed: dict[str, str] = {}
    for _ in range(repeats):
        for name, (_, run) in rows.items():
            if name in failed:
                continue
            try:
                best[name] = min(best[name], run())
            except Exception as err:  # noqa: BLE001 - a peer that cannot run a precision is reported, not fatal
                failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:80]}"
    reference = report.get("fused fp32", report.get("incremental"))
    if "full" in report and "incremental" in report:
        diff = (report["incremental"] - report["full"]).nan_to_num().abs().max().item()
        print(f"   max |(a) - (b)| over all mutant predictions = {diff:.3g}")
    if "full default compiled" in report and "full default" in report:
        diff = (report["full default compiled"] - report["full default"]).nan_to_num().abs().max().item()
        print(f"   (h') first run, compiling included: {report['compile seconds']:.2f} s; max |(h') - (h)| = {diff:.3g}")
    errors = {}
    for precision in precisions:
        key = f"fused {precision}"
        if key in report and reference is not None:
            errors[precision] = (report[key] - reference).nan_to_num().abs().max().item()
    print(f"   (c) is tangermeme {_tangermeme_version()} with its default fast=True; it used "
          f"{'its fastISM' if report.get('fast') else 'full passes'}")  # fmt: skip
    print(f"   {'method':56s} {'seconds':>9s} {'mutants/s':>11s} {'vs (c)':>8s} {'vs (c)':>8s} {'max|err| vs fp32':>16s}"
          .replace("vs (c)   vs (c)", "vs (c)  vs (c')"))  # fmt: skip
    steady = best.get("(c') tangermeme fastISM, setup excluded, fp32", float("nan"))
    for name, seconds in best.items():
        precision = rows[name][0]
        if name in failed:
            print(f"   {name:56s} failed: {failed[name]}")
            continue
        peer = best.get(f"(c) tangermeme, {precision}", float("nan"))
        error = errors.get(precision) if name.startswith("(f)") else None
        shown = "" if error is None else f"{error:.3g}"
        print(f"   {name:56s} {seconds:9.2f} {case.predictions / seconds:11.0f} {peer / seconds:7.2f}x "
              f"{steady / seconds:7.2f}x {shown:>16s}")  # fmt: skip
        if tsv is not None:
            tsv.writerow([case.name, name, precision, processor(device), torch.get_num_threads(), device.type,
                          f"{seconds:.4f}", f"{case.predictions / seconds:.1f}", f"{peer / seconds:.3f}",
                          f"{steady / seconds:.3f}", shown, "", "", _note(name, report)])  # fmt: skip


def _note(name: str, report: dict[str, Any]) -> str:
    """The TSV's note of a row: (h')'s first run, compiling included."""
    return f"first run {report['compile seconds']:.2f} s, compiling included" if name.startswith("(h')") else ""


# ----------------------------------------------------------------------------- global CE per precision

QUICKSTART = Path(__file__).resolve().parent.parent / "pipelines" / "quickstart.yaml"


def global_ce_per_precision(args: argparse.Namespace, tsv: csv.writer | None) -> None:
    """The pipeline at each precision: |change of the global CE| against fp32 beside the ISM's max |error|."""
    import numpy as np
    import pandas as pd
    from deepmr_dist.cluster import connect, worker_device
    from deepmr_dist.io import store
    from deepmr_dist.pipeline.api import load_pipeline, run
    from deepmr_dist.pipeline.config import PipelineConfig
    from deepmr_dist.pipeline.plan import SIMULATION_TASKS

    base = load_pipeline(args.ce_pipeline).model_dump()
    base["sequences"]["simulation"]["generator"]["n_train"] = args.ce_train
    base["model"]["training"]["epochs"] = args.ce_epochs
    base["report"] = False
    precisions = ["fp32", *(p for p in args.precisions if p != "fp32")]
    tables: dict[str, pd.DataFrame] = {}
    mut: dict[str, np.ndarray] = {}
    ref: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ism_ce_") as tmp, connect("local", verbose=False) as client:
        device = sorted(set(client.run(lambda: str(worker_device())).values()))
        threads = sorted(set(client.run(torch.get_num_threads).values()))
        for precision in precisions:
            config = {**base, "store": f"{tmp}/{precision}.zarr", "outputs": None, "ism": {**base["ism"], "precision": precision}}
            if precision != "fp32":  # the members trained by the fp32 run
                members = sorted(str(p) for p in Path(tmp, "fp32", "members").glob("member-*.pt"))
                config["model"] = {"sources": members}
                config["tasks"] = {**base["tasks"], "names": list(SIMULATION_TASKS)}
            start = time.perf_counter()
            try:
                result = run(PipelineConfig.model_validate(config), client=client, progress=False)
            except Exception as err:  # noqa: BLE001 - a precision the workers cannot run is reported, not fatal
                print(f"   {precision}: failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            tables[precision] = result.global_table.set_index("method")
            ism = store.open_run(result.store)["ism"]
            mut[precision], ref[precision] = ism["mut_pred"].values, ism["ref_pred"].values
            print(f"   {precision}: pipeline {time.perf_counter() - start:.1f} s")
    n_loci, n_members = mut["fp32"].shape[:2]
    print(f"\n== global CE per precision: {args.ce_pipeline} (n_train {args.ce_train}, {args.ce_epochs} epochs), "
          f"{n_loci} loci x {n_members} members")  # fmt: skip
    print(f"   workers on {', '.join(device)} ({processor(torch.device(device[0]))}), torch threads per worker {threads}")
    with warnings.catch_warnings():  # the reference alleles: NaN for every member
        warnings.simplefilter("ignore", RuntimeWarning)
        effect = np.nanmean(mut["fp32"] - ref["fp32"][:, :, None, None, :], axis=1)  # the effects' scale
    print(f"   fp32 scale: max |mut_pred| {np.nanmax(np.abs(mut['fp32'])):.3g}, median |effect| "
          f"{np.nanmedian(np.abs(effect)):.3g}; errors are max |mut_pred - fp32's|")  # fmt: skip
    print(f"   {'precision':9s} {'max|mut_pred err|':>17s} {'method':12s} {'global CE':>10s} {'|change|':>10s} {'/ SE':>8s}")
    reference = tables["fp32"]
    for precision, table in tables.items():
        error = float(np.nanmax(np.abs(mut[precision] - mut["fp32"])))
        for method, row in table.iterrows():
            change = abs(row["estimate"] - reference.loc[method, "estimate"])
            ratio = change / reference.loc[method, "se"]
            print(f"   {precision:9s} {error:17.3g} {method:12s} {row['estimate']:10.5g} {change:10.3g} {ratio:8.3g}")
            if tsv is not None:
                tsv.writerow([f"global CE, {Path(args.ce_pipeline).name}", f"(g) {method}", precision,
                              processor(torch.device(device[0])), threads[0], device[0], "", "", "", "", f"{error:.3g}",
                              f"{row['estimate']:.6g}", f"{change:.3g}", ""])  # fmt: skip


def _tangermeme_version() -> str:
    from importlib.metadata import version

    return version("tangermeme")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["simulation", "bpnet"], choices=["simulation", "bpnet", "chrombpnet"],
                        help="throughput models (none: only --global-ce)")  # fmt: skip
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["full", "steady", "deepmr", "ceiling"],
        choices=["full", "steady", "deepmr", "ceiling"],
        help="rows besides (f), (a) and (c) to run",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "tf32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="also (h), (h'): full recompute, eager and compiled")
    parser.add_argument("--tsv", help="also write every row (with processor and threads) to this TSV file")
    parser.add_argument("--global-ce", action="store_true", help="also the global CE of a pipeline at each precision")
    parser.add_argument("--ce-pipeline", default=str(QUICKSTART), help="the pipeline of --global-ce (a simulation)")
    parser.add_argument("--ce-train", type=int, default=1000, help="training loci of --global-ce's simulation")
    parser.add_argument("--ce-epochs", type=int, default=5, help="training epochs of --global-ce's members")
    parser.add_argument("--sim-repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--bpnet-repeats", type=int, default=1, help="best of this many interleaved runs (both BPNets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-loci", type=int, default=200)
    parser.add_argument("--sim-members", type=int, default=5)
    parser.add_argument("--sim-batch", type=int, default=4096)
    for prefix, loci, length, filters, layers, trimming, batch in (
        ("bpnet", 1, 1000, 64, 8, 0, 512), ("chrom", 1, 2114, 512, 8, 557, 128)
    ):  # fmt: skip
        parser.add_argument(f"--{prefix}-loci", type=int, default=loci)
        parser.add_argument(f"--{prefix}-members", type=int, default=5)
        parser.add_argument(f"--{prefix}-length", type=int, default=length)
        parser.add_argument(f"--{prefix}-filters", type=int, default=filters)
        parser.add_argument(f"--{prefix}-layers", type=int, default=layers)
        parser.add_argument(f"--{prefix}-trimming", type=int, default=trimming, help="BPNet trimming of each end")
        parser.add_argument(f"--{prefix}-batch", type=int, default=batch)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}: {processor(device)}")
    peers = set(args.peers)
    out = open(args.tsv, "w", newline="") if args.tsv else None  # noqa: SIM115 - closed below
    tsv = csv.writer(out, delimiter="\t") if out else None
    if tsv is not None:
        tsv.writerow(["model", "method", "precision", "processor", "threads", "device", "seconds", "mutants_per_s",
                      "vs_c", "vs_c_steady", "max_abs_err_vs_fp32", "global_ce", "abs_change_global_ce_vs_fp32",
                      "note"])  # fmt: skip
    cases = {"simulation": (simulation_case, args.sim_repeats), "bpnet": (bpnet_case, args.bpnet_repeats),
             "chrombpnet": (chrombpnet_case, args.bpnet_repeats)}  # fmt: skip
    try:
        for model in args.models:
            build, repeats = cases[model]
            bench(build(args), peers, args.precisions, repeats, tsv, args.compile)
        if args.global_ce:
            global_ce_per_precision(args, tsv)
    finally:
        if out is not None:
            out.close()


if __name__ == "__main__":
    main()
