"""Isotonic recalibration of the ensemble SD: recovery of known mis-dispersion, the defining
coverage property, serialisation, errors, and its application to effect_se."""

from __future__ import annotations

import json

import dask.array as da
import numpy as np
import pytest
import xarray as xr
from scipy import stats

from deepmr_dist.stages.calibration import (
    Calibration,
    fit_calibration,
    poisson_anscombe_variance,
    read_calibration,
)
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.errors import InputError
from deepmr_dist.io import store

TASKS = ["exposure", "outcome"]
Z95 = stats.norm.ppf(0.975)


def _held_out(seed: int, n: int, k, *, noise_sd: float = 0.0, n_members: int = 5, log_sd: float = -1.0):
    """Held-out labels and member predictions whose SD understates the model error by ``k`` (per task).

    True values f; ensemble mean mu = f + k s e (e ~ N(0, 1)), the members spread around mu with SD
    exactly s (ddof 0); labels y = f + noise. The calibrated factor of task t is therefore k[t].
    """
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, 2))
    s = np.exp(rng.normal(log_sd, 0.3, size=(n, 2)))
    mu = f + np.asarray(k, dtype=float) * s * rng.normal(size=(n, 2))
    deviation = rng.normal(size=(n_members, n, 2))
    deviation = (deviation - deviation.mean(axis=0)) / deviation.std(axis=0)
    y = f + noise_sd * rng.normal(size=(n, 2))
    ids = [f"held-{i:05d}" for i in range(n)]
    labels = xr.DataArray(y, dims=("locus", "task"), coords={"locus": ids, "task": TASKS})
    predictions = xr.DataArray(mu + s * deviation, dims=("member", "locus", "task"), coords={"locus": ids, "task": TASKS})
    return labels, predictions


@pytest.fixture(scope="module")
def under_dispersed() -> tuple[xr.DataArray, xr.DataArray]:
    """Exposure's ensemble SD 3x too small, outcome's calibrated."""
    return _held_out(0, 4000, [3.0, 1.0])


def test_calibration__recovers_a_known_under_dispersion_and_leaves_a_calibrated_task_at_one(under_dispersed):
    calibration = fit_calibration(*under_dispersed, source="synthetic")
    assert calibration.tasks == tuple(TASKS)
    exposure, outcome = calibration.factor
    assert exposure == pytest.approx(3.0, rel=0.05)
    assert outcome == pytest.approx(1.0, rel=0.05)
    assert calibration.n_members == 5 and calibration.ddof == 0 and len(calibration.loci) == 4000


def test_calibration__recovers_over_dispersion():
    calibration = fit_calibration(*_held_out(1, 4000, [0.5, 0.25]))
    np.testing.assert_allclose(calibration.factor, [0.5, 0.25], rtol=0.05)


def test_calibration__without_noise_factor_is_z_of_the_level_observed_95_over_z95(under_dispersed):
    """Independent reference: the nominal level p* with 95% observed coverage has z(p*) = the 95% quantile of |r|."""
    labels, predictions = under_dispersed
    calibration = fit_calibration(labels, predictions)
    r = np.abs(labels - predictions.mean("member")) / predictions.std("member", ddof=0)
    for task, factor in zip(TASKS, calibration.factor):
        z_star = np.quantile(r.sel(task=task).values, 0.95, method="inverted_cdf")
        assert factor == pytest.approx(z_star / Z95, rel=1e-12)


