"""Benchmark of the paper's simulation: generator throughput, training time, Dask speed-up.

Prints
1. generator throughput (sequences/s for one round of 100,000 sequences,
   scenario "both") and, as the named peer, the same binding computation
   done one sequence at a time (the original code's structure);
2. the wall time of training one member on 10,000 sequences with the paper's
   settings (batch 1000, Adam 1e-3, up to 100 epochs, patience 10);
3. the time to train 2 members on a LocalCluster of 1 worker vs 2 workers
   (1 thread each), and the speed-up.

Run: ``python benchmarks/bench_simulation.py [--sequences N] [--speedup-epochs E]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_generator(n_sequences: int, n_peer: int) -> None:
    from deepmr_dist.simulation.binding import MotifModel, binding_probability
    from deepmr_dist.simulation.generator import SimulationConfig, simulate_round
    from deepmr_dist.simulation.motifs import MotifSet

    motifs = MotifSet.default()
    config = SimulationConfig(n_train=n_sequences, n_test=0)
    seconds = _best_of(3, lambda: simulate_round("both", 0, seed=0, motifs=motifs, config=config))
    print(f"generator: {n_sequences} sequences in {seconds:.2f} s = {n_sequences / seconds:,.0f} sequences/s")

    codes = np.random.default_rng(0).integers(0, 4, size=(n_peer, config.length)).astype(np.int8)
    energies = [MotifModel.from_motif(motifs[role]).energy for role in ("exposure", "outcome", "confounder")]
    batched = _best_of(3, lambda: [binding_probability(codes, e) for e in energies])
    looped = _best_of(1, lambda: [[binding_probability(row[None], e) for row in codes] for e in energies])
    print(f"binding of {n_peer} sequences x 3 motifs: batched {n_peer / batched:,.0f} seq/s, "
          f"per-sequence loop (peer) {n_peer / looped:,.0f} seq/s, ratio {looped / batched:.0f}x")


def bench_member(n_sequences: int, threads: int) -> None:
    from deepmr_dist.simulation.generator import SimulationConfig, one_hot, simulate_round
    from deepmr_dist.simulation.training import train_member

    ds = simulate_round("unconfounded", 0, seed=0, config=SimulationConfig(n_train=n_sequences, n_test=0))
    x, y = one_hot(ds["sequence"].values), ds["label"].values
    start = time.perf_counter()
    _, history = train_member(x, y, seed=0, threads=threads)
    seconds = time.perf_counter() - start
    epochs = len(history.val_loss)
    print(f"training one member ({n_sequences} sequences, paper settings, {threads} thread): {seconds:.1f} s, "
          f"{epochs} epochs ({seconds / epochs:.2f} s/epoch), best epoch {history.best_epoch}, "
          f"best val MSE {history.best_val_loss:.2f} (label variance {y.var(axis=0).round(1).tolist()})")


def bench_speedup(n_sequences: int, epochs: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    from deepmr_dist.simulation.generator import SimulationConfig, one_hot, simulate_round
    from deepmr_dist.simulation.training import TrainingSettings, train_ensemble

    ds = simulate_round("unconfounded", 0, seed=0, config=SimulationConfig(n_train=n_sequences, n_test=0))
    x, y = one_hot(ds["sequence"].values), ds["label"].values
    settings = TrainingSettings(epochs=epochs, patience=epochs)  # every member runs every epoch: equal work
    seconds = {}
    for n_workers in (1, 2):
        # Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536, which fixes glibc's mmap threshold and about
        # doubles torch CPU training time; unset it (None) so workers run as fast as a plain process.
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")
        with cluster, Client(cluster) as client, tempfile.TemporaryDirectory() as out_dir:
            # warm-up: imports and first torch calls on every worker stay out of the timing
            train_ensemble(x[:200], y[:200], n_members=n_workers, client=client, out_dir=out_dir,
                           settings=TrainingSettings(epochs=1))
            start = time.perf_counter()
            train_ensemble(x, y, n_members=2, seeds=[0, 1], client=client, out_dir=out_dir, settings=settings)
            seconds[n_workers] = time.perf_counter() - start
        print(f"2 members x {epochs} epochs on {n_workers} worker(s): {seconds[n_workers]:.1f} s")
    print(f"speed-up of 2 workers over 1 worker: {seconds[1] / seconds[2]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=100_000, help="sequences for the generator benchmark")
    parser.add_argument("--peer-sequences", type=int, default=2_000, help="sequences for the per-sequence peer")
    parser.add_argument("--train-sequences", type=int, default=10_000, help="training set size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per member")
    parser.add_argument("--speedup-epochs", type=int, default=20, help="epochs per member in the speed-up run")
    args = parser.parse_args()
    bench_generator(args.sequences, args.peer_sequences)
    bench_member(args.train_sequences, args.threads)
    bench_speedup(args.train_sequences, args.speedup_epochs)


if __name__ == "__main__":
    main()
