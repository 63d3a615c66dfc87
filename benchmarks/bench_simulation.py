"""Benchmark of the paper's simulation: generator throughput, training time and fit, Dask speed-up.

Prints
1. generator throughput (sequences/s for one round of 100,000 sequences,
   scenario "both") and, as the named peer, the same binding computation
   done one sequence at a time (the original code's structure);
2. per scenario, one member trained on round 0 (seed 0) of 10,000 sequences
   with the default settings (:class:`TrainingSettings()`: standardised
   targets, batch 200, one-cycle learning rate peaking at 0.05, 30 epochs,
   patience 10), and on scenario "unconfounded" also with the paper's settings
   (:meth:`TrainingSettings.paper`: batch 1000, constant Adam 1e-3, up to 100
   epochs): wall time, epochs run, best epoch and the per-task validation MSE
   (Anscombe units) beside its floors on the same validation loci (noise: the
   labels against the Anscombe transform of their noise-free expected counts;
   with z: against the best prediction that cannot see the random confounder
   z, ``(1 - p) A(c0) + p A(c0 + tau)``);
3. the time to train 2 members (default settings, every epoch run) on a
   LocalCluster of 1 worker vs 2 workers (1 thread each), and the speed-up.

Run: ``python benchmarks/bench_simulation.py [--scenarios unconfounded,both] [--no-paper]``.
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
    config = SimulationConfig(n_train=n_sequences, n_test=0, n_calibration=0)
    seconds = _best_of(3, lambda: simulate_round("both", 0, seed=0, motifs=motifs, config=config))
    print(f"generator: {n_sequences} sequences in {seconds:.2f} s = {n_sequences / seconds:,.0f} sequences/s")

    codes = np.random.default_rng(0).integers(0, 4, size=(n_peer, config.length)).astype(np.int8)
    energies = [MotifModel.from_motif(motifs[role]).energy for role in ("exposure", "outcome", "confounder")]
    batched = _best_of(3, lambda: [binding_probability(codes, e) for e in energies])
    looped = _best_of(1, lambda: [[binding_probability(row[None], e) for row in codes] for e in energies])
    print(f"binding of {n_peer} sequences x 3 motifs: batched {n_peer / batched:,.0f} seq/s, "
          f"per-sequence loop (peer) {n_peer / looped:,.0f} seq/s, ratio {looped / batched:.0f}x")


def validation_floors(ds, val_index: np.ndarray) -> dict[str, np.ndarray]:
    """Per-task MSE floors on a round's validation loci, in Anscombe units.

    ``noise``: labels against ``A(expected count)``, the Poisson noise alone.
    ``noise + unseen z`` (scenarios with the random confounder z only): labels
    against ``(1 - p) A(c0) + p A(c0 + tau)``, ``c0`` the expected count with
    ``z = 0`` and ``p = P(z = 1)``, the best a model that cannot see z can do.
    """
    from deepmr_dist.simulation.counts import anscombe

    label = ds["label"].values[val_index]
    expected = ds["expected_count"].values[val_index]
    floors = {"noise": ((label - anscombe(expected)) ** 2).mean(axis=0)}
    if ds.attrs["scenario"] in (2, 4):
        tau, p = ds.attrs["tau"], ds.attrs["z_probability"]
        base = expected - tau * ds["z"].values[val_index, None]
        blind = (1 - p) * anscombe(base) + p * anscombe(base + tau)
        floors["noise + unseen z"] = ((label - blind) ** 2).mean(axis=0)
    return floors


def bench_member(scenario: str, n_sequences: int, threads: int, paper: bool) -> None:
    from deepmr_dist.simulation.generator import SimulationConfig, one_hot, select_split, simulate_round
    from deepmr_dist.simulation.training import TrainingSettings, train_member, validation_split

    config = SimulationConfig(n_train=n_sequences, n_test=0, n_calibration=0)
    ds = select_split(simulate_round(scenario, 0, seed=0, config=config), "train")
    x, y = one_hot(ds["sequence"].values), ds["label"].values
    settings = TrainingSettings.paper() if paper else TrainingSettings()
    start = time.perf_counter()
    _, history = train_member(x, y, seed=0, settings=settings, threads=threads)
    seconds = time.perf_counter() - start
    epochs = len(history.val_loss)
    val_index, _ = validation_split(len(x), 0, settings.validation_fraction)
    floors = validation_floors(ds, val_index)
    mse = np.array(history.best_val_mse)
    print(f"{scenario}, {'paper' if paper else 'default'} settings ({n_sequences} sequences, {threads} thread): "
          f"{seconds:.1f} s, {epochs} epochs ({seconds / epochs:.2f} s/epoch), best epoch {history.best_epoch}")
    print(f"  validation MSE (exposure, outcome): {_pair(mse)}; label variance {_pair(y[val_index].var(axis=0))}")
    for name, floor in floors.items():
        print(f"  floor, {name}: {_pair(floor)}; MSE / floor {_pair(mse / floor)}")


def _pair(values: np.ndarray) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def bench_speedup(n_sequences: int) -> None:
    import dask
    from distributed import Client, LocalCluster

    from deepmr_dist.simulation.generator import SimulationConfig, one_hot, select_split, simulate_round
    from deepmr_dist.simulation.training import TrainingSettings, train_ensemble

    config = SimulationConfig(n_train=n_sequences, n_test=0, n_calibration=0)
    ds = select_split(simulate_round("unconfounded", 0, seed=0, config=config), "train")
    x, y = one_hot(ds["sequence"].values), ds["label"].values
    settings = TrainingSettings(patience=TrainingSettings().epochs)  # every member runs every epoch: equal work
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
        print(f"2 members x {settings.epochs} epochs on {n_workers} worker(s): {seconds[n_workers]:.1f} s")
    print(f"speed-up of 2 workers over 1 worker: {seconds[1] / seconds[2]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=100_000, help="sequences for the generator benchmark")
    parser.add_argument("--peer-sequences", type=int, default=2_000, help="sequences for the per-sequence peer")
    parser.add_argument("--train-sequences", type=int, default=10_000, help="training set size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per member")
    parser.add_argument("--scenarios", default="unconfounded,random,sequence,both",
                        help="comma-separated scenarios to train one member on")
    parser.add_argument("--no-paper", action="store_true", help="skip the member with the paper's settings")
    args = parser.parse_args()
    bench_generator(args.sequences, args.peer_sequences)
    for scenario in args.scenarios.split(","):
        bench_member(scenario, args.train_sequences, args.threads, paper=False)
    if not args.no_paper:
        bench_member("unconfounded", args.train_sequences, args.threads, paper=True)
    bench_speedup(args.train_sequences)


if __name__ == "__main__":
    main()