def test_calibration__the_calibrated_interval_holds_its_level_and_curves_are_monotone(under_dispersed):
    labels, predictions = under_dispersed
    calibration = fit_calibration(labels, predictions)
    mu, s = predictions.mean("member"), predictions.std("member", ddof=0)
    for task, factor in zip(TASKS, calibration.factor):
        held = np.abs(labels - mu).sel(task=task) <= Z95 * factor * s.sel(task=task)
        assert float(held.mean()) == pytest.approx(0.95, abs=1 / 4000)
    levels = np.array(calibration.curve_levels)
    index = int(np.flatnonzero(np.isclose(levels, 0.95))[0])
    for before, after in zip(calibration.coverage_before, calibration.coverage_after):
        assert np.all(np.diff(before) >= 0) and np.all(np.diff(after) >= 0)
        assert after[index] == pytest.approx(0.95, abs=1e-9)
    exposure_before = np.array(calibration.coverage_before[0])
    assert exposure_before[index] < 0.6  # 3x too narrow: a stated 95% interval holds about 49%


def test_calibration__factor_increases_with_the_true_under_dispersion():
    factors = [fit_calibration(*_held_out(2, 2000, [k, k])).factor[0] for k in (0.5, 1.0, 2.0, 4.0)]
    assert np.all(np.diff(factors) > 0)
    np.testing.assert_allclose(factors, [0.5, 1.0, 2.0, 4.0], rtol=0.08)


def test_calibration__with_label_noise_only_the_epistemic_part_is_rescaled():
    labels, predictions = _held_out(3, 20_000, [2.0, 1.0], noise_sd=1.0, log_sd=np.log(0.4))
    calibration = fit_calibration(labels, predictions, noise_variance=1.0)
    np.testing.assert_allclose(calibration.factor, [2.0, 1.0], rtol=0.06)
    assert calibration.noise_variance == (1.0, 1.0)
    # the defining property: y ~ N(mu, k^2 s^2 + v) holds 95% of the labels
    mu, s2 = predictions.mean("member"), predictions.var("member", ddof=0)
    for task, factor in zip(TASKS, calibration.factor):
        width = Z95 * np.sqrt(factor**2 * s2.sel(task=task) + 1.0)
        assert float((np.abs(labels - mu).sel(task=task) <= width).mean()) == pytest.approx(0.95, abs=1e-4)
    # ignoring the label noise attributes it to the ensemble: a far larger factor
    assert fit_calibration(labels, predictions).factor[1] > 2.0


def test_calibration__noise_variance_as_mapping_and_per_locus_array_agree():
    labels, predictions = _held_out(4, 3000, [2.0, 2.0], noise_sd=0.5)
    scalar = fit_calibration(labels, predictions, noise_variance=0.25)
    mapping = fit_calibration(labels, predictions, noise_variance={"outcome": 0.25, "exposure": 0.25})
    per_locus = xr.full_like(labels, 0.25).isel(locus=slice(None, None, -1))  # other order: matched by id
    array = fit_calibration(labels, predictions, noise_variance=per_locus)
    assert scalar.factor == mapping.factor == array.factor


def test_calibration__predictions_are_matched_by_task_name_and_locus_id(under_dispersed):
    labels, predictions = under_dispersed
    reordered = predictions.isel(locus=np.random.default_rng(0).permutation(4000), task=[1, 0])
    reordered = reordered.transpose("locus", "task", "member")
    assert fit_calibration(labels, reordered).factor == fit_calibration(labels, predictions).factor


def test_poisson_anscombe_variance__monte_carlo_and_large_mean_limit():
    rng = np.random.default_rng(5)
    means = np.array([0.5, 1.0, 3.0, 20.0])
    simulated = [np.var(2 * np.sqrt(rng.poisson(m, 400_000) + 0.375)) for m in means]
    np.testing.assert_allclose(poisson_anscombe_variance(means), simulated, atol=0.006)
    assert poisson_anscombe_variance(np.array([0.0]))[0] == 0.0
    np.testing.assert_allclose(poisson_anscombe_variance(np.array([200.0, 5000.0])), [1.0, 1.0], atol=2e-6)
    counts = xr.DataArray([[1.0, 2.0]], dims=("locus", "task"), coords={"task": TASKS})
    assert poisson_anscombe_variance(counts).dims == ("locus", "task")
    with pytest.raises(InputError, match="Poisson means"):
        poisson_anscombe_variance(np.array([-1.0]))


