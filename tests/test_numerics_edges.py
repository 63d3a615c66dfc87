"""Numerics at the edges: MR and meta-analysis at extreme scales, and their equivariance (hypothesis).

References: the closed forms of IVW and DerSimonian-Laird at unit scale, and the
equivariance identities every estimator satisfies in exact arithmetic (outcome
units times c scale the causal estimate by c, exposure units times c by 1/c, the
order of the instruments does not matter; meta-analysis estimates times c give
estimate times c and tau^2 times c^2).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from deepmr_dist.meta import META_METHODS, META_REASONS, meta_analysis
from deepmr_dist.mr import BOOTSTRAP_METHODS, METHODS, REASONS, estimate

RNG_SEED = 20240514
OPTIONS = {"n_boot": 50, "n_simex": 20}
"""Small bootstrap and SIMEX sizes: the identities hold draw for draw (same seed)."""
TOLERANCE_FITS = frozenset({"robust_ivw", "robust_egger", "egger_paper", "mr_raps"})
"""Fits that stop on tolerances in mixed or absolute units (as robustbase and mr.raps do): equivariant to about 1e-8
at unit scale, and to their tolerance times the design's condition number otherwise (:data:`TOLERANCE_RTOL`)."""
TOLERANCE_RTOL = 1e-4
MM_FITS = frozenset({"robust_ivw", "robust_egger"})
"""MM fits (robustbase's algorithm): their stopping rule takes the norm of (intercept, slope), so exposure scaling and
shifts, which move the slope alone, change where they stop (by up to about 1e-3 with a few instruments) and can turn
a converged fit into ``no_convergence``; they are checked under outcome scaling and permutations only."""
LOCAL_SEARCH = frozenset({"mr_raps"})
"""mr.raps maximises its profile likelihood by Brent's local search on ``[-bound, bound]`` with absolute tolerances (as
the package): where the likelihood has several local optima (few instruments), other units or a sign change can pick
another one. Checked at the edges of the float range (the unit-scale identity) and under permutations."""
DRAWN = BOOTSTRAP_METHODS | {"egger_simex"}
"""Methods whose SE (egger_simex: also its estimate) comes from random draws ``b + se z``; a negative c mirrors
the draws (``-b + se z`` is ``-(b - se z)``), so there the identities hold in distribution only."""
OUTCOME_SCALED = tuple(m for m in METHODS if m not in LOCAL_SEARCH)
"""Methods checked under outcome scaling."""
EXPOSURE_SCALED = tuple(m for m in OUTCOME_SCALED if m not in MM_FITS)
"""Methods checked under exposure scaling."""
SHIFT_METHODS = (
    "ivw", "ivw_fixed", "ivw_random", "penalized_ivw", "egger", "weighted_median", "simple_median",
    "penalized_weighted_median", "wald_mean",
)  # fmt: skip
"""Methods whose estimate moves by a when by -> by + a bx (first-order weights; no bx noise in the fit; no MM fit)."""
SE_SHIFT_METHODS = frozenset(SHIFT_METHODS) - BOOTSTRAP_METHODS
"""Of those, the ones whose SE is unchanged by the shift (bootstrap draws of bx move the ratios)."""
SETTINGS = settings(
    derandomize=True, database=None, max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _locus(k: int = 12, seed: int = RNG_SEED) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    bx = rng.uniform(0.2, 1.0, k) * rng.choice([-1.0, 1.0], k)
    bxse = rng.uniform(0.03, 0.1, k)
    by = 0.4 * bx + rng.normal(0.0, 0.05, k)
    byse = rng.uniform(0.03, 0.1, k)
    return bx, bxse, by, byse


def _ivw_closed_form(bx, by, byse) -> tuple[float, float]:
    """Fixed-effect IVW estimate and SE, ``sum(bx by w) / sum(bx^2 w)`` and ``1 / sqrt(sum(bx^2 w))``."""
    w = 1.0 / byse**2
    return float((bx * by * w).sum() / (bx * bx * w).sum()), float(1.0 / np.sqrt((bx * bx * w).sum()))


def _dl_closed_form(y, s) -> tuple[float, float, float]:
    """DerSimonian-Laird estimate, SE and tau^2 in closed form."""
    w = 1.0 / s**2
    mu = (w * y).sum() / w.sum()
    q = (w * (y - mu) ** 2).sum()
    tau2 = max(0.0, (q - (len(y) - 1)) / (w.sum() - (w * w).sum() / w.sum()))
    ws = 1.0 / (s**2 + tau2)
    return float((ws * y).sum() / ws.sum()), float(1.0 / np.sqrt(ws.sum())), float(tau2)


# --------------------------------------------------------------------------- MR at extreme scales


@pytest.mark.parametrize("scale", [1e300, 1e-300, 2.0**1000, 1e-200])
def test_ivw__inputs_times_an_extreme_scale_give_the_closed_form(scale):
    bx, bxse, by, byse = _locus(k=3)  # three instruments: fixed-effect IVW
    est, se = _ivw_closed_form(bx, by, byse)
    res = estimate(bx * scale, bxse * scale, by * scale, byse * scale, methods=("ivw",))["ivw"]
    assert res.reason[0] == ""
    assert res.estimate[0] == pytest.approx(est, rel=1e-13)
    assert res.se[0] == pytest.approx(se, rel=1e-13)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e300, 1e-300])
