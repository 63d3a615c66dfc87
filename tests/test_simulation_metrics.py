"""Simulation metrics (local coverage, Table 1) on hand-computed inputs, and the Fig 2 plots."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.figures import (
    POINTS_GID,
    bias_figure,
    global_ce_figure,
    local_coverage_figure,
    save_figures,
)
from deepmr_dist.simulation.metrics import (
    PAPER_TABLE1,
    local_coverage,
    local_coverage_counts,
    method_table,
    method_table_markdown,
    table1,
    table1_markdown,
)

# ----------------------------------------------------------------------------- local coverage


@pytest.fixture
def local_and_truth() -> tuple[pd.DataFrame, pd.Series]:
    local = pd.DataFrame(
        {
            "locus": ["d", "a", "c", "b", "e", "x", "g"],
            "ci_lower": [0.0, 0.0, 1.0, np.nan, -1.0, 0.0, 0.0],
            "ci_upper": [2.0, 1.0, 3.0, 1.0, 0.0, 1.0, 1.0],
        }
    )
    # a: 1.0 on the upper bound (held), b: NaN CI, c: 0.5 outside, d: 2.0 on the bound (held), e: 5 outside,
    # x: no true CE (no exposure motif), g: NaN true CE, f: true CE but no estimate
    truth = pd.Series({"a": 1.0, "b": 0.5, "c": 0.5, "d": 2.0, "e": 5.0, "f": 0.0, "g": np.nan})
    return local, truth


def test_local_coverage__matches_loci_by_id_and_counts_every_left_out_locus(local_and_truth):
    local, truth = local_and_truth
    counts = local_coverage_counts(local, truth)
    assert (counts.n_covered, counts.n_evaluated) == (2, 4)  # a and d of a, c, d, e
    assert counts.coverage == local_coverage(local, truth) == 0.5
    assert (counts.n_nan_ci, counts.n_without_truth, counts.n_without_estimate) == (1, 2, 1)  # b; x, g; f
    # row order does not matter; pairing rows by position (the original defect) would give another answer
    shuffled = local.sample(frac=1.0, random_state=3)
    assert local_coverage(shuffled, truth.iloc[::-1]) == 0.5
    by_row = np.mean((local["ci_lower"].to_numpy()[:5] <= truth.to_numpy()[:5])
                     & (truth.to_numpy()[:5] <= local["ci_upper"].to_numpy()[:5]))
    assert by_row != 0.5


def test_local_coverage__no_evaluable_locus_gives_nan():
    local = pd.DataFrame({"locus": ["a"], "ci_lower": [np.nan], "ci_upper": [np.nan]})
    counts = local_coverage_counts(local, pd.Series({"a": 1.0}))
    assert math.isnan(counts.coverage) and counts.n_nan_ci == 1 and counts.n_evaluated == 0


def test_local_coverage__bad_inputs_name_what_is_wrong(local_and_truth):
    local, truth = local_and_truth
    with pytest.raises(InputError, match=r"lack column\(s\) \['ci_upper'\]"):
        local_coverage(local.drop(columns="ci_upper"), truth)
    with pytest.raises(InputError, match="local estimates repeat locus id.*'a'"):
        local_coverage(pd.concat([local, local.iloc[[1]]]), truth)
    with pytest.raises(InputError, match="truth repeat locus id"):
        local_coverage(local, pd.concat([truth, truth.iloc[[0]]]))
    with pytest.raises(InputError, match="1 loci have ci_lower > ci_upper.*'a'"):
        local_coverage(local.assign(ci_lower=[0.0, 2.0, 1.0, np.nan, -1.0, 0.0, 0.0]), truth)
    with pytest.raises(InputError, match="share no locus id"):
        local_coverage(local, truth.reset_index(drop=True))  # truth indexed by row number
    with pytest.raises(InputError, match="pandas Series"):
        local_coverage(local, truth.to_dict())


# ----------------------------------------------------------------------------- Table 1


def _rounds() -> pd.DataFrame:
    """Scenario 1 with four rounds and scenario 3 with three (one of them undefined for the baseline)."""
    rows = []
    truth_1 = [1.0, 2.0, 4.0, 7.0]
    egger_1 = [1.1, 2.3, 3.5, 7.4]
    baseline_1 = [0.5, 2.5, 3.0, 8.0]
    for r in range(4):
        rows.append((1, r, "egger_paper", egger_1[r], 0.3, egger_1[r] - 0.2, egger_1[r] + 0.2, truth_1[r],
                     [0.9, 0.8, np.nan, 0.7][r]))
        rows.append((1, r, "wald_mean", baseline_1[r], 0.5, baseline_1[r] - 1.0, baseline_1[r] + 1.0, truth_1[r], np.nan))
        rows.append((1, r, "ivw", 0.0, 0.1, -0.1, 0.1, truth_1[r], np.nan))  # another method: ignored
    truth_3 = [0.0, 1.0, 3.0]
    egger_3 = [0.2, 0.6, 3.1]
    baseline_3 = [0.1, np.nan, 2.0]
    baseline_tau_3 = [0.6, 0.6, 0.4]
    for r in range(3):
        rows.append((3, r + 10, "egger_paper", egger_3[r], 0.1, egger_3[r] - 0.15, egger_3[r] + 0.15, truth_3[r], 0.85))
        rows.append((3, r + 10, "wald_mean", baseline_3[r], baseline_tau_3[r], baseline_3[r] - 1.2, baseline_3[r] + 1.2, truth_3[r],
                     np.nan))
    columns = ["scenario", "round", "method", "estimate", "tau", "ci_lower", "ci_upper", "true_ce", "local_coverage"]
    return pd.DataFrame(rows, columns=columns)


def test_table1__hand_computed_accuracy_and_coverages():
    table = table1(_rounds())
    assert list(table.index) == [1, 3]
    one, three = table.loc[1], table.loc[3]
    assert one["scenario_name"] == "unconfounded" and one["n_rounds"] == 4
    assert one["accuracy_mr"] == pytest.approx(np.corrcoef([1.1, 2.3, 3.5, 7.4], [1, 2, 4, 7])[0, 1] ** 2, rel=1e-12)
    assert one["accuracy_baseline"] == pytest.approx(np.corrcoef([0.5, 2.5, 3.0, 8.0], [1, 2, 4, 7])[0, 1] ** 2,
                                                     rel=1e-12)
    # |true - estimate| for egger: 0.1, 0.3, 0.5, 0.4 against 2 tau = 0.6 -> all held; CI +-0.2 holds only round 0
    assert one["coverage_mr"] == 1.0 and one["ci_coverage_mr"] == 0.25
    # baseline: 0.5, 0.5, 1.0, 1.0 against 2 tau = 1.0 -> all held (bounds inclusive); CI +-1.0 -> all held
    assert one["coverage_baseline"] == 1.0 and one["ci_coverage_baseline"] == 1.0
    assert one["local_coverage"] == pytest.approx(0.8)  # mean of 0.9, 0.8, 0.7; the NaN round left out
    assert one["n_undefined_mr"] == 0 and one["n_undefined_baseline"] == 0
    # scenario 3: egger |diff| 0.2, 0.4, 0.1 vs 0.2 -> rounds 10 and 12 held; baseline defined on 2 rounds only
    assert three["coverage_mr"] == pytest.approx(2 / 3) and three["ci_coverage_mr"] == pytest.approx(1 / 3)
    assert three["accuracy_mr"] == pytest.approx(np.corrcoef([0.2, 0.6, 3.1], [0, 1, 3])[0, 1] ** 2, rel=1e-12)
    assert three["n_undefined_baseline"] == 1 and math.isnan(three["accuracy_baseline"])  # R^2 needs 3 rounds
    # baseline rounds 10 and 12: |0.1| <= 2 tau = 1.2 held, |1.0| > 0.8 not; both inside their CI of +-1.2
    assert three["coverage_baseline"] == 0.5 and three["ci_coverage_baseline"] == 1.0
    for key, value in PAPER_TABLE1[3].items():
        assert three[f"paper_{key}"] == value
    assert table.attrs == {"mr_method": "egger_paper", "baseline_method": "wald_mean"}


def test_table1__markdown_puts_ours_beside_the_papers():
    text = table1_markdown(table1(_rounds()))
    lines = text.splitlines()
    assert lines[0].startswith("| scenario | rounds | global CE accuracy R² (egger_paper / wald_mean) | paper |")
    assert lines[2].startswith("| 1 unconfounded | 4 | ")
    assert "| 0.97 / 0.98 |" in lines[2] and "| 1.00 / 1.00 |" in lines[2] and lines[2].endswith("| 0.80 | 0.87 |")
    assert "| 0.97 / 0.98 |" in lines[3] and "/ n/a |" in lines[3]  # scenario 3 baseline R^2 not computable
    assert "Scenario 3: rounds without a finite estimate: wald_mean 1." in text


def test_table1__bad_rounds_name_what_is_wrong():
    rounds = _rounds()
    with pytest.raises(InputError, match=r"lacks column\(s\) \['tau'\]"):
        table1(rounds.drop(columns="tau"))
    with pytest.raises(InputError, match=r"1 repeated .* first scenario 1, round 0, method 'egger_paper'"):
        table1(pd.concat([rounds, rounds.iloc[[0]]]))
    with pytest.raises(InputError, match=r"unknown scenario\(s\) \[7\]"):
        table1(rounds.assign(scenario=rounds["scenario"].replace(3, 7)))
    with pytest.raises(InputError, match="no row of method 'robust_egger'"):
        table1(rounds, method="robust_egger")
    disagreeing = rounds.copy()
    disagreeing.loc[1, "true_ce"] = 9.0
    with pytest.raises(InputError, match=r"disagree on the true CE of \(scenario, round\) \(1, 0\)$"):
        table1(disagreeing)
    with pytest.raises(InputError, match="'estimate' must be numeric"):
        table1(rounds.assign(estimate="high"))


# ----------------------------------------------------------------------------- Fig 2


def _points(ax) -> int:
    (line,) = [line for line in ax.get_lines() if line.get_gid() == POINTS_GID]
    return len(line.get_xdata())


def test_figures__panels_hold_one_point_per_round():
    rounds = _rounds()
    fig = global_ce_figure(rounds)
    axes = np.array(fig.axes).reshape(2, 2)  # rows: egger_paper, wald_mean; columns: scenarios 1, 3
    assert [[_points(ax) for ax in row] for row in axes] == [[4, 3], [4, 2]]
    assert axes[0, 1].get_title() == "sequence: egger_paper"
    estimates = next(l for l in axes[0, 0].get_lines() if l.get_gid() == POINTS_GID)
    np.testing.assert_array_equal(estimates.get_xdata(), [1.0, 2.0, 4.0, 7.0])
    np.testing.assert_array_equal(estimates.get_ydata(), [1.1, 2.3, 3.5, 7.4])
    local = local_coverage_figure(rounds)
    assert [_points(ax) for ax in local.axes] == [3, 3]


def test_figures__save_writes_non_empty_pngs(tmp_path):
    paths = save_figures(_rounds(), tmp_path / "figures")
    assert [p.name for p in paths] == ["fig2a_global_ce.png", "fig2b_local_coverage.png", "fig2c_bias.png"]
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures__unknown_method_is_refused():
    with pytest.raises(InputError, match="no row of method 'mode'"):
        global_ce_figure(_rounds(), baseline="mode")


def test_method_table__hand_computed_bias_and_coverage_of_every_method():
    table = method_table(_rounds())
    assert list(table.index) == [(1, "egger_paper"), (1, "ivw"), (1, "wald_mean"), (3, "egger_paper"), (3, "wald_mean")]
    egger = table.loc[(1, "egger_paper")]
    # bias: mean of (1.1 - 1, 2.3 - 2, 3.5 - 4, 7.4 - 7) = 0.3 / 4; relative to the mean truth 3.5
    assert egger["bias"] == pytest.approx(0.075, rel=1e-12)
    assert egger["relative_bias"] == pytest.approx(0.075 / 3.5, rel=1e-12)
    # CIs +- 0.2: 1 in [0.9, 1.3], 2 not in [2.1, 2.5], 4 not in [3.3, 3.7], 7 not in [7.2, 7.6]
    assert egger["ci_coverage"] == 0.25
    assert egger["local_coverage"] == pytest.approx(0.8, rel=1e-12)
    ivw = table.loc[(1, "ivw")]
    assert ivw["bias"] == pytest.approx(-3.5) and ivw["relative_bias"] == pytest.approx(-1.0) and ivw["ci_coverage"] == 0.0
    baseline = table.loc[(3, "wald_mean")]
    assert (baseline["n_rounds"], baseline["n_defined"]) == (3, 2)
    assert baseline["bias"] == pytest.approx(((0.1 - 0.0) + (2.0 - 3.0)) / 2, rel=1e-12)
    assert baseline["relative_bias"] == pytest.approx(-0.45 / 1.5, rel=1e-12)
    text = method_table_markdown(table)
    assert "| 1 unconfounded | egger_paper | 4 | +0.075 | +2.1 % | 0.25 | 0.80 |" in text
    assert "| 3 sequence | wald_mean | 2 of 3 |" in text


def test_bias_figure__one_point_per_defined_round_and_method():
    fig = bias_figure(_rounds())
    counts = [[len(c.lines[0].get_xdata()) for c in ax.containers] for ax in fig.axes]
    # scenario 1: egger_paper, ivw, wald_mean 4 rounds each; scenario 3: truth 0 in round 10 is left out
    # (no relative bias), and wald_mean is undefined in round 11
    assert counts == [[4, 4, 4], [2, 1]]
