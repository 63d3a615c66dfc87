"""True causal effects, checked against a computation written out by hand."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import xarray as xr

from deepmr_dist.simulation.generator import SimulationConfig, select_split, simulate_round
from deepmr_dist.simulation.motifs import MotifSet
from deepmr_dist.simulation.truth import exposure_mutants, true_causal_effects

CONFIG = SimulationConfig(n_train=0, n_test=60)


@pytest.fixture(scope="module")
def motifs() -> MotifSet:
    return MotifSet.default()


@pytest.fixture(scope="module")
def round_both(motifs) -> xr.Dataset:
    return simulate_round(4, 1, seed=21, motifs=motifs, config=CONFIG)


def _soft_or(sequence: list[int], matrix: np.ndarray, background: list[float], p: float) -> float:
    m = len(matrix)
    unbound = 1.0
    for i in range(len(sequence) - m + 1):
        energy = sum(-math.log((matrix[j][sequence[i + j]] * (1 - p) + p / 4) / background[sequence[i + j]])
                     for j in range(m))
        unbound *= 1.0 - 1.0 / (1.0 + math.exp(energy))
    return 1.0 - unbound


def _hand_true_ce(sequence: list[int], start: int, motifs: MotifSet, alpha: float, gamma: float) -> float:
    """Every substitution of the exposure instance; no confounders; Anscombe; no-intercept slope."""
    background, p = [0.27, 0.23, 0.23, 0.27], 1e-5

    def transformed(s: list[int]) -> tuple[float, float]:
        q_exp = _soft_or(s, motifs.exposure.probabilities, background, p)
        q_out = _soft_or(s, motifs.outcome.probabilities, background, p)
        return 2 * math.sqrt(1 + alpha * q_exp + 3 / 8), 2 * math.sqrt(1 + alpha * gamma * q_exp * q_out + 3 / 8)

    ref_x, ref_y = transformed(sequence)
    sxy = sxx = 0.0
    for position in range(start, start + motifs.exposure.length):
        for base in range(4):
            if base == sequence[position]:
                continue
            mutant = list(sequence)
            mutant[position] = base
            x, y = transformed(mutant)
            sxy += (x - ref_x) * (y - ref_y)
            sxx += (x - ref_x) ** 2
    return sxy / sxx


def test_truth__equals_the_hand_computation_locus_by_locus(motifs, round_both):
    truth = true_causal_effects(round_both)
    test = select_split(round_both, "test")
    with_exposure = test["locus"].values[test["motif_start"].sel(motif="exposure").values >= 0]
    assert sorted(truth["locus"].values) == sorted(with_exposure)
    hand = {}
    for locus in with_exposure[::-1]:  # reversed: results are matched by id, not by row order
        row = test.sel(locus=locus)
        hand[locus] = _hand_true_ce(row["sequence"].values.tolist(), int(row["motif_start"].sel(motif="exposure")),
                                    motifs, round_both.attrs["alpha"], round_both.attrs["gamma"])
    well_conditioned = truth["exposure_ss"].values > 1e-6
    assert well_conditioned.sum() >= 0.9 * len(hand)
    for locus, ok in zip(truth["locus"].values, well_conditioned):
        if ok:
            assert truth["true_ce"].sel(locus=locus) == pytest.approx(hand[locus], rel=1e-6, abs=1e-9)
    functional = truth["functional"].values
    assert functional.sum() >= 0.9 * len(hand)
    assert float(truth["global_true_ce"]) == pytest.approx(np.mean(truth["true_ce"].values[functional]))


def test_truth__global_ce_ignores_non_binding_instances_and_matches_the_pooled_ratio(motifs):
    """Weak instances (sum dx^2 << median) would swamp a plain mean; over functional loci it equals sum(sxy)/sum(sxx)."""
    config = replace(CONFIG, n_test=1000, gamma_means=(10.0,), gamma_sd=0.01)
    truth = true_causal_effects(simulate_round(1, 0, seed=3, motifs=motifs, config=config))
    ss, ce, functional = truth["exposure_ss"].values, truth["true_ce"].values, truth["functional"].values
    assert 0 < (~functional).sum() < 0.1 * functional.size
    for cut in (0.1, 1.0, 40.0):  # the exact threshold hardly matters: few loci lie between
        assert np.mean(ce[ss >= cut]) == pytest.approx(float(truth["global_true_ce"]), rel=0.01)
    pooled = np.sum(ss * ce) / np.sum(ss)
    assert float(truth["global_true_ce"]) == pytest.approx(pooled, rel=0.01)
    assert abs(np.mean(ce) - pooled) > 0.5  # the plain mean would not


def test_truth__does_not_depend_on_confounding_strength(motifs):
    strong = simulate_round(4, 0, seed=3, motifs=motifs, config=replace(CONFIG, eta=200.0, nu=0.0, tau=90.0))
    normal = simulate_round(4, 0, seed=3, motifs=motifs, config=CONFIG)
    xr.testing.assert_identical(true_causal_effects(strong), true_causal_effects(normal))


def test_truth__is_zero_without_a_causal_effect(motifs):
    null = replace(CONFIG, gamma_means=(0.0,), gamma_sd=0.0)
    truth = true_causal_effects(simulate_round(1, 0, seed=3, motifs=motifs, config=null))
    assert truth.sizes["locus"] > 10
    np.testing.assert_array_equal(truth["true_ce"].values, 0.0)


def test_truth__pair_loci_carry_the_effect_and_lone_exposure_loci_almost_none(round_both):
    truth = true_causal_effects(round_both)
    case = round_both["case"].sel(locus=truth["locus"]).values
    ce = truth["true_ce"].values
    assert round_both.attrs["gamma"] > 0.5  # precondition of this seed and round
    assert np.median(ce[case == 3]) > 10 * np.median(np.abs(ce[case == 1]))


def test_truth__mutants_cover_every_alternative_at_every_instance_position():
    codes = np.array([[0, 1, 2, 3, 0, 1]], dtype=np.int8)
    mutants = exposure_mutants(codes, np.array([2]), 3)
    assert mutants.shape == (1, 3, 3, 6)
    for offset in range(3):
        position = 2 + offset
        alternatives = set(mutants[0, offset, :, position].tolist())
        assert alternatives == {0, 1, 2, 3} - {int(codes[0, position])}
        other = np.delete(mutants[0, offset], position, axis=1)
        assert np.all(other == np.delete(codes[0], position))


def test_truth_of_loci__a_locus_without_an_instance_keeps_the_registrys_dtypes(round_both):
    from deepmr_dist import schema
    from deepmr_dist.simulation.truth import true_causal_effects_of

    truth = true_causal_effects(round_both)
    loci = ["no-instance", *truth["locus"].values[::-1]]
    of = true_causal_effects_of(round_both, np.array(loci))
    assert of["locus"].values.tolist() == loci
    for var in schema.variables_of(schema.TRUTH):
        assert of[var.name].dtype == np.dtype(var.dtype), var.name
    first = of.isel(locus=0)
    assert np.isnan(first["true_ce"]) and np.isnan(first["exposure_ss"])
    assert int(first["n_mutations"]) == 0 and not bool(first["functional"])
    xr.testing.assert_identical(of.isel(locus=slice(1, None)), truth.isel(locus=slice(None, None, -1)))