def test_mr__every_method_at_1e300_and_1e_minus_300_equals_its_unit_scale_result(method, scale):
    bx, bxse, by, byse = _locus()
    ref = estimate(bx, bxse, by, byse, methods=(method,), **OPTIONS)[method]
    res = estimate(bx * scale, bxse * scale, by * scale, byse * scale, methods=(method,), **OPTIONS)[method]
    tol = 1e-7 if method in TOLERANCE_FITS else 1e-12
    assert res.reason[0] == ref.reason[0] == ""
    for name in ("estimate", "se", "ci_lower", "ci_upper", "pvalue", "rse", "q", "i2gx", "fstat"):
        np.testing.assert_allclose(getattr(res, name), getattr(ref, name), rtol=tol, equal_nan=True, err_msg=name)
    np.testing.assert_allclose(res.intercept, ref.intercept * scale, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("method", METHODS)
def test_mr__standard_errors_of_1e_minus_300_beside_unit_effects_are_degenerate_se(method):
    bx, _, by, _ = _locus()
    tiny = np.full(bx.shape, 1e-300)
    res = estimate(bx, tiny, by, tiny, methods=(method,), **OPTIONS)[method]
    if method == "wald_mean":  # uses no standard error: the mean of the ratios is still defined
        assert res.reason[0] == ""
        assert res.estimate[0] == pytest.approx(np.mean(by / bx), rel=1e-13)
    else:
        assert res.reason[0] == "degenerate_se"
        assert np.isnan(res.estimate[0]) and np.isnan(res.se[0])
    assert "degenerate_se" in REASONS


def test_mr__an_estimate_beyond_the_float64_range_is_nan_with_overflow_or_underflow():
    bx, bxse, by, byse = _locus(k=3)
    big = estimate(bx * 1e-300, bxse * 1e-300, by * 1e300, byse * 1e300, methods=("ivw", "egger", "wald_mean"))
    small = estimate(bx * 1e300, bxse * 1e300, by * 1e-300, byse * 1e-300, methods=("ivw",))
    for res in big.values():  # the estimate would be about 4e599
        assert res.reason[0] == "overflow" and np.isnan(res.estimate[0]) and np.isnan(res.se[0])
    assert small["ivw"].reason[0] == "underflow" and np.isnan(small["ivw"].se[0])  # about 4e-601
    assert {"overflow", "underflow"} <= set(REASONS)


@pytest.mark.parametrize(("method", "ex", "ey"), [("mr_raps", 0, -32), ("robust_egger", -24, -24), ("robust_ivw", 0, -24)])
def test_mr__fits_with_absolute_tolerances_give_the_unit_scale_estimate_in_small_units(method, ex, ey):
    """At outcome scales near 1e-10 mr.raps' absolute tolerances alone moved the estimate by 13x; robust fits failed."""
    bx, bxse, by, byse = _locus(k=15, seed=3)
    cx, cy = 2.0**ex, 2.0**ey
    ref = estimate(bx, bxse, by, byse, methods=(method,))[method]
    res = estimate(bx * cx, bxse * cx, by * cy, byse * cy, methods=(method,))[method]
    assert res.reason[0] == ref.reason[0] == ""
    assert res.estimate[0] / (cy / cx) == pytest.approx(ref.estimate[0], rel=1e-7)
    assert res.se[0] / (cy / cx) == pytest.approx(ref.se[0], rel=1e-7)


# --------------------------------------------------------------------------- meta-analysis at extreme scales


def _studies(k: int = 10, seed: int = RNG_SEED) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(0.3, 0.2, k), rng.uniform(0.05, 0.1, k)


@pytest.mark.parametrize("scale", [1e150, 1e-150, 2.0**-500])
def test_meta__dl_at_extreme_representable_scales_equals_the_closed_form(scale):
    y, s = _studies()
    est, se, tau2 = _dl_closed_form(y, s)
    res = meta_analysis(y * scale, s * scale, "dl")
    assert res.reason[0] == ""
    assert res.estimate[0] == pytest.approx(est * scale, rel=1e-12)
    assert res.se[0] == pytest.approx(se * scale, rel=1e-12)
    assert res.tau2[0] == pytest.approx(tau2 * scale * scale, rel=1e-12)


@pytest.mark.parametrize("method", META_METHODS)
@pytest.mark.parametrize(("scale", "code"), [(1e300, "overflow"), (1e-300, "underflow")])
def test_meta__estimates_times_1e300_keep_estimate_and_se_and_tau2_out_of_range_is_nan(method, scale, code):
    y, s = _studies()
    ref = meta_analysis(y, s, method)
    res = meta_analysis(y * scale, s * scale, method)
    assert res.estimate[0] == pytest.approx(ref.estimate[0] * scale, rel=1e-12)
    assert res.se[0] == pytest.approx(ref.se[0] * scale, rel=1e-12)
    assert res.ci_upper[0] - res.ci_lower[0] == pytest.approx((ref.ci_upper[0] - ref.ci_lower[0]) * scale, rel=1e-12)
    assert res.i2[0] == pytest.approx(ref.i2[0], rel=1e-12)
    if method == "fe":  # tau2 = 0 is representable at any scale
        assert res.tau2[0] == 0.0 and res.reason[0] == ""
    else:  # tau2 would be about 4e598 (4e-602)
        assert ref.tau2[0] > 0
        assert np.isnan(res.tau2[0]) and res.reason[0] == code
    assert not (np.isinf(res.tau2) & np.isfinite(res.se)).any()
    assert code in META_REASONS


@pytest.mark.parametrize("method", META_METHODS)
def test_meta__standard_errors_of_1e_minus_300_are_degenerate_se_with_no_numbers(method):
    y, _ = _studies()
    res = meta_analysis(y, np.full(y.shape, 1e-300), method, hksj=True)
    assert res.reason[0] == "degenerate_se" and res.k[0] == y.size
    for name in ("estimate", "se", "ci_lower", "ci_upper", "tau2", "pi_lower", "pi_upper"):
        assert np.isnan(getattr(res, name)[0]), name
    assert "degenerate_se" in META_REASONS


# --------------------------------------------------------------------------- equivariance (hypothesis)

_SIGN = st.sampled_from([-1.0, 1.0])


def _grid(draw, k: int, lo: int, hi: int, *, step: float = 1e-3, unique: bool = False) -> np.ndarray:
    """``k`` values on the grid ``lo step .. hi step`` (no near-zero noise that a scale would push out of range)."""
    return draw(hnp.arrays(np.int64, (k,), elements=st.integers(lo, hi), unique=unique)) * step


@st.composite
def loci(draw, min_k: int = 3, max_k: int = 10) -> tuple[np.ndarray, ...]:
    """One well-posed locus of ``k`` instruments: |bx| in [0.2, 1], SEs in [0.02, 0.3], by = beta bx + noise.

    Well-posed: the MR-Egger slope is identified (|bx| spread by half its minimum), the fit is not almost
    exact (noise SD >= 0.02; there the MM fits' outlier sets flip with round-off), and the ratios by/bx are
    not (almost) tied: the package's weighted median jumps at ties by the order of the tied entries.
    """
    k = draw(st.integers(min_k, max_k))
    bx = _grid(draw, k, 20, 100, step=0.01, unique=True) * draw(hnp.arrays(np.float64, (k,), elements=_SIGN))
    beta = draw(st.integers(-2000, 2000)) / 1000.0
    noise = _grid(draw, k, -200, 200, unique=True)
    by = beta * bx + noise
    assume(np.ptp(np.abs(bx)) >= 0.5 * np.abs(bx).min() and noise.std() >= 0.02)
    ratios = np.sort(by / bx)
    assume(np.diff(ratios).min() > 1e-9 * np.abs(ratios).max())
    return bx, _grid(draw, k, 20, 300), by, _grid(draw, k, 20, 300)


def _scales(max_exponent: int) -> st.SearchStrategy[float]:
    """Scale factors ``+-m 10^e`` with ``1 <= m <= 10`` and ``|e| <= max_exponent``."""
    return st.builds(lambda sign, m, e: sign * m * 10.0**e, _SIGN, st.floats(1.0, 10.0), st.integers(-max_exponent, max_exponent))


scales = _scales(250)
"""MR: the causal estimate (about 1 to 100) times c or 1/c stays representable."""
meta_scales = _scales(140)
"""Meta-analysis: tau^2 times c^2 stays representable."""


def _assert_close(got, want, *, rtol, scale, name, method):
    """``|got - want| <= rtol (|want| + |scale|)`` elementwise, NaN where ``want`` is NaN."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{method}.{name}: NaN pattern")
    ok = np.isnan(want) | (np.abs(got - want) <= rtol * (np.abs(want) + np.nan_to_num(np.abs(scale))))
    assert ok.all(), f"{method}.{name}: got {got}, want {want}"


def _assert_equivariant(ref, res, *, factor: float, intercept_factor: float, method: str) -> None:
    """``res`` is ``ref`` with the causal estimate times ``factor`` and the intercept times ``intercept_factor``."""
    rtol = TOLERANCE_RTOL if method in TOLERANCE_FITS else 1e-9
    np.testing.assert_array_equal(res.reason, ref.reason)
    se = (np.abs(ref.se) + np.abs(ref.estimate)) * abs(factor)  # absolute scale of the ratio fields
    if factor < 0 and method in DRAWN:  # mirrored draws: only a deterministic estimate is comparable
        if method in BOOTSTRAP_METHODS:
            _assert_close(res.estimate, ref.estimate * factor, rtol=rtol, scale=se, name="estimate", method=method)
        return
    _assert_close(res.estimate, ref.estimate * factor, rtol=rtol, scale=se, name="estimate", method=method)
    _assert_close(res.se, ref.se * abs(factor), rtol=rtol, scale=se, name="se", method=method)
    lower, upper = ref.ci_lower * factor, ref.ci_upper * factor
    if factor < 0:
        lower, upper = upper, lower
    _assert_close(res.ci_lower, lower, rtol=rtol, scale=se, name="ci_lower", method=method)
    _assert_close(res.ci_upper, upper, rtol=rtol, scale=se, name="ci_upper", method=method)
    isd = (np.abs(ref.intercept_se) + np.abs(ref.intercept)) * abs(intercept_factor)
    _assert_close(res.intercept, ref.intercept * intercept_factor, rtol=rtol, scale=isd, name="intercept", method=method)
    _assert_close(res.intercept_se, ref.intercept_se * abs(intercept_factor), rtol=rtol, scale=isd, name="intercept_se",
                  method=method)  # fmt: skip
    for name in ("pvalue", "intercept_pvalue", "rse", "q", "q_pvalue", "i2", "i2gx", "fstat"):
        _assert_close(getattr(res, name), getattr(ref, name), rtol=rtol, scale=1.0, name=name, method=method)


@SETTINGS
@given(locus=loci(), c=scales)
def test_mr__outcome_units_times_c_scale_every_estimate_by_c(locus, c):
    bx, bxse, by, byse = locus
    ref = estimate(bx, bxse, by, byse, methods=OUTCOME_SCALED, **OPTIONS)
    res = estimate(bx, bxse, by * c, byse * abs(c), methods=OUTCOME_SCALED, **OPTIONS)
    for method in OUTCOME_SCALED:
        _assert_equivariant(ref[method], res[method], factor=c, intercept_factor=c, method=method)


@SETTINGS
@given(locus=loci(), c=scales)
def test_mr__exposure_units_times_c_scale_every_estimate_by_1_over_c(locus, c):
    bx, bxse, by, byse = locus
    ref = estimate(bx, bxse, by, byse, methods=EXPOSURE_SCALED, **OPTIONS)
    res = estimate(bx * c, bxse * abs(c), by, byse, methods=EXPOSURE_SCALED, **OPTIONS)
    for method in EXPOSURE_SCALED:  # MR-Egger orients on sign(bx): a negative c flips its intercept
        _assert_equivariant(ref[method], res[method], factor=1.0 / c, intercept_factor=float(np.sign(c)), method=method)


@SETTINGS
@given(locus=loci(), data=st.data())
def test_mr__the_order_of_the_instruments_does_not_matter(locus, data):
    bx, bxse, by, byse = locus
    order = np.asarray(data.draw(st.permutations(range(bx.size))))
    ref = estimate(bx, bxse, by, byse, methods=METHODS, **OPTIONS)
    res = estimate(bx[order], bxse[order], by[order], byse[order], methods=METHODS, **OPTIONS)
    for method in METHODS:  # bootstrap and SIMEX draws belong to instrument columns, so they move with the order
        if method == "egger_simex":
            continue
        rtol = TOLERANCE_RTOL if method in TOLERANCE_FITS else 1e-9
        np.testing.assert_array_equal(res[method].reason, ref[method].reason)
        scale = np.abs(ref[method].se) + np.abs(ref[method].estimate)
        _assert_close(res[method].estimate, ref[method].estimate, rtol=rtol, scale=scale, name="estimate", method=method)
        if method not in BOOTSTRAP_METHODS:
            _assert_close(res[method].se, ref[method].se, rtol=rtol, scale=scale, name="se", method=method)


@SETTINGS
@given(locus=loci(), a=st.floats(-3.0, 3.0))
def test_mr__outcome_shifted_by_a_bx_shifts_the_first_order_estimates_by_a(locus, a):
    bx, bxse, by, byse = locus
    ref = estimate(bx, bxse, by, byse, methods=SHIFT_METHODS, **OPTIONS)
    res = estimate(bx, bxse, by + a * bx, byse, methods=SHIFT_METHODS, **OPTIONS)
    for method in SHIFT_METHODS:
        rtol = TOLERANCE_RTOL if method in TOLERANCE_FITS else 1e-9
        np.testing.assert_array_equal(res[method].reason, ref[method].reason)
        scale = np.abs(ref[method].se) + np.abs(ref[method].estimate) + abs(a)
        _assert_close(res[method].estimate, ref[method].estimate + a, rtol=rtol, scale=scale, name="estimate", method=method)
        if method in SE_SHIFT_METHODS:
            _assert_close(res[method].se, ref[method].se, rtol=rtol, scale=scale, name="se", method=method)


@st.composite
def studies(draw) -> tuple[np.ndarray, np.ndarray]:
    k = draw(st.integers(2, 12))
    y = draw(hnp.arrays(np.float64, (k,), elements=st.floats(-1.0, 1.0)))
    s = draw(hnp.arrays(np.float64, (k,), elements=st.floats(0.02, 0.5)))
    return y, s


META_SCALED = {"estimate": 1, "se": 1, "ci_lower": 1, "ci_upper": 1, "pi_lower": 1, "pi_upper": 1, "tau2": 2}
"""Meta-analysis fields in units of the estimates (power 1) or their square (power 2); the rest are unitless."""
META_UNITLESS = ("pvalue", "i2", "h2", "q", "q_pvalue")


def _assert_meta_scaled(ref, res, c: float, label: str) -> None:
    """``res`` is ``ref`` for estimates times ``c`` (limits swap for a negative ``c``)."""
    unit = np.abs(ref.estimate) + np.abs(ref.se)
    for name, power in META_SCALED.items():
        source = name
        if c < 0 and name[-6:] in ("_lower", "_upper"):
            source = name[:-5] + ("upper" if name.endswith("lower") else "lower")
        factor = abs(c) if name == "se" else c**power
        _assert_close(getattr(res, name), getattr(ref, source) * factor, rtol=1e-7, scale=unit**power * abs(c) ** power,
                      name=name, method=label)  # fmt: skip
    for name in META_UNITLESS:
        _assert_close(getattr(res, name), getattr(ref, name), rtol=1e-7, scale=1e-2, name=name, method=label)


@settings(derandomize=True, database=None, max_examples=40, deadline=None)
@given(group=studies(), c=meta_scales, a=st.floats(-5.0, 5.0), data=st.data())
def test_meta__scaled_shifted_and_permuted_estimates(group, c, a, data):
    y, s = group
    order = np.asarray(data.draw(st.permutations(range(y.size))))
    for method in META_METHODS:
        for hksj in (False, True):
            label = f"{method}(hksj={hksj})"
            ref = meta_analysis(y, s, method, hksj=hksj)
            scaled = meta_analysis(y * c, s * abs(c), method, hksj=hksj)
            shifted = meta_analysis(y + a, s, method, hksj=hksj)
            permuted = meta_analysis(y[order], s[order], method, hksj=hksj)
            for res in (scaled, shifted, permuted):
                np.testing.assert_array_equal(res.reason, ref.reason, err_msg=label)
            _assert_meta_scaled(ref, scaled, c, label)
            unit = np.abs(ref.estimate) + np.abs(ref.se) + abs(a)
            _assert_close(shifted.estimate, ref.estimate + a, rtol=1e-7, scale=unit, name="estimate", method=label)
            scales = {"estimate": unit, "se": unit, "tau2": unit**2, "q": 1e-2, "i2": 1e-2}
            for name, scale in scales.items():
                if name != "estimate":
                    _assert_close(getattr(shifted, name), getattr(ref, name), rtol=1e-7, scale=scale, name=name, method=label)
                _assert_close(getattr(permuted, name), getattr(ref, name), rtol=1e-9, scale=scale, name=name, method=label)
