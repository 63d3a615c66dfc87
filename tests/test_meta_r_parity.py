"""deepmr_dist.meta against metafor's rma.uni() and predict(), from committed R fixtures.

The fixtures ``tests/r/metafor_inputs.csv`` and ``tests/r/metafor_results.csv``
are written by ``Rscript tests/r/metafor_reference.R`` (see ``tests/r/README.md``);
these tests only read them and need no R. One test reruns the script when
``Rscript`` with metafor is available and checks the committed files are what it
writes now (skipped otherwise).

Tolerances, ``|deepmr - metafor| <= rtol * |metafor| + rtol * scale``:

* ``rtol = 1e-8`` for the closed forms: FE and DL fits (Hartung-Knapp and
  prediction intervals included), and Q and its p-value for every method;
* ``rtol = 1e-6`` for everything that depends on an iterative tau^2 (REML, PM),
  Hartung-Knapp and prediction intervals included;
* p-values get ``rtol * max(1, -ln p)``: a tail probability amplifies a relative
  error in its statistic (``d ln p = -z^2 d ln z`` and ``-ln p ~ z^2 / 2`` for a
  normal tail), so ``p ~ 1e-36`` (``z ~ 12.5``) carries 80 times the statistic's
  relative error. Where the sampling variances span 1e-4 to 1e5, metafor's
  matrix formulas (``Y'PY`` with ``P = W - W X (X'WX)^-1 X'W``) lose ~3e-10
  relative in Q and tau2 to cancellation (deepmr's sums agree with a 50-digit
  evaluation to ~1e-15), which such a p-value turns into ~4e-8;
* ``scale`` is the absolute part for values that are ~0 (``tau2 = 0`` fits, Q of
  identical estimates): the harmonic mean of the sampling variances for
  ``tau2``, 100 for ``I2`` (percent), 1 for ``H2``, ``k - 1`` for ``Q``, the
  fixed-effect standard error for locations (estimate, interval bounds), and 0
  for standard errors and p-values (purely relative).

metafor's REML and PM fixtures are computed with convergence criteria much
tighter than metafor's defaults (recorded in the ``control`` column), so they are
the estimator's value rather than metafor's default stopping point. Only
fields deepmr defines are compared (not ``zval`` or ``se.tau2``).
"""

from __future__ import annotations

import math
import shutil
import subprocess
from functools import cache

import numpy as np
import pytest

from deepmr_dist.meta import meta_analysis

from r_fixtures import R_DIR, assert_script_rewrites, num, read_csv

INPUTS = R_DIR / "metafor_inputs.csv"
RESULTS = R_DIR / "metafor_results.csv"
SCRIPT = R_DIR / "metafor_reference.R"

# metafor column -> MetaResult field
FIELDS: dict[str, str] = {
    "b": "estimate",
    "se": "se",
    "pval": "pvalue",
    "ci.lb": "ci_lower",
    "ci.ub": "ci_upper",
    "tau2": "tau2",
    "I2": "i2",
    "H2": "h2",
    "QE": "q",
    "QEp": "q_pvalue",
    "pi.lb": "pi_lower",
    "pi.ub": "pi_upper",
}
LOCATION = {"b", "ci.lb", "ci.ub", "pi.lb", "pi.ub"}
DATA_ONLY = {"QE", "QEp"}  # closed forms of the data whatever the method
PVALUES = {"pval", "QEp"}
RTOL_CLOSED = 1e-8
RTOL_ITERATIVE = 1e-6
METHODS = {"FE": "fe", "DL": "dl", "REML": "reml", "PM": "pm"}
TESTS = ("z", "knha", "adhoc")


@cache
def inputs() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    _, rows = read_csv(INPUTS)
    out: dict[str, list[tuple[int, float, float]]] = {}
    for row in rows:
        out.setdefault(row["case"], []).append((int(row["i"]), num(row["yi"]), num(row["vi"])))
    data = {}
    for case, items in out.items():
        items.sort()
        assert [i for i, _, _ in items] == list(range(1, len(items) + 1)), case
        data[case] = (np.array([y for _, y, _ in items]), np.array([v for _, _, v in items]))
    return data


@cache
def results() -> list[dict[str, str]]:
    return read_csv(RESULTS)[1]


def row_id(row: dict[str, str]) -> str:
    return f"{row['case']}-{row['method']}-{row['test']}-{row['level']}"


def deepmr_fit(row: dict[str, str]):
    yi, vi = inputs()[row["case"]]
    return meta_analysis(
        yi,
        np.sqrt(vi),
        METHODS[row["method"]],
        hksj=row["test"] == "knha",
        hksj_adhoc=row["test"] == "adhoc",
        alpha=1.0 - num(row["level"]) / 100.0,
    )


