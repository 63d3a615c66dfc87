"""Energies and soft-OR binding probabilities of the simulation, against explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.binding import BACKGROUND, MotifModel, binding_probability, window_energies
from deepmr_dist.simulation.generator import SimulationConfig, dataset_motif_models, simulate_round
from deepmr_dist.simulation.motifs import PSEUDOCOUNT, Motif, MotifSet


def _loop_binding(sequence: list[int], probabilities: np.ndarray, background: list[float], p: float) -> float:
    """q = 1 - prod_i (1 - p_i) written out one window and one base at a time."""
    m = len(probabilities)
    unbound = 1.0
    for i in range(len(sequence) - m + 1):
        energy = 0.0
        for j in range(m):
            base = sequence[i + j]
            smoothed = probabilities[j][base] * (1 - p) + p / 4
            energy += -math.log(smoothed / background[base])
        unbound *= 1.0 - 1.0 / (1.0 + math.exp(energy))
    return 1.0 - unbound


def test_binding__background_is_acgt_order():
    assert BACKGROUND.tolist() == [0.27, 0.23, 0.23, 0.27]


def test_binding__matches_explicit_loop():
    rng = np.random.default_rng(0)
    motif = Motif("m", "m", rng.dirichlet(np.full(4, 0.3), size=6))
    model = MotifModel.from_motif(motif)
    codes = rng.integers(0, 4, size=(5, 30))
    codes[0, 3:9] = motif.probabilities.argmax(axis=1)  # one strong site
    q = binding_probability(codes, model.energy)
    expected = [_loop_binding(row.tolist(), motif.probabilities, BACKGROUND.tolist(), PSEUDOCOUNT) for row in codes]
    np.testing.assert_allclose(q, expected, rtol=1e-9, atol=1e-12)
    assert q[0] > 0.99


def test_binding__pseudocount_is_the_same_for_sampling_and_energy():
    motif = Motif("m", "m", np.array([[1.0, 0, 0, 0], [0, 0.5, 0.5, 0]]))
    model = MotifModel.from_motif(motif, pseudocount=0.2)
    # energies are -log(P'/b) of exactly the matrix instances are sampled from
    np.testing.assert_allclose(np.exp(-model.energy) * BACKGROUND, model.probabilities)
    np.testing.assert_allclose(model.probabilities[0], [0.85, 0.05, 0.05, 0.05])


def test_binding__generator_samples_from_the_smoothed_matrix_it_scores_with():
    one_base = Motif("a_only", "a", np.tile([1.0, 0, 0, 0], (8, 1)))
    motifs = MotifSet(exposure=one_base, outcome=one_base, confounder=one_base)
    config = SimulationConfig(length=40, n_train=4000, n_test=0, pseudocount=0.4)
    ds = simulate_round(1, 0, seed=7, motifs=motifs, config=config)
    start = ds["motif_start"].sel(motif="exposure").values
    rows = np.flatnonzero(start >= 0)
    instances = ds["sequence"].values[rows[:, None], start[rows, None] + np.arange(8)]
    frequencies = np.bincount(instances.ravel(), minlength=4) / instances.size
    smoothed = 1.0 * (1 - 0.4) + 0.4 / 4
    np.testing.assert_allclose(frequencies, [smoothed, 0.1, 0.1, 0.1], atol=0.01)
    models = dataset_motif_models(ds)
    np.testing.assert_allclose(models["exposure"].probabilities[0], [smoothed, 0.1, 0.1, 0.1])
    np.testing.assert_allclose(models["exposure"].energy[0], -np.log(np.array([smoothed, 0.1, 0.1, 0.1]) / BACKGROUND))


def test_binding__strong_sites_stay_finite_and_bounded():
    energy = np.full((10, 4), -20.0)  # every window binds: p_i = 1 - 1e-87
    q = binding_probability(np.zeros((3, 50), dtype=np.int8), energy)
    assert np.all(q == 1.0)
    q = binding_probability(np.zeros((3, 50), dtype=np.int8), -energy)
    assert np.all((q > 0) & (q < 1e-80))


def test_binding__motif_longer_than_sequence_raises():
    with pytest.raises(InputError, match="shorter than the motif"):
        window_energies(np.zeros((1, 5), dtype=np.int8), np.zeros((6, 4)))
