"""Genome-scale reductions: effects, MR of every pair and the meta-analysis on a store larger than the workers' memory.

Builds a synthetic ISM store (default 180,000 loci x 5 members x 200 bp x 4 tasks, mut_pred
10.7 GiB, over 10x a worker's memory limit of 1 GiB), then times on an embedded cluster of
single-threaded workers with a memory limit (deepmr's own, :func:`deepmr_dist.cluster.connect`), in one run:

- a bare read pass of ``mut_pred`` (every chunk read and decompressed, nothing computed): the peer;
- effects (:func:`deepmr_dist.stages.effects.compute_effects` written by ``store.write_group``, as the runner does);
- MR of all 12 ordered pairs with ``egger_paper`` and ``ivw``, instruments ``mutation_z >= 3``;
- the meta-analysis;
- each worker's peak RSS (``VmHWM``), against the limit.

Then ``predict`` of the example ensemble on 1 and on 2 local workers, and on a separately
started ``dask scheduler`` with 2 ``dask worker`` processes (loopback).

Goals (issue "Genome-scale runs"): effects <= 2x the read pass; effects + MR + meta <= 6x; peak
RSS below the limit; predict on 2 workers >= 1.7x on 1.

The limit is 1 GiB, not less: a worker that has compiled the MR kernels holds about 410 MiB
before it reads any data (207 MiB fresh: Python, numpy, scipy, pandas, xarray, zarr, distributed;
then numba and LLVM with the compiled IVW and robust-regression loops), so under 600 MiB Dask's
pause threshold (80 %) stalls the MR stage.

    python benchmarks/bench_scale.py                 # the full size (about 10 min on 2 cores)
    python benchmarks/bench_scale.py --loci 4000     # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dask.array as da
import numpy as np

TASKS = ["t0", "t1", "t2", "t3"]


def cpu_model() -> str:
    """The CPU model string, as ``lscpu`` prints it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def build_store(path: str, n_loci: int, n_members: int, length: int, chunk_loci: int, seed: int = 0) -> int:
    """A complete synthetic ISM store; returns ``mut_pred``'s bytes (float32, before compression).

    Each locus has per-mutation effects on t0; t1 = 0.5 t0 + noise, t2 and t3 independent; members
    add their own noise, so effects and SEs are realistic in structure (a few strong mutations per locus).
    """
    from deepmr_dist.io import store
    from deepmr_dist.io.sequence import sequences_dataset

    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, size=(n_loci, length), dtype=np.int8)
    loci = sequences_dataset(codes, [f"locus{i:06d}" for i in range(n_loci)])
    members = [f"member{i}" for i in range(n_members)]
    store.create_store(path, store.ism_template(loci, members, TASKS, chunk_loci), fingerprint="bench-scale", attrs={},
                       chunk_loci=chunk_loci)  # fmt: skip
    for start, stop in store.chunk_bounds(n_loci, chunk_loci):
        n = stop - start
        base = rng.standard_t(3, size=(n, 1, length, 4, 1)).astype(np.float32) * 0.05
        effect = np.concatenate([base, 0.5 * base, 0.3 * base[:, :, ::-1], np.zeros_like(base)], axis=-1)
        noise = rng.normal(0, 0.01, size=(n, n_members, length, 4, len(TASKS))).astype(np.float32)
        ref = rng.normal(0, 1, size=(n, n_members, len(TASKS))).astype(np.float32)
        mut = ref[:, :, None, None, :] + effect + noise
        reference = codes[start:stop]
        mut[np.arange(n)[:, None], :, np.arange(length)[None, :], reference] = np.nan  # not a mutation
        store.write_ism_chunk(path, start, ref, mut)
    return n_loci * n_members * length * 4 * len(TASKS) * 4


def _peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed(label: str, fn, results: dict[str, float]) -> None:
    tick = time.perf_counter()
    fn()
    results[label] = time.perf_counter() - tick
    print(f"  {label}: {results[label]:.1f} s", flush=True)


def reductions(path: str, n_workers: int, memory_limit: str) -> tuple[dict[str, float], list[int]]:
    """Time the read pass, effects, MR and meta on deepmr's embedded cluster; each worker's peak RSS."""
    from deepmr_dist import schema
    from deepmr_dist.cluster import connect
    from deepmr_dist.io import store
    from deepmr_dist.stages.causal_effects import global_ce, local_ce
    from deepmr_dist.stages.effects import compute_effects

    pairs = [(e, o) for e in TASKS for o in TASKS if e != o]
    results: dict[str, float] = {}
    with connect("local", n_workers=n_workers, memory_limit=memory_limit, verbose=False) as client:
        ism = store.open_run(path)[schema.ISM]
        mut = ism["mut_pred"].data

        def read_pass() -> None:  # every chunk read and decompressed; one number per chunk kept
            da.map_blocks(lambda b: np.zeros((1,) * b.ndim), mut, chunks=(1,) * mut.ndim, dtype=float).sum().compute()

        _timed("read pass", read_pass, results)
        _timed("effects", lambda: store.write_group(path, compute_effects(ism), schema.EFFECTS), results)
        effects = store.open_run(path)[schema.EFFECTS]
        local = {}
        _timed("mr (12 pairs x 2 methods)", lambda: local.setdefault("mr", store.write_group(
            path, local_ce(effects, pairs=pairs, methods=["egger_paper", "ivw"], rule="mutation_z", threshold=3.0),
            schema.MR)), results)  # fmt: skip
        _timed("meta", lambda: store.write_group(path, global_ce(local["mr"]), schema.META), results)
        peaks = sorted(client.run(_peak_rss).values())
    return results, peaks


