"""IVW with second-order weights against the package's formula in numpy and a base-R transcription of mr_ivw.

The fixtures ``tests/r/ivw_delta_inputs.csv`` and ``tests/r/ivw_delta_results.csv``
are written by ``Rscript tests/r/ivw_delta_reference.R``, which transcribes the
``weights = "delta"`` branch of MendelianRandomization 0.10.0's ``mr_ivw`` (``lm``
with weights, ``summary.lm``); these tests only read them. One test reruns the
script when ``Rscript`` is available and checks the committed files match.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from scipy import stats

from deepmr_dist.errors import InputError
from deepmr_dist.mr._data import prepare
from deepmr_dist.mr.ivw import ivw
from deepmr_dist.mr.ivw_delta import ivw_delta

from helpers_mr import pad_ragged, rel
from r_fixtures import R_DIR, assert_script_rewrites, num, read_csv

INPUTS = R_DIR / "ivw_delta_inputs.csv"
RESULTS = R_DIR / "ivw_delta_results.csv"
SCRIPT = R_DIR / "ivw_delta_reference.R"
RTOL = 1e-10
# R column -> MRResult field
FIELDS = {
    "estimate": "estimate",
    "se": "se",
    "ci_lower": "ci_lower",
    "ci_upper": "ci_upper",
    "pvalue": "pvalue",
    "rse": "rse",
    "heter_stat": "q",
    "heter_pvalue": "q_pvalue",
}


@cache
def r_inputs() -> dict[str, tuple[np.ndarray, ...]]:
    cases: dict[str, list[tuple[int, float, float, float, float]]] = {}
    for row in read_csv(INPUTS)[1]:
        cases.setdefault(row["case"], []).append(
            (int(row["instrument"]), *(num(row[k]) for k in ("bx", "bxse", "by", "byse")))
        )
    out = {}
    for case, items in cases.items():
        items.sort()
        assert [i for i, *_ in items] == list(range(1, len(items) + 1)), case
        out[case] = tuple(np.array([it[c] for it in items]) for c in range(1, 5))
    return out


def test_fixtures__name_the_r_version_and_script():
    for path in (INPUTS, RESULTS):
        comments, rows = read_csv(path)
        assert comments and comments[0].startswith("# R 4.")
        assert "tests/r/ivw_delta_reference.R" in comments[0]
        assert rows


def test_ivw_delta__matches_r_transcription_of_mr_ivw():
    _, rows = read_csv(RESULTS)
    checked = 0
    worst = 0.0
    for row in rows:
        bx, bxse, by, byse = r_inputs()[row["case"]]
        res = ivw_delta(
            prepare(bx, bxse, by, byse),
            model=row["model"],
            alpha=float(row["alpha"]),
            t_dist=row["distribution"] == "t-dist",
        )
        label = f"{row['case']}/{row['model']}/{row['distribution']}/{row['alpha']}"
        if row["rdf"] == "0":  # one variant with bx != 0 among several: lm has no residual df
            assert math.isnan(num(row["se"])) and res.reason[0] == "zero_bx", label
            assert np.isnan(res.estimate[0]) and np.isnan(res.se[0]), label
            continue
        assert res.reason[0] == "", label
        for col, field in FIELDS.items():
            want, got = num(row[col]), float(getattr(res, field)[0])
            if len(bx) == 1 and row["distribution"] == "t-dist" and col == "pvalue":
                # the package reports a normal p-value for one variant whatever the distribution;
                # deepmr's IVW family gives t inference on n - 1 = 0 df, i.e. NaN (as deepmr_dist.mr.ivw)
                assert math.isnan(got), label
                continue
            if math.isnan(want):
                assert math.isnan(got), (label, col)
                continue
            err = rel(got, want)
            worst = max(worst, err)
            assert err <= RTOL, (label, col, got, want)
            checked += 1
    assert checked > 700
    assert worst < RTOL


def _package_formula(bx, bxse, by, byse, model, t_dist, alpha=0.05):
    """mr_ivw(weights = "delta") for one locus, written out with numpy (drops bx == 0 as lm does)."""
    n = len(bx)
    keep = bx != 0
    x, y = bx[keep], by[keep]
    w = 1.0 / (byse[keep] ** 2 + y**2 * bxse[keep] ** 2 / x**2)
    if model == "default":
        model = "fixed" if n < 4 else "random"
    if n == 1:
        est = by[0] / bx[0]
        se = math.sqrt(byse[0] ** 2 / bx[0] ** 2 + by[0] ** 2 * bxse[0] ** 2 / bx[0] ** 4)
        return {"estimate": est, "se": se, "rse": 1.0, "q": math.nan}
    # weighted lm: sqrt-weighted rows, least squares, sigma on (kept - 1) df, coef se = sigma / sqrt(x'Wx)
    sw = np.sqrt(w)
    coef, rss, *_ = np.linalg.lstsq((x * sw)[:, None], y * sw, rcond=None)
    est = float(coef[0])
    sigma = math.sqrt(float(rss[0]) / (keep.sum() - 1))
    coef_se = sigma / math.sqrt(np.sum(w * x * x))
    se = coef_se / min(1.0, sigma) if model == "random" else coef_se / sigma
    q = (n - 1) * sigma**2
    crit = stats.t.ppf(1 - alpha / 2, n - 1) if t_dist else stats.norm.ppf(1 - alpha / 2)
    p = 2 * (stats.t.sf(abs(est / se), n - 1) if t_dist else stats.norm.sf(abs(est / se)))
    return {
        "estimate": est,
        "se": se,
        "rse": sigma,
        "q": q,
        "q_pvalue": stats.chi2.sf(q, n - 1),
        "ci_lower": est - crit * se,
        "ci_upper": est + crit * se,
        "pvalue": p,
    }


def _simulate(seed: int, sizes: list[int], max_k: int = 12):
    rng = np.random.default_rng(seed)
    n_loci = len(sizes)
    bx = rng.normal(0.0, 0.15, (n_loci, max_k))
    bxse = rng.uniform(0.01, 0.05, (n_loci, max_k))
    byse = rng.uniform(0.02, 0.08, (n_loci, max_k))
    by = 0.4 * bx + rng.normal(0.0, 1.0, (n_loci, max_k)) * byse * rng.choice([0.5, 2.5], (n_loci, 1))
    pad_ragged(sizes, bx, bxse, by, byse)
    return bx, bxse, by, byse


SIZES = [1, 2, 3, 4, 5, 12, 1, 2, 3, 4, 7, 12]


@pytest.mark.parametrize("model", ["default", "fixed", "random"])
@pytest.mark.parametrize("t_dist", [False, True])
def test_ivw_delta__matches_the_package_formula_in_numpy(model, t_dist):
    bx, bxse, by, byse = _simulate(7, SIZES)
    bx[9, 1] = 0.0  # n = 4 with a zero bx: random effects by default, three variants in the fit
    bx[10, 2], by[10, 2] = 0.0, 0.0  # by = 0 too: lm's NA weight
    bx[11, [0, 5]] = 0.0
    res = ivw_delta(prepare(bx, bxse, by, byse), model=model, t_dist=t_dist)
    for i, n in enumerate(SIZES):
        want = _package_formula(bx[i, :n], bxse[i, :n], by[i, :n], byse[i, :n], model, t_dist)
        assert res.reason[i] == ""
        for field, value in want.items():
            got = float(getattr(res, field)[i])
            if field == "pvalue" and n == 1 and t_dist:
                assert math.isnan(got)
            elif math.isnan(value):
                assert math.isnan(got), (i, field)
            else:
                assert rel(got, value) <= RTOL, (i, field, got, value)
        if n >= 2:
            assert rel(res.i2[i] + 1.0, max(0.0, (want["q"] - (n - 1)) / want["q"]) + 1.0) <= RTOL
        assert rel(res.fstat[i], np.mean((bx[i, :n] / bxse[i, :n]) ** 2)) <= RTOL


def test_ivw_delta__single_instrument_is_the_ratio_with_the_second_order_se():
    res = ivw_delta(prepare([0.2], [0.05], [0.1], [0.04]), model="random")
    assert res.estimate[0] == pytest.approx(0.5, rel=1e-14)
    assert res.se[0] == pytest.approx(math.sqrt(0.04**2 / 0.2**2 + 0.1**2 * 0.05**2 / 0.2**4), rel=1e-14)
    assert res.rse[0] == 1.0 and np.isnan(res.q[0]) and res.reason[0] == ""


def test_ivw_delta__zero_bx_cases_are_flagged():
    bx = np.array([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.0, np.nan, np.nan]])
    ones = np.full(bx.shape, 0.05)
    by = np.array([[0.1, 0.2, 0.3], [0.1, 0.2, 0.0], [0.1, np.nan, np.nan]])
    res = ivw_delta(prepare(bx, ones, by, ones))
    assert list(res.reason) == ["all_bx_zero", "zero_bx", "all_bx_zero"]
    assert np.all(np.isnan(res.estimate)) and np.all(np.isnan(res.se))
    empty = ivw_delta(prepare(np.full((1, 2), np.nan), ones[:1, :2], by[:1, :2], ones[:1, :2]))
    assert empty.reason[0] == "too_few_instruments"


def test_ivw_delta__exact_fit_takes_the_limit_se():
    bx = np.array([0.1, 0.2, -0.3, 0.25, 0.15])
    se = np.full(5, 0.02)
    res = ivw_delta(prepare(bx, se, 0.4 * bx, se), model="random")
    w = 1.0 / (se**2 + (0.4 * se) ** 2)
    assert res.estimate[0] == pytest.approx(0.4, rel=1e-13)
    assert res.se[0] == pytest.approx(1.0 / math.sqrt(np.sum(w * bx * bx)), rel=1e-13)
    assert res.rse[0] < 1e-12 and res.reason[0] == ""


def test_ivw_delta__reduces_to_first_order_ivw_without_exposure_error():
    bx, bxse, by, byse = _simulate(8, SIZES)
    bxse = bxse * 1e-9
    for model in ("default", "fixed", "random"):
        a = ivw_delta(prepare(bx, bxse, by, byse), model=model)
        b = ivw(prepare(bx, bxse, by, byse), model=model)
        for field in ("estimate", "se", "ci_lower", "ci_upper", "rse", "q", "q_pvalue"):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=1e-9, err_msg=field)


def test_ivw_delta__batch_of_loci_equals_loci_alone():
    bx, bxse, by, byse = _simulate(9, SIZES)
    batch = ivw_delta(prepare(bx, bxse, by, byse))
    for i, n in enumerate(SIZES):
        alone = ivw_delta(prepare(bx[i, :n], bxse[i, :n], by[i, :n], byse[i, :n]))
        for field in ("estimate", "se", "rse", "q"):
            np.testing.assert_allclose(getattr(alone, field), getattr(batch, field)[i : i + 1], rtol=1e-14)


def test_ivw_delta__unknown_model_raises():
    with pytest.raises(InputError, match="model"):
        ivw_delta(prepare([0.1, 0.2], [0.01, 0.01], [0.1, 0.2], [0.01, 0.01]), model="mixed")


def test_fixtures__are_what_the_r_script_writes_now(tmp_path):
    assert_script_rewrites(SCRIPT, (INPUTS.name, RESULTS.name), tmp_path, rtol=1e-12, timeout=300)
