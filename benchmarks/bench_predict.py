"""Benchmark: ``deepmr predict`` into a Zarr store on the embedded LocalCluster vs the bare ISM engine.

Both sides run the same loci through the same ensemble (the paper's simulation
CNN, 5 members by default) with the same runners (``make_ensemble_runners``,
as ``deepmr predict`` chooses them: fused where that is the default, incremental
unless ``--engine full``), the same loci per forward call (``--chunk-loci``) and
the same mutant batch, on the same number of cores:

* peer, "bare engine": :func:`deepmr_dist.ism.engine.saturation_mutagenesis`
  in this one process, ``torch.set_num_threads(workers)``, no store, timed on
  the engine loop only (model loading and one-hot encoding excluded: the
  peer's best case); also with one torch thread, scaled by the core count
  (ideal linear scaling), and split over ``workers`` processes of one
  torch thread each (the same cores, no Dask, no store: what the machine's
  parallel scaling allows);
* ``deepmr predict`` (the API the CLI calls): an embedded ``LocalCluster`` of
  ``workers`` single-threaded worker processes (one torch thread each), one
  Dask task per locus chunk, each writing its chunk into the run store. Its
  time is the whole ``predict`` call (validation, store template, model load
  on every worker, ISM, Zarr writes); cluster start-up is reported separately.

Prints mutant predictions per second (wall) and per CPU-second of each, and
the ratios (target: ``deepmr predict`` >= 70 % of the bare engine). Rounds
alternate the three measurements and the best of each is kept, to damp the
noise of other processes on the same cores. Not part of the test suite.

Usage::

    python benchmarks/bench_predict.py [--loci 2000] [--members 5] [--workers 2] [--chunk-loci 64]
        [--mutant-batch 2048|auto] [--engine incremental|full]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loci", type=int, default=2000)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--members", type=int, default=5)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="cluster workers = bare-engine torch threads")
    p.add_argument("--chunk-loci", type=int, default=64)
    p.add_argument("--mutant-batch", type=_batch, default=2048, help="mutants per forward pass, or auto")
    p.add_argument("--engine", choices=("incremental", "full"), default="incremental")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="rounds of every measurement; the best of each is kept")
    p.add_argument("--dir", help="working directory for the store (default: a temporary one)")
    return p.parse_args()


def _batch(text: str) -> int | str:
    return text if text == "auto" else int(text)


def _models_module(root: Path, members: int, length: int) -> str:
    """A module with the ensemble's entry point, importable by worker processes through PYTHONPATH."""
    name = "deepmr_bench_models"
    (root / f"{name}.py").write_text(
        textwrap.dedent(
            f"""
            from deepmr_dist.models.examples import simulation_ensemble

            def ensemble():
                return simulation_ensemble({members}, {length})
            """
        )
    )
    sys.path.insert(0, str(root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return f"{name}:ensemble"


def _bare_engine(loci, spec, settings, threads: int) -> tuple[float, float, np.ndarray]:
    """(wall s, CPU s of this process, mut_pred of the first chunk) of the engine loop over every chunk."""
    import torch

    from deepmr_dist.ism.engine import make_ensemble_runners, saturation_mutagenesis
    from deepmr_dist.models.ensemble import load_members
    from deepmr_dist.io.sequence import codes_to_onehot

    torch.set_num_threads(threads)
    members = load_members(spec, "cpu")
    runners = make_ensemble_runners(members, loci.sizes["position"], incremental=settings.incremental, head=settings.head)
    x = codes_to_onehot(torch.from_numpy(loci["sequence"].values))
    chunk = settings.chunk_loci
    saturation_mutagenesis(runners, settings.head, x[:2], mutant_batch=settings.mutant_batch)  # warm-up
    first = None
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, x.shape[0], chunk):
        _, mut = saturation_mutagenesis(runners, settings.head, x[start : start + chunk], mutant_batch=settings.mutant_batch)
        if first is None:
            first = mut.numpy()
    return time.perf_counter() - t0, time.process_time() - c0, first


def _bare_engine_share(loci, spec, settings) -> tuple[float, float, float]:
    """In a child process with one torch thread: (loop start, loop stop, CPU s) of the engine on a share of the loci."""
    wall, cpu, _ = _bare_engine(loci, spec, settings, 1)
    stop = time.time()
    return stop - wall, stop, cpu


def _bare_engine_processes(loci, spec, settings, processes: int) -> tuple[float, float]:
    """(wall s from the first loop start to the last loop stop, CPU s) of the engine in ``processes`` 1-thread processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, loci.sizes["locus"] // settings.chunk_loci, processes + 1).astype(int) * settings.chunk_loci
    bounds[-1] = loci.sizes["locus"]
    shares = [loci.isel(locus=slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_bare_engine_share, shares, [spec] * processes, [settings] * processes))
    return max(r[1] for r in results) - min(r[0] for r in results), sum(r[2] for r in results)


def _worker_cpu_seconds() -> float:
    import psutil

    times = psutil.Process().cpu_times()
    return times.user + times.system


def _deepmr_predict(loci, spec, settings, workers: int, path: str) -> tuple[float, float, float, list[int], int]:
    """(wall s of the predict call, CPU s of client + workers, cluster start s, torch threads per worker, tasks)."""
    import torch

    from deepmr_dist.io import store
    from deepmr_dist.cluster import connect
    from deepmr_dist.stages.predict import PredictReport, predict

    store.remove_store(path)  # a fresh store every round (an existing one would be resumed, not recomputed)
    t_start = time.perf_counter()
    with connect("local", n_workers=workers, threads_per_worker=1, verbose=False) as client:  # what `deepmr predict` uses
        startup_s = time.perf_counter() - t_start
        threads = sorted(client.run(torch.get_num_threads).values())
        before = client.run(_worker_cpu_seconds)
        c0 = time.process_time()
        report = PredictReport.of(predict(loci, spec, path, client=client, settings=settings, progress=False))
        cpu = time.process_time() - c0
        after = client.run(_worker_cpu_seconds)
    cpu += sum(after[w] - before[w] for w in before)
    return report.seconds, cpu, startup_s, threads, report.chunks_computed


def main() -> int:
    args = _args()
    import torch
    import zarr

    from deepmr_dist.models.ensemble import ModelSpec
    from deepmr_dist.stages.predict import ISMSettings
    from deepmr_dist.io.sequence import sequences_dataset

    incremental = args.engine == "incremental"
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_predict_"))
    workdir.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec((_models_module(workdir, args.members, args.length),))
    codes = np.random.default_rng(args.seed).integers(0, 4, (args.loci, args.length)).astype(np.int8)
    loci = sequences_dataset(codes, [f"locus{i:06d}" for i in range(args.loci)])
    settings = ISMSettings(chunk_loci=args.chunk_loci, mutant_batch=args.mutant_batch, incremental=incremental)
    n_pred = args.loci * args.members * 3 * args.length
    path = str(workdir / "run.zarr")

    print(
        f"bench_predict: {args.loci} loci x {args.length} bp, {args.members}-member simulation CNN ensemble, "
        f"engine={'incremental' if incremental else 'full recompute'}, {args.chunk_loci} loci per task/call, "
        f"mutant batch {args.mutant_batch}; {n_pred:,} mutant predictions per run; {args.repeats} round(s), "
        "the best of each kept"
    )
    print(f"machine: {os.cpu_count()} cores; torch {torch.__version__}; load average {os.getloadavg()[0]:.2f} at start")
    best: dict[str, tuple[float, float]] = {}

    def keep(name: str, wall: float, cpu: float) -> None:
        old = best.get(name)
        best[name] = (min(wall, old[0]), min(cpu, old[1])) if old else (wall, cpu)

    first = None
    for round_ in range(args.repeats):
        wall, cpu, first = _bare_engine(loci, spec, settings, args.workers)
        keep(f"bare engine, 1 process, {args.workers} torch threads", wall, cpu)
        wall, cpu, _ = _bare_engine(loci, spec, settings, 1)
        keep("bare engine, 1 process, 1 torch thread", wall, cpu)
        wall, cpu = _bare_engine_processes(loci, spec, settings, args.workers)
        keep(f"bare engine, {args.workers} processes x 1 torch thread", wall, cpu)
        wall, cpu, startup, threads, tasks = _deepmr_predict(loci, spec, settings, args.workers, path)
        keep(f"deepmr predict, LocalCluster {len(threads)} workers x 1 thread", wall, cpu)
        print(
            f"  round {round_ + 1}: cluster start {startup:.1f} s, torch threads per worker {threads}, {tasks} tasks; "
            f"load average {os.getloadavg()[0]:.2f}"
        )

    print(f"{'':56s} {'wall s':>8s} {'predictions/s':>14s} {'CPU s':>8s} {'per CPU-s':>10s}")
    for name, (wall, cpu) in best.items():
        print(f"{name:56s} {wall:8.1f} {n_pred / wall:14,.0f} {cpu:8.1f} {n_pred / cpu:10,.0f}")
    names = list(best)
    rate = {name: n_pred / wall for name, (wall, _) in best.items()}
    per_cpu = {name: n_pred / cpu for name, (_, cpu) in best.items()}
    bare_n, bare_1, bare_procs, dist = names
    stored = zarr.open_array(path, path="ism/mut_pred", mode="r")[: first.shape[0]]
    print(f"check: first chunk of the store vs the bare engine, max |difference| = {np.nanmax(np.abs(stored - first)):.3g}")
    print(f"ratio deepmr predict / bare engine ({args.workers} torch threads), wall: {rate[dist] / rate[bare_n]:.2f} (target >= 0.70)")
    print(
        f"ratio deepmr predict / ideal linear scaling of the 1-thread engine ({args.workers} x), wall: "
        f"{rate[dist] / (args.workers * rate[bare_1]):.2f}"
    )
    print(f"ratio deepmr predict / bare engine in {args.workers} processes x 1 thread, wall: {rate[dist] / rate[bare_procs]:.2f}")
    print(f"ratio deepmr predict / 1-thread engine, predictions per CPU-second: {per_cpu[dist] / per_cpu[bare_1]:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end (other processes may share these cores: wall figures are noisy)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
