"""Benchmark: saturation-mutagenesis throughput of the ISM engine vs tangermeme, in one run.

For each model (the paper's simulation CNN at 100 bp, bpnet-lite's BPNet at
1 kb) an ensemble of randomly initialised members is run on the same one-hot
sequences by:

(a) this engine, ``saturation_mutagenesis`` with ``make_runner(incremental=True)``
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
    the 3L mutants (the cost of full recomputation without any overhead).

Throughput is mutant predictions per second, loci x members x 3L divided by
wall time; ratios are against (c) and (c'). Rows run interleaved and each keeps its
best time over the repeats, which evens out load from other processes. Not
part of the test suite. Usage::

    python benchmarks/bench_ism.py [--models simulation bpnet] [--threads 2]
        [--sim-loci 200] [--sim-members 5] [--sim-batch 4096]
        [--bpnet-loci 1] [--bpnet-members 5] [--bpnet-length 1000]
        [--bpnet-trimming 0] [--bpnet-batch 512] [--sim-repeats 3]
        [--bpnet-repeats 1] [--peers full steady deepmr ceiling] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deepmr_dist.ism.engine import make_runner, saturation_mutagenesis
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.ism.incremental.build import build_incremental_runner
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


def one_hot(n: int, length: int, seed: int) -> torch.Tensor:
    codes = torch.randint(0, 4, (n, length), generator=torch.Generator().manual_seed(seed))
    return nn.functional.one_hot(codes, 4).transpose(1, 2).float().contiguous()


def simulation_case(args: argparse.Namespace) -> Case:
    members = []
    for i in range(args.sim_members):
        torch.manual_seed(args.seed + i)
        model = SimulationCNN(length=100)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        members.append(model.eval())
    x = one_hot(args.sim_loci, 100, args.seed)
    return Case("simulation CNN (100 bp)", members, x, OutputHead(), args.sim_batch)


def bpnet_case(args: argparse.Namespace) -> Case:
    from bpnetlite import BPNet

    members = []
    for i in range(args.bpnet_members):
        torch.manual_seed(args.seed + i)
        model = BPNet(
            n_filters=64, n_layers=8, n_outputs=2, n_control_tracks=0, trimming=args.bpnet_trimming, verbose=False
        )
        members.append(model.eval())
    x = one_hot(args.bpnet_loci, args.bpnet_length, args.seed)
    name = f"BPNet 64x8 ({args.bpnet_length} bp, trimming {args.bpnet_trimming}), counts head"
    return Case(name, members, x, OutputHead(output_index=1), args.bpnet_batch)


# ----------------------------------------------------------------------------- methods


def run_engine(case: Case, incremental: bool) -> torch.Tensor:
    length = case.x.shape[2]
    runners = [make_runner(m, length, incremental=incremental) for m in case.members]
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch)[1]


def run_pruned(case: Case) -> torch.Tensor:
    """This engine with runners that compute only the output element the head reads."""
    length = case.x.shape[2]
    outputs = (case.head.output_index,)
    runners = [build_incremental_runner(m, length, outputs=outputs) for m in case.members]
    assert all(r is not None for r in runners)
    return saturation_mutagenesis(runners, case.head, case.x, mutant_batch=case.batch)[1]


def run_tangermeme(case: Case, report: dict[str, Any]) -> None:
    import tangermeme.saturation_mutagenesis as tsm

    used: list[bool] = []
    fast_path = tsm._fast_path

    def spy(*a: Any, **k: Any) -> Any:
        result = fast_path(*a, **k)
        used.append(result[0] is not None)
        return result

    tsm._fast_path = spy
    try:
        with warnings.catch_warnings():
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
                start = time.perf_counter()
                fast.predict_edits(i, chars, positions, case.batch, case.apply_head)
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
        batch = torch.from_numpy(copies)
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
    start = time.perf_counter()
    with torch.inference_mode():
        for member in case.members:
            for s in range(0, mutants.shape[0], case.batch):
                case.apply_head(member(mutants[s : s + case.batch]))
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- driver


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def methods(case: Case, peers: set[str], report: dict[str, Any]) -> dict[str, Callable[[], float]]:
    """The timed rows, each returning its seconds."""
    def engine(incremental: bool) -> float:
        seconds, report["incremental" if incremental else "full"] = timed(lambda: run_engine(case, incremental))
        return seconds

    rows: dict[str, Callable[[], float]] = {"(a) deepmr-dist, incremental": lambda: engine(True)}
    if case.head.output_index is not None:
        rows["(a') deepmr-dist, incremental, head's output only"] = lambda: timed(lambda: run_pruned(case))[0]
    if "full" in peers:
        rows["(b) deepmr-dist, full recompute"] = lambda: engine(False)
    rows["(c) tangermeme"] = lambda: timed(lambda: run_tangermeme(case, report))[0]
    if "steady" in peers:
        rows["(c') tangermeme fastISM, setup excluded"] = lambda: run_tangermeme_steady(case)
    if "deepmr" in peers:
        rows["(d) original DeepMR (4L copies on host)"] = lambda: timed(lambda: run_deepmr(case))[0]
    if "ceiling" in peers:
        rows["(e) forward ceiling (pre-built mutants)"] = lambda: forward_ceiling(case)
    return rows


def bench(case: Case, peers: set[str], repeats: int) -> None:
    n, _, length = case.x.shape
    print(f"\n== {case.name}: {n} loci x {len(case.members)} members x 3L = {case.predictions} mutant predictions")
    print(f"   mutant batch {case.batch} (ours and tangermeme's batch_size); best of {repeats}, methods interleaved")
    report: dict[str, Any] = {}
    rows = methods(case, peers, report)
    best = {name: float("inf") for name in rows}
    for _ in range(repeats):
        for name, run in rows.items():
            best[name] = min(best[name], run())
    if "full" in report:
        diff = (report["incremental"] - report["full"]).nan_to_num().abs().max().item()
        print(f"   max |(a) - (b)| over all mutant predictions = {diff:.3g}")
    path = "its fastISM" if report["fast"] else "full passes"
    print(f"   (c) is tangermeme {_tangermeme_version()} with its default fast=True; it used {path}")
    peers_seconds = {k: v for k, v in best.items() if k.startswith(("(c)", "(c')"))}
    header = "".join(f" {'vs ' + k.split()[0]:>8s}" for k in peers_seconds)
    print(f"   {'method':50s} {'seconds':>9s} {'mutants/s':>11s}{header}")
    for name, seconds in best.items():
        ratios = "".join(f" {peer / seconds:7.2f}x" for peer in peers_seconds.values())
        print(f"   {name:50s} {seconds:9.2f} {case.predictions / seconds:11.0f}{ratios}")


def _tangermeme_version() -> str:
    from importlib.metadata import version

    return version("tangermeme")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["simulation", "bpnet"], choices=["simulation", "bpnet"])
    parser.add_argument(
        "--peers",
        nargs="*",
        default=["full", "steady", "deepmr", "ceiling"],
        choices=["full", "steady", "deepmr", "ceiling"],
        help="rows besides (a) and (c) to run",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sim-repeats", type=int, default=3, help="best of this many interleaved runs")
    parser.add_argument("--bpnet-repeats", type=int, default=1, help="best of this many interleaved runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sim-loci", type=int, default=200)
    parser.add_argument("--sim-members", type=int, default=5)
    parser.add_argument("--sim-batch", type=int, default=4096)
    parser.add_argument("--bpnet-loci", type=int, default=1)
    parser.add_argument("--bpnet-members", type=int, default=5)
    parser.add_argument("--bpnet-length", type=int, default=1000)
    parser.add_argument("--bpnet-trimming", type=int, default=0, help="BPNet trimming (0: 1 kb in, 1 kb profile out)")
    parser.add_argument("--bpnet-batch", type=int, default=512)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    peers = set(args.peers)
    for model in args.models:
        if model == "simulation":
            bench(simulation_case(args), peers, args.sim_repeats)
        else:
            bench(bpnet_case(args), peers, args.bpnet_repeats)


if __name__ == "__main__":
    main()