def test_calibration__serialises_to_json_and_to_a_zarr_group(under_dispersed, tmp_path):
    calibration = fit_calibration(*under_dispersed, source="round 0, calibration split")
    assert Calibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration
    path = str(tmp_path / "run.zarr")
    store.write_group(path, calibration.to_dataset(), "calibration")
    assert read_calibration(path) == calibration
    stored = xr.open_zarr(path, group="calibration", consolidated=False)
    assert stored["factor"].dims == ("task",) and stored["coverage_before"].dims == ("task", "level")


# ----------------------------------------------------------------------------- errors


def test_calibration__bad_inputs_name_what_is_wrong(under_dispersed):
    labels, predictions = under_dispersed
    with pytest.raises(InputError, match="labels has 4000 loci but predictions has 3999"):
        fit_calibration(labels.drop_vars("locus"), predictions.isel(locus=slice(1, None)).drop_vars("locus"))
    with pytest.raises(InputError, match="predictions lack 1 of the labels' loci.*held-00000"):
        fit_calibration(labels, predictions.isel(locus=slice(1, None)))
    with pytest.raises(InputError, match="labels has no 'task' coordinate"):
        fit_calibration(labels.drop_vars("task"), predictions)
    with pytest.raises(InputError, match=r"predictions lack task\(s\) \['outcome'\]"):
        fit_calibration(labels, predictions.sel(task=["exposure"]))
    with pytest.raises(InputError, match="predictions has dims"):
        fit_calibration(labels, predictions.isel(member=0))
    with pytest.raises(InputError, match="must be an xarray.DataArray"):
        fit_calibration(labels.values, predictions)
    with_nan = labels.copy()
    with_nan[3, 1] = np.nan
    with pytest.raises(InputError, match="labels has 1 non-finite"):
        fit_calibration(with_nan, predictions)
    with pytest.raises(InputError, match="at least 200"):
        fit_calibration(labels.isel(locus=slice(150)), predictions)
    with pytest.raises(InputError, match=r"noise_variance has no value for task\(s\) \['outcome'\]"):
        fit_calibration(labels, predictions, noise_variance={"exposure": 1.0})
    with pytest.raises(InputError, match="noise_variance must be finite"):
        fit_calibration(labels, predictions, noise_variance=-1.0)
    with pytest.raises(InputError, match="1 member"):
        fit_calibration(labels, predictions.isel(member=[0]), ddof=1)


def test_calibration__identical_members_or_noise_alone_covering_are_refused(under_dispersed):
    labels, predictions = under_dispersed
    identical = predictions.copy(data=np.broadcast_to(predictions.values[:1], predictions.shape).copy())
    with pytest.raises(InputError, match="task 'exposure': the ensemble SD is 0 at 4000"):
        fit_calibration(labels, identical)
    with pytest.raises(InputError, match="label noise variance alone already covers"):
        fit_calibration(labels, predictions, noise_variance=100.0)


# ----------------------------------------------------------------------------- effects


def _ism(seed: int, n_loci: int = 6, n_members: int = 5, length: int = 7, chunk: int = 2) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (n_loci, length))
    ref = rng.normal(size=(n_loci, n_members, 2))
    mut = ref[:, :, None, None, :] + rng.normal(scale=0.3, size=(n_loci, n_members, length, 4, 2))
    identity = codes[:, :, None] == np.arange(4)  # (locus, position, allele): the reference allele
    mut[np.broadcast_to(identity[:, None, :, :, None], mut.shape)] = np.nan
    return xr.Dataset(
        {
            "ref_pred": (("locus", "member", "task"), da.from_array(ref.astype(np.float32), chunks=(chunk, -1, -1))),
            "mut_pred": (("locus", "member", "position", "allele", "task"),
                         da.from_array(mut.astype(np.float32), chunks=(chunk, -1, -1, -1, -1))),
        },
        coords={"locus": [f"ism-{i}" for i in range(n_loci)], "task": TASKS, "allele": list("ACGT")},
    )