def tolerance(row: dict[str, str], column: str) -> tuple[float, float]:
    """``(rtol, atol)`` of one metafor column of one fixture row (see the module docstring)."""
    closed = row["method"] in ("FE", "DL") or column in DATA_ONLY
    rtol = RTOL_CLOSED if closed else RTOL_ITERATIVE
    if column in PVALUES:
        rtol *= max(1.0, -math.log(max(num(row[column]), 5e-324)))
    yi, vi = inputs()[row["case"]]
    k = len(yi)
    if column == "tau2":
        scale = k / np.sum(1.0 / vi)
    elif column == "I2":
        scale = 100.0
    elif column == "H2":
        scale = 1.0
    elif column == "QE":
        scale = k - 1.0
    elif column in LOCATION:
        scale = math.sqrt(1.0 / np.sum(1.0 / vi))
    else:
        scale = 0.0
    return rtol, rtol * scale


def mismatch(got: float, want: float, rtol: float, atol: float) -> bool:
    if math.isnan(want) or math.isinf(want):
        return not (got == want or (math.isnan(want) and math.isnan(got)))
    return not abs(got - want) <= rtol * abs(want) + atol


# ----------------------------------------------------------------- the fixtures themselves


def test_fixtures__name_their_r_and_metafor_versions():
    for path in (INPUTS, RESULTS):
        comments, _ = read_csv(path)
        assert comments, path
        assert comments[0].startswith("# R ") and ", metafor " in comments[0], comments[0]
        assert "tests/r/metafor_reference.R" in comments[0]


def test_fixtures__cover_the_cases_and_every_method_and_test():
    data = inputs()
    ks = {case: len(y) for case, (y, _) in data.items()}
    assert {2, 3, 500} <= set(ks.values())
    _, vi = data["vi_span"]
    assert vi.min() == pytest.approx(1e-4) and vi.max() == pytest.approx(1e5)
    y, _ = data["identical"]
    assert np.all(y == y[0])
    seen = {(r["case"], r["method"], r["test"]) for r in results()}
    assert seen == {(c, m, t) for c in data for m in METHODS for t in TESTS}
    tau0 = [r for r in results() if r["case"] in ("tau0", "k2_homog", "identical") and r["method"] != "FE"]
    assert tau0 and all(num(r["tau2"]) == 0.0 for r in tau0)


# ----------------------------------------------------------------- parity


@pytest.mark.parametrize("row", results(), ids=row_id)
def test_meta_analysis__matches_metafor(row):
    res = deepmr_fit(row)
    assert res.reason[0] == ""
    assert res.k[0] == int(row["k"])
    bad = []
    for column, field in FIELDS.items():
        want = num(row[column])
        got = float(getattr(res, field)[0])
        rtol, atol = tolerance(row, column)
        if mismatch(got, want, rtol, atol):
            bad.append(f"{column}: deepmr {got!r} metafor {want!r} (rtol {rtol:g}, atol {atol:.3g})")
    assert not bad, "\n".join(bad)


def test_meta_analysis__fixed_effect_has_no_prediction_interval_as_metafor():
    rows = [r for r in results() if r["method"] == "FE"]
    assert rows and all(r["pi.lb"] == "NA" and r["pi.ub"] == "NA" for r in rows)


def test_hartung_knapp__identical_estimates_give_zero_se_as_metafor():
    # metafor sets s2w = 0 when the weighted RSS is below machine epsilon; adhoc truncates at 1
    for row in results():
        if row["case"] != "identical" or row["test"] == "z":
            continue
        res = deepmr_fit(row)
        if row["test"] == "knha":
            assert num(row["se"]) == 0.0 and res.se[0] == 0.0
        else:
            assert num(row["se"]) > 0.0
            np.testing.assert_allclose(res.se[0], num(row["se"]), rtol=1e-12)


# ----------------------------------------------------------------- regeneration


def _r_with_metafor() -> bool:
    if shutil.which("Rscript") is None:
        return False
    probe = subprocess.run(
        ["Rscript", "-e", "cat(requireNamespace('metafor', quietly = TRUE))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.returncode == 0 and probe.stdout.strip().endswith("TRUE")


def test_fixtures__are_what_the_r_script_writes_now(tmp_path):
    if not _r_with_metafor():
        pytest.skip("Rscript with metafor not available")
    # the same R and metafor: equal here (byte for byte on the machine that wrote them), up to BLAS / libm
    # round-off elsewhere, which metafor's matrix formulas amplify to ~3e-10 on vi_span
    assert_script_rewrites(SCRIPT, (INPUTS.name, RESULTS.name), tmp_path, rtol=1e-9)