def predict_scaling(n_loci: int, tmp: Path) -> dict[str, float]:
    """Wall time of ``deepmr predict`` of the example ensemble on 1 and 2 embedded workers and on a separate cluster."""
    from distributed import Client

    from deepmr_dist.cluster import connect

    from deepmr_dist.io.sequence import sequences_dataset
    from deepmr_dist.models.ensemble import ModelSpec
    from deepmr_dist.stages.predict import ISMSettings, predict

    codes = np.random.default_rng(1).integers(0, 4, size=(n_loci, 100), dtype=np.int8)
    loci = sequences_dataset(codes, [f"l{i}" for i in range(n_loci)])
    spec = ModelSpec(("deepmr_dist.models.examples:simulation_ensemble",))
    settings = ISMSettings(chunk_loci=max(1, n_loci // 16))
    results: dict[str, float] = {}

    def run(client: Client, label: str) -> None:
        target = str(tmp / f"predict-{label.replace(' ', '-')}.zarr")
        shutil.rmtree(target, ignore_errors=True)
        client.run(lambda: None)  # workers up before the clock starts
        _timed(f"predict, {label}", lambda: predict(loci, spec, target, client=client, settings=settings, progress=False),
               results)  # fmt: skip

    for n in (1, 2):
        with connect("local", n_workers=n, verbose=False) as client:
            run(client, f"{n} local worker(s)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--dashboard-address", ":0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]  # fmt: skip
    try:
        for _ in range(2):
            procs.append(subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1",
                                           "--nworkers", "1", "--host", "127.0.0.1", "--no-dashboard"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            run(client, "dask scheduler + 2 dask worker processes")
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loci", type=int, default=180_000, help="loci of the synthetic store (0: skip the reductions)")
    parser.add_argument("--members", type=int, default=5)
    parser.add_argument("--length", type=int, default=200)
    parser.add_argument("--chunk-loci", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="1GiB")
    parser.add_argument("--predict-loci", type=int, default=8192,
                        help="loci of the predict scaling rows (0: skip them); enough that the 16 chunks outweigh "
                             "each worker's start-up (loading and checking the ensemble, about 1 s)")  # fmt: skip
    parser.add_argument("--keep", help="folder for the synthetic store (default: a temporary one, removed)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench-scale-"))
    tmp.mkdir(parents=True, exist_ok=True)
    path = str(tmp / "scale.zarr")
    print(f"CPU: {cpu_model()}; {os.cpu_count()} logical CPUs; {args.workers} workers x 1 thread, "
          f"memory limit {args.memory_limit} each")  # fmt: skip
    try:
        if args.loci:
            reduce(path, args)
        if args.predict_loci:
            scaling = predict_scaling(args.predict_loci, tmp)
            one, two = (scaling[f"predict, {n} local worker(s)"] for n in (1, 2))
            print(f"predict of {args.predict_loci} loci: 2 workers {one / two:.2f}x faster than 1")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


def reduce(path: str, args: argparse.Namespace) -> None:
    """Build the synthetic store at ``path`` and print the reductions' table."""
    shutil.rmtree(path, ignore_errors=True)
    tick = time.perf_counter()
    nbytes = build_store(path, args.loci, args.members, args.length, args.chunk_loci)
    print(f"store: {args.loci:,} loci x {args.members} members x {args.length} bp x {len(TASKS)} tasks; "
          f"mut_pred {nbytes / 2**30:.2f} GiB float32 (built in {time.perf_counter() - tick:.0f} s)")  # fmt: skip
    results, peaks = reductions(path, args.workers, args.memory_limit)
    read = results["read pass"]
    print("\n| step | wall (s) | x read pass |\n|---|---|---|")
    for label, seconds in results.items():
        print(f"| {label} | {seconds:.1f} | {seconds / read:.2f} |")
    total = results["effects"] + results["mr (12 pairs x 2 methods)"] + results["meta"]
    print(f"| effects + mr + meta | {total:.1f} | {total / read:.2f} |")
    print(f"peak worker RSS (VmHWM): {', '.join(f'{p / 2**20:.0f} MiB' for p in peaks)} (limit {args.memory_limit})")


if __name__ == "__main__":
    main()
