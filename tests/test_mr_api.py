"""The public contract of deepmr_dist.mr: names, result shape, padding, undefined loci, ragged batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.mr import METHODS, NOTES, REASONS, MRResult, estimate

from helpers_mr import simulate

EXPECTED_METHODS = (
    "ivw", "ivw_fixed", "ivw_random", "penalized_ivw", "egger", "robust_ivw", "robust_egger", "egger_paper",
    "weighted_median", "simple_median", "penalized_weighted_median", "mbe", "wald_mean", "ivw_delta", "egger_simex",
    "mr_raps",
)  # fmt: skip
COLUMNS = [
    "locus", "method", "n", "estimate", "se", "ci_lower", "ci_upper", "pvalue", "intercept", "intercept_se",
    "intercept_ci_lower", "intercept_ci_upper", "intercept_pvalue", "rse", "q", "q_pvalue", "i2", "i2gx", "fstat",
    "reason", "note",
]  # fmt: skip


def _with_outliers(rng, bx, byse):
    by = 0.4 * bx + rng.normal(0.0, 1.0, bx.shape) * byse * 1.5
    by[rng.random(bx.shape) < 0.1] += 0.5
    return by


def _simulate(seed: int, n_loci: int = 12, max_k: int = 16, min_k: int = 0):
    return simulate(seed, n_loci, max_k, min_k, _with_outliers)


def test_api__method_names_and_result_fields():
    assert METHODS == EXPECTED_METHODS
    names = [f.name for f in dataclasses.fields(MRResult)]
    assert names == [c for c in COLUMNS if c not in ("locus", "method")]
    assert {"too_few_instruments", "all_bx_zero", "singular_fit", "no_convergence"} <= set(REASONS)


def test_api__every_method_returns_one_row_per_locus():
    bx, bxse, by, byse, k = _simulate(51)
    res = estimate(bx, bxse, by, byse, methods=METHODS, n_boot=20)
    assert list(res) == list(METHODS)
    for name, r in res.items():
        assert r.n.dtype == np.int64 and r.reason.dtype == object
        np.testing.assert_array_equal(r.n, k)
        for f in dataclasses.fields(MRResult):
            arr = getattr(r, f.name)
            assert arr.shape == (bx.shape[0],), (name, f.name)
            if f.name not in ("n", "reason", "note"):
                assert arr.dtype == np.float64
        assert set(r.reason) <= set(REASONS) | {""}
        assert set(r.note) <= set(NOTES) | {""} and not (r.note != "")[r.reason != ""].any()
        # a defined estimate has a number, an undefined one has NaN and a reason
        defined = r.reason == ""
        assert np.all(np.isfinite(r.estimate[defined]) & np.isfinite(r.se[defined])), name
        assert np.all(np.isnan(r.se[~defined])), name


def test_api__to_frame_columns_and_labels():
    bx, bxse, by, byse, _ = _simulate(52, n_loci=3)
    r = estimate(bx, bxse, by, byse, methods=("egger",))["egger"]
    df = r.to_frame("egger", loci=["a", "b", "c"])
    assert list(df.columns) == COLUMNS
    assert list(df["locus"]) == ["a", "b", "c"] and set(df["method"]) == {"egger"}
    np.testing.assert_array_equal(df["estimate"].to_numpy(), r.estimate)
    assert list(r.to_frame("egger")["locus"]) == [0, 1, 2]
    with pytest.raises(InputError):
        r.to_frame("egger", loci=["a"])


def test_api__ragged_batch_equals_each_locus_alone():
    bx, bxse, by, byse, k = _simulate(53, n_loci=10, max_k=14, min_k=1)
    batch = estimate(bx, bxse, by, byse, methods=METHODS, n_boot=15, seed=2)
    for i in range(bx.shape[0]):
        m = max(int(k[i]), 1)
        alone = estimate(bx[i, :m], bxse[i, :m], by[i, :m], byse[i, :m], methods=METHODS, n_boot=15, seed=2)
        for name in METHODS:
            a, b = alone[name], batch[name]
            assert a.reason[0] == b.reason[i], (name, i)
            for field in ("estimate", "se", "ci_lower", "intercept", "rse", "q", "i2gx", "fstat"):
                x, y = getattr(a, field)[0], getattr(b, field)[i]
                assert (np.isnan(x) and np.isnan(y)) or abs(x - y) <= 1e-9 * max(1.0, abs(x)), (name, field, i)


def test_api__interior_padding_and_invalid_entries_are_ignored():
    bx, bxse, by, byse, k = _simulate(54, n_loci=4, max_k=10, min_k=10)
    ref = estimate(bx, bxse, by, byse, methods=("ivw", "egger", "robust_egger", "weighted_median"), n_boot=10)
    # the same instruments with unusable entries scattered between them
    wide = [np.full((4, 16), np.nan) for _ in range(4)]
    cols = [0, 2, 3, 5, 7, 8, 10, 12, 13, 15]
    for dst, src in zip(wide, (bx, bxse, by, byse), strict=True):
        dst[:, cols] = src
    wide[0][:, 1] = 0.3  # bx set but byse missing -> unused
    wide[1][:, 4] = 0.0  # bxse == 0 -> unused
    wide[0][:, 4], wide[2][:, 4], wide[3][:, 4] = 0.2, 0.1, 0.05
    wide[0][:, 6], wide[1][:, 6], wide[2][:, 6], wide[3][:, 6] = 0.2, 0.05, np.inf, 0.05  # non-finite -> unused
    wide[0][:, 9], wide[1][:, 9], wide[2][:, 9], wide[3][:, 9] = 0.2, 0.05, 0.1, -0.05  # byse < 0 -> unused
    # interior columns shift the per-column bootstrap streams, so compare the deterministic methods
    got = estimate(*wide, methods=("ivw", "egger", "robust_egger", "weighted_median"), n_boot=10)
    for name in ("ivw", "egger", "robust_egger"):
        np.testing.assert_allclose(got[name].estimate, ref[name].estimate, rtol=1e-9)
        np.testing.assert_allclose(got[name].se, ref[name].se, rtol=1e-9)
        np.testing.assert_array_equal(got[name].n, 10)
    np.testing.assert_allclose(got["weighted_median"].estimate, ref["weighted_median"].estimate, rtol=1e-12)


def test_api__locus_without_instruments_is_kept_and_flagged():
    bx, bxse, by, byse, _ = _simulate(55, n_loci=3, max_k=8, min_k=8)
    for a in (bx, bxse, by, byse):
        a[1] = np.nan
    res = estimate(bx, bxse, by, byse, methods=METHODS, n_boot=10)
    for name, r in res.items():
        assert r.n[1] == 0 and r.reason[1] == "too_few_instruments", name
        assert np.isnan(r.estimate[1]) and r.reason[0] == "" and r.reason[2] == "", name


def test_api__bad_input_is_an_input_error():
    x = np.ones((2, 3))
    with pytest.raises(InputError, match="unknown MR method"):
        estimate(x, x, x, x, methods=("ivw", "nope"))
    with pytest.raises(InputError, match="alpha"):
        estimate(x, x, x, x, alpha=1.5)
    with pytest.raises(InputError, match="shape"):
        estimate(x, x, x, np.ones((2, 4)))
    with pytest.raises(InputError, match="n_boot"):
        estimate(x, x, x, x, methods=("mbe",), n_boot=0)


def test_api__method_names_are_checked_together_in_order_without_repeats():
    x = np.ones((2, 3))
    valid = ", ".join(EXPECTED_METHODS)
    with pytest.raises(InputError, match=rf"^unknown MR method\(s\) 'b', 'a'; valid: {valid}$"):
        estimate(x, x, x, x, methods=("b", "ivw", "a", "b"))
    with pytest.raises(InputError, match=rf"^no MR method given; valid: {valid}$"):
        estimate(x, x, x, x, methods=())


def test_wald_mean__is_mean_and_sd_of_ratios():
    bx, bxse, by, byse, k = _simulate(56, min_k=2)
    r = estimate(bx, bxse, by, byse, methods=("wald_mean",))["wald_mean"]
    paper = estimate(bx, bxse, by, byse, methods=("wald_mean",), wald_ci_multiplier=2.0)["wald_mean"]
    for i in range(bx.shape[0]):
        ratio = by[i, : k[i]] / bx[i, : k[i]]
        assert abs(r.estimate[i] - ratio.mean()) <= 1e-12 * max(1.0, abs(ratio.mean()))
        assert abs(r.se[i] - ratio.std(ddof=1)) <= 1e-12 * ratio.std(ddof=1)
        assert abs(paper.ci_upper[i] - (ratio.mean() + 2 * ratio.std(ddof=1))) <= 1e-10 * max(1, abs(ratio.mean()))
    assert np.all(r.reason[k < 2] == "too_few_instruments")


def test_api__threads_and_chunking_do_not_change_results(monkeypatch):
    import deepmr_dist.mr.median as median_mod
    import deepmr_dist.mr.mode as mode_mod
    import deepmr_dist.mr.robust as robust_mod

    bx, bxse, by, byse, _ = _simulate(57, n_loci=9, max_k=12, min_k=1)
    methods = ("robust_ivw", "robust_egger", "weighted_median", "mbe")
    ref = estimate(bx, bxse, by, byse, methods=methods, n_boot=12)
    monkeypatch.setattr(robust_mod, "CHUNK_ELEMENTS", 24)  # two loci per chunk
    monkeypatch.setattr(median_mod, "BOOT_CHUNK_ELEMENTS", 12 * 12 * 2)
    monkeypatch.setattr(mode_mod, "BOOT_CHUNK_ELEMENTS", 12 * 12 * 2)
    got = estimate(bx, bxse, by, byse, methods=methods, n_boot=12, threads=3)
    for name in methods:
        np.testing.assert_allclose(got[name].estimate, ref[name].estimate, rtol=1e-10, equal_nan=True)
        np.testing.assert_allclose(got[name].se, ref[name].se, rtol=1e-10, equal_nan=True)
        np.testing.assert_array_equal(got[name].reason, ref[name].reason)
