"""Simulated rounds: embedding frequencies, placement, background, counts, reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import xarray as xr

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.binding import MotifModel, binding_probability
from deepmr_dist.simulation.generator import (
    CASES,
    SimulationConfig,
    draw_round_parameters,
    one_hot,
    parse_scenario,
    round_streams,
    select_split,
    simulate_round,
)
from deepmr_dist.simulation.motifs import MotifSet

N = 12_000


@pytest.fixture(scope="module")
def motifs() -> MotifSet:
    return MotifSet.default()


@pytest.fixture(scope="module")
def both(motifs) -> xr.Dataset:
    """A large training set of the scenario with both kinds of confounding."""
    return simulate_round("both", 0, seed=11, motifs=motifs, config=SimulationConfig(n_train=N, n_test=0, n_calibration=0))


def _within_binomial(count: int, n: int, p: float, sds: float = 4.5) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_generator__each_embedding_case_has_probability_one_quarter(both):
    counts = np.bincount(both["case"].values, minlength=4)
    assert all(_within_binomial(c, N, 0.25) for c in counts), counts


def test_generator__confounder_motif_and_z_only_in_their_scenarios(motifs, both):
    assert _within_binomial(int((both["motif_start"].sel(motif="confounder") >= 0).sum()), N, 0.5)
    assert _within_binomial(int(both["z"].sum()), N, 0.5)
    config = SimulationConfig(n_train=2000, n_test=0)
    plain = simulate_round("unconfounded", 0, seed=1, motifs=motifs, config=config)
    assert not (plain["motif_start"].sel(motif="confounder") >= 0).any()
    assert not plain["z"].any() and not plain["binding"].sel(motif="confounder").any()
    sequence = simulate_round("sequence", 0, seed=1, motifs=motifs, config=config)
    assert not sequence["z"].any() and (sequence["motif_start"].sel(motif="confounder") >= 0).any()
    random = simulate_round("random", 0, seed=1, motifs=motifs, config=config)
    assert random["z"].any() and not (random["motif_start"].sel(motif="confounder") >= 0).any()


def test_generator__instances_match_the_case_and_never_overlap(both):
    start = both["motif_start"].values.astype(int)
    lengths = both["motif_length"].values
    case = both["case"].values
    assert np.array_equal(start[:, 0] >= 0, np.isin(case, [1, 3]))
    assert np.array_equal(start[:, 1] >= 0, np.isin(case, [2, 3]))
    covered = np.zeros((N, 100), dtype=int)
    for column in range(3):
        for row in np.flatnonzero(start[:, column] >= 0):
            covered[row, start[row, column] : start[row, column] + lengths[column]] += 1
            assert start[row, column] + lengths[column] <= 100
    assert covered.max() == 1


def test_generator__pair_gap_lies_in_its_range(both):
    pair = both["case"].values == 3
    start = both["motif_start"].values[pair].astype(int)
    gap = start[:, 1] - (start[:, 0] + int(both["motif_length"].sel(motif="exposure")))
    lengths = both["motif_length"].values
    assert (both.attrs["gap_min"], both.attrs["gap_max"]) == (lengths.max(), 100 - lengths.sum())
    assert gap.min() >= both.attrs["gap_min"] and gap.max() <= both.attrs["gap_max"]
    assert gap.max() - gap.min() > 0.8 * (both.attrs["gap_max"] - both.attrs["gap_min"])


def test_generator__background_bases_are_a_c_g_t_in_that_order(both):
    covered = np.zeros((N, 100), dtype=bool)
    start = both["motif_start"].values.astype(int)
    positions = np.arange(100)
    for column, length in enumerate(both["motif_length"].values):
        s = start[:, column][:, None]
        covered |= (s >= 0) & (positions >= s) & (positions < s + length)
    background = both["sequence"].values[~covered]
    frequencies = np.bincount(background, minlength=4) / background.size
    np.testing.assert_allclose(frequencies, [0.27, 0.23, 0.23, 0.27], atol=0.003)


def test_generator__binding_is_near_one_with_motif_and_background_level_without(motifs, both):
    q = both["binding"].sel(motif="exposure").values
    case = both["case"].values
    assert q[np.isin(case, [1, 3])].mean() > 0.99
    rng = np.random.default_rng(0)
    pure = rng.choice(4, size=(20_000, 100), p=[0.27, 0.23, 0.23, 0.27])
    background_level = binding_probability(pure, MotifModel.from_motif(motifs.exposure).energy).mean()
    without = q[np.isin(case, [0, 2])]
    assert background_level < 0.2
    assert abs(without.mean() - background_level) < 4 * without.std() / math.sqrt(without.size) + 0.01


def test_generator__expected_counts_and_labels_follow_the_papers_formulas(both):
    q = both["binding"].values
    z = both["z"].values
    a = both.attrs
    exposure = 1 + a["alpha"] * q[:, 0] + 20 * q[:, 2] + 25 * z
    outcome = 1 + a["alpha"] * a["gamma"] * q[:, 0] * q[:, 1] + 30 * q[:, 2] + 25 * z
    np.testing.assert_allclose(both["expected_count"].values, np.stack([exposure, outcome], axis=1), rtol=1e-12)
    np.testing.assert_allclose(both["label"].values, 2 * np.sqrt(both["count"].values + 3 / 8))
    residual = (both["count"] - both["expected_count"]) / np.sqrt(both["expected_count"])
    assert abs(float(residual.mean())) < 0.03 and abs(float(residual.std()) - 1) < 0.03


def test_generator__round_parameters_follow_the_papers_text():
    rng = np.random.default_rng(3)
    draws = [draw_round_parameters(rng, SimulationConfig()) for _ in range(4000)]
    alpha = np.array([d.alpha for d in draws])
    means = np.array([d.gamma_mean for d in draws])
    gamma = np.array([d.gamma for d in draws])
    assert abs(alpha.mean() - 100) < 0.3 and abs(alpha.std() - 3) < 0.2
    assert set(means) == {1.0, 10.0} and _within_binomial(int((means == 10).sum()), 4000, 0.5)
    high = gamma[means == 10]
    assert abs(high.std() - math.sqrt(0.5)) < 0.05
    assert gamma.min() >= 0


def test_generator__a_round_regenerates_alone_from_seed_and_index(motifs):
    config = SimulationConfig(n_train=300, n_test=100, augment_fraction=0.25)
    third = simulate_round(4, 3, seed=5, motifs=motifs, config=config)
    simulate_round(4, 0, seed=5, motifs=motifs, config=config)  # other rounds leave no state behind
    xr.testing.assert_identical(third, simulate_round(4, 3, seed=5, motifs=motifs, config=config))


def test_generator__rounds_are_independent(motifs):
    config = SimulationConfig(n_train=2000, n_test=0, n_calibration=0)
    first = simulate_round(2, 0, seed=5, motifs=motifs, config=config)
    second = simulate_round(2, 1, seed=5, motifs=motifs, config=config)
    assert first.attrs["alpha"] != second.attrs["alpha"]
    assert np.mean(first["sequence"].values == second["sequence"].values) < 0.3  # chance agreement is ~0.25
    for variable in ("z", "case"):
        r = np.corrcoef(first[variable].values, second[variable].values)[0, 1]
        assert abs(r) < 4 / math.sqrt(2000)


def test_generator__test_set_does_not_depend_on_training_size(motifs):
    small = simulate_round(1, 2, seed=9, motifs=motifs, config=SimulationConfig(n_train=100, n_test=50))
    large = simulate_round(1, 2, seed=9, motifs=motifs, config=SimulationConfig(n_train=400, n_test=50))
    np.testing.assert_array_equal(select_split(small, "test")["sequence"], select_split(large, "test")["sequence"])


def test_generator__round_streams_are_the_seed_sequence_children_in_order():
    streams = round_streams(17, 4)
    assert list(streams) == ["parameters", "train", "test", "variants", "calibration"]
    # the first four are exactly the streams of a four-way spawn (the generator before the calibration split)
    children = np.random.SeedSequence([17, 4]).spawn(4)
    for name, child in zip(["parameters", "train", "test", "variants"], children):
        np.testing.assert_array_equal(streams[name].random(5), np.random.default_rng(child).random(5))
    fifth = np.random.SeedSequence([17, 4]).spawn(5)[4]
    np.testing.assert_array_equal(streams["calibration"].random(5), np.random.default_rng(fifth).random(5))


def test_generator__calibration_split_leaves_the_other_splits_unchanged(motifs):
    base = {"n_train": 300, "n_test": 80, "augment_fraction": 0.25}
    without = simulate_round(4, 2, seed=6, motifs=motifs, config=SimulationConfig(**base, n_calibration=0))
    with_calibration = simulate_round(4, 2, seed=6, motifs=motifs, config=SimulationConfig(**base, n_calibration=250))
    assert list(dict.fromkeys(with_calibration["split"].values)) == ["train", "variant", "calibration", "test"]
    others = select_split(with_calibration, "train", "variant", "test")
    xr.testing.assert_identical(others.drop_attrs(), without.drop_attrs())
    assert {k: v for k, v in with_calibration.attrs.items() if k != "n_calibration"} == {
        k: v for k, v in without.attrs.items() if k != "n_calibration"}
    calibration = select_split(with_calibration, "calibration")
    assert calibration.sizes["locus"] == 250 and with_calibration.attrs["n_calibration"] == 250
    assert str(calibration["locus"].values[0]) == "r002-calibration-000000"
    assert (calibration["parent"] == "").all() and np.isfinite(calibration["label"]).all()
    # its own stream: not a copy of the test or training sequences
    test = select_split(with_calibration, "test")["sequence"].values
    assert np.mean(calibration["sequence"].values[:80] == test) < 0.4
    assert SimulationConfig().n_calibration == 1000


def test_generator__variant_copies_mutate_only_their_own_instances(motifs):
    config = SimulationConfig(n_train=2000, n_test=10, augment_fraction=0.25)
    ds = simulate_round(3, 0, seed=2, motifs=motifs, config=config)
    variants = select_split(ds, "variant")
    assert variants.sizes["locus"] == 500 and select_split(ds, "train").sizes["locus"] == 2000
    parents = ds.sel(locus=variants["parent"].values)
    np.testing.assert_array_equal(variants["motif_start"], parents["motif_start"])
    lengths = ds["motif_length"].values
    differs = variants["sequence"].values != parents["sequence"].values
    starts = parents["motif_start"].values.astype(int)
    for row in range(variants.sizes["locus"]):
        changed = set(np.flatnonzero(differs[row]))
        instances = [range(s, s + lengths[c]) for c, s in enumerate(starts[row]) if s >= 0]
        if instances:
            assert len(changed) == len(instances)
            assert all(len(changed.intersection(instance)) == 1 for instance in instances)
        else:
            assert len(changed) == 1
    np.testing.assert_array_equal(variants["z"], parents["z"])


def test_generator__one_hot_is_acgt_channels():
    codes = np.array([[0, 1, 2, 3, 0]], dtype=np.int8)
    x = one_hot(codes)
    assert x.shape == (1, 4, 5) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0].argmax(axis=0), codes[0])
    assert x.sum() == 5


def test_generator__locus_ids_are_unique_and_name_the_round(both):
    assert len(set(both["locus"].values)) == N
    assert str(both["locus"].values[0]) == "r000-train-000000"


def test_generator__bad_inputs_raise():
    with pytest.raises(InputError, match="unknown scenario"):
        parse_scenario("confounded")
    assert parse_scenario(4) == parse_scenario("both") == 4
    with pytest.raises(InputError, match="too short"):
        simulate_round(1, 0, seed=0, config=SimulationConfig(length=30, n_train=1, n_test=0))
    with pytest.raises(InputError, match="background"):
        SimulationConfig(background=(0.25, 0.25, 0.25, 0.3))
    with pytest.raises(InputError, match="n_calibration"):
        SimulationConfig(n_calibration=-1)
    with pytest.raises(InputError, match="unknown split"):
        select_split(simulate_round(1, 0, seed=0, config=SimulationConfig(n_train=2, n_test=2, n_calibration=2)),
                     "holdout")
    assert CASES == ("none", "exposure", "outcome", "pair")