def test_compute_effects__calibration_multiplies_effect_se_per_task_lazily(under_dispersed):
    calibration = fit_calibration(*under_dispersed)
    ism = _ism(7)
    plain = compute_effects(ism, dtype="float64")
    calibrated = compute_effects(ism, calibration=calibration, dtype="float64")
    assert calibrated["effect_se"].chunks[0] == (6,)  # lazy, nothing computed: its three small chunks make one block
    xr.testing.assert_identical(calibrated["effect"], plain["effect"])
    for task, factor in zip(TASKS, calibration.factor):
        np.testing.assert_array_equal(
            calibrated["effect_se"].sel(task=task).values, plain["effect_se"].sel(task=task).values * factor
        )
    assert calibrated.attrs["calibration"]["factor"] == dict(zip(TASKS, calibration.factor))
    assert calibrated.attrs["calibration"]["n_loci"] == 4000 and "calibration" not in plain.attrs
    reversed_tasks = compute_effects(ism.isel(task=[1, 0]), calibration=calibration, dtype="float64")
    np.testing.assert_array_equal(reversed_tasks["effect_se"].sel(task="outcome").values,
                                  calibrated["effect_se"].sel(task="outcome").values)


def test_compute_effects__calibration_that_does_not_apply_is_refused(under_dispersed):
    calibration = fit_calibration(*under_dispersed)
    ism = _ism(8)
    with pytest.raises(InputError, match="ddof=0, effects use ddof=1"):
        compute_effects(ism, ddof=1, calibration=calibration)
    with pytest.raises(InputError, match="5 members, ism has 4"):
        compute_effects(ism.isel(member=slice(4)), calibration=calibration)
    with pytest.raises(InputError, match=r"no factor for task\(s\) \['accessibility'\]"):
        compute_effects(ism.assign_coords(task=["exposure", "accessibility"]), calibration=calibration)
    with pytest.raises(InputError, match="no 'task' coordinate"):
        compute_effects(ism.drop_vars("task"), calibration=calibration)
    leaked = ism.assign_coords(locus=["ism-0", "held-00017", "ism-2", "ism-3", "ism-4", "ism-5"])
    with pytest.raises(InputError, match="1 ism loci.*'held-00017'.*held-out"):
        compute_effects(leaked, calibration=calibration)


def test_written_effects__store_calibrated_se_and_the_calibration_summary(under_dispersed, tmp_path):

    from deepmr_dist.io.sequence import sequences_dataset

    calibration = fit_calibration(*under_dispersed, source="round 0, calibration split")
    ism = _ism(9).compute()
    path = str(tmp_path / "run.zarr")
    codes = np.random.default_rng(9).integers(0, 4, (6, 7)).astype(np.int8)  # the codes _ism(9) drew
    template = store.ism_template(sequences_dataset(codes, list(ism["locus"].values)), [f"m{i}" for i in range(5)],
                                  TASKS, 2)
    store.create_store(path, template, fingerprint="test", attrs={}, chunk_loci=2)
    for start, stop in store.chunk_bounds(6, 2):
        store.write_ism_chunk(path, start, ism["ref_pred"].values[start:stop].astype(np.float32),
                              ism["mut_pred"].values[start:stop].astype(np.float32))
    written = store.write_group(path, compute_effects(store.open_run(path)["ism"], calibration=calibration, dtype="float64"), "effects")
    expected = compute_effects(ism, calibration=calibration, dtype="float64")
    np.testing.assert_allclose(written["effect_se"].values, expected["effect_se"].values, rtol=1e-12)
    reopened = store.open_run(path)["effects"]
    assert reopened.attrs["calibration"]["factor"] == dict(zip(TASKS, calibration.factor))
    assert reopened.attrs["calibration"]["source"] == "round 0, calibration split"
