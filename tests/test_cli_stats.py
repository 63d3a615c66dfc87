"""Tests of the ``deepmr mr`` and ``deepmr meta`` subcommands, run through the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from deepmr_dist.cli import main
from deepmr_dist.meta import meta_analysis
from deepmr_dist.schema import TABLE_NA

MR_COLUMNS = [
    "locus", "method", "n", "estimate", "se", "ci_lower", "ci_upper", "pvalue",
    "intercept", "intercept_se", "intercept_ci_lower", "intercept_ci_upper", "intercept_pvalue",
    "rse", "q", "q_pvalue", "i2", "i2gx", "fstat", "reason", "note", "n_excluded",
]  # fmt: skip
META_COLUMNS = [
    "group", "method", "k", "estimate", "se", "ci_lower", "ci_upper", "pvalue",
    "tau2", "i2", "h2", "q", "q_pvalue", "pi_lower", "pi_upper", "reason", "n_excluded",
]  # fmt: skip

REPO = Path(__file__).resolve().parents[1]


def mr_input(seed=0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for locus, k in (("chr1:100", 8), ("chr2:5", 5), ("chr3:7", 12)):
        bx = rng.normal(0.5, 0.2, k) * rng.choice([-1, 1], k)
        bxse = rng.uniform(0.02, 0.05, k)
        byse = rng.uniform(0.02, 0.05, k)
        by = 1.5 * bx + rng.normal(0, byse)
        rows += [dict(locus=locus, bx=a, bxse=b, by=c, byse=d) for a, b, c, d in zip(bx, bxse, by, byse)]
    return pd.DataFrame(rows)


def padded(frame: pd.DataFrame, id_col: str, cols: list[str]):
    ids = list(dict.fromkeys(frame[id_col]))
    width = frame.groupby(id_col).size().max()
    arrays = {c: np.full((len(ids), width), np.nan) for c in cols}
    for i, g in enumerate(ids):
        sub = frame[frame[id_col] == g]
        for c in cols:
            arrays[c][i, : len(sub)] = sub[c].to_numpy(float)
    return ids, arrays


def test_mr__one_row_per_locus_and_method_matching_the_kernels(tmp_path):
    import deepmr_dist.mr as mr

    frame = mr_input()
    frame.to_csv(tmp_path / "in.csv", index=False)
    rc = main(["mr", str(tmp_path / "in.csv"), "--method", "ivw,egger", "--out", str(tmp_path / "out.csv")])
    assert rc == 0
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False, na_values=[TABLE_NA])
    assert list(out.columns) == MR_COLUMNS
    assert out["locus"].tolist() == ["chr1:100"] * 2 + ["chr2:5"] * 2 + ["chr3:7"] * 2
    assert out["method"].tolist() == ["ivw", "egger"] * 3
    ids, arr = padded(frame, "locus", ["bx", "bxse", "by", "byse"])
    ref = mr.estimate(arr["bx"], arr["bxse"], arr["by"], arr["byse"], methods=("ivw", "egger"))
    for method in ("ivw", "egger"):
        got = out[out["method"] == method]
        np.testing.assert_allclose(got["estimate"], ref[method].estimate, rtol=1e-12)
        np.testing.assert_allclose(got["se"], ref[method].se, rtol=1e-12)
        np.testing.assert_array_equal(got["n"], ref[method].n)
    assert (out["n_excluded"] == 0).all()


def test_mr__options_reach_the_kernels(tmp_path):
    import deepmr_dist.mr as mr

    frame = mr_input(seed=4)
    frame.to_csv(tmp_path / "in.csv", index=False)
    argv = ["mr", str(tmp_path / "in.csv"), "--method", "egger,weighted_median", "--t-dist", "--n-boot", "40",
            "--seed", "9", "--alpha", "0.1", "--out", str(tmp_path / "out.csv")]  # fmt: skip
    assert main(argv) == 0
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False, na_values=[TABLE_NA])
    _, arr = padded(frame, "locus", ["bx", "bxse", "by", "byse"])
    ref = mr.estimate(
        arr["bx"], arr["bxse"], arr["by"], arr["byse"], methods=("egger", "weighted_median"),
        alpha=0.1, egger_t_dist=True, t_dist=True, n_boot=40, seed=9,
    )  # fmt: skip
    for method in ("egger", "weighted_median"):
        got = out[out["method"] == method]
        for col in ("estimate", "se", "ci_lower", "ci_upper", "pvalue"):
            np.testing.assert_allclose(got[col], getattr(ref[method], col), rtol=1e-12)


def test_mr__invalid_rows_are_excluded_counted_and_reported(tmp_path, capsys):
    frame = mr_input().astype(object)
    frame.loc[1, "bx"] = "oops"
    frame.loc[20, "byse"] = -0.1
    frame.to_csv(tmp_path / "in.csv", index=False)
    rc = main(["mr", str(tmp_path / "in.csv"), "--method", "ivw", "--out", str(tmp_path / "out.parquet")])
    assert rc == 0
    err = capsys.readouterr().err
    assert "excluded 2 invalid row(s)" in err and "row 2 (chr1:100)" in err and "'oops'" in err
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out.set_index("locus")["n_excluded"].to_dict() == {"chr1:100": 1, "chr2:5": 0, "chr3:7": 1}
    assert out.set_index("locus")["n"].to_dict() == {"chr1:100": 7, "chr2:5": 5, "chr3:7": 11}


def test_mr__unknown_method_lists_valid_ones(tmp_path, capsys):
    mr_input().to_csv(tmp_path / "in.csv", index=False)
    rc = main(["mr", str(tmp_path / "in.csv"), "--method", "ivw,bogus", "--out", str(tmp_path / "o.csv")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "--method: unknown MR method(s) 'bogus'; valid: " in err and "ivw" in err and "egger" in err
    assert not (tmp_path / "o.csv").exists()


def test_mr__missing_column_is_one_line_error(tmp_path, capsys):
    mr_input().drop(columns="byse").to_csv(tmp_path / "in.csv", index=False)
    rc = main(["mr", str(tmp_path / "in.csv"), "--out", str(tmp_path / "o.csv")])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "in.csv: missing required column(s) byse" in err


def meta_input() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    for group, k in (("g1", 6), ("g2", 1), ("g3", 9)):
        se = rng.uniform(0.1, 0.3, k)
        est = 0.2 + rng.normal(0, 0.2, k) + rng.normal(0, se)
        rows += [dict(group=group, estimate=e, se=s) for e, s in zip(est, se)]
    return pd.DataFrame(rows)


def test_meta__rows_per_group_and_method_with_hksj_variants(tmp_path):
    frame = meta_input()
    frame.to_parquet(tmp_path / "in.parquet")
    rc = main(["meta", str(tmp_path / "in.parquet"), "--method", "fe,reml", "--hksj", "--out", str(tmp_path / "out.csv")])
    assert rc == 0
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False, na_values=[TABLE_NA])
    assert list(out.columns) == META_COLUMNS
    labels = ["fe", "fe_hksj", "fe_hksj_adhoc", "reml", "reml_hksj", "reml_hksj_adhoc"]
    assert out["method"].tolist() == labels * 3
    assert out["group"].tolist() == [g for g in ("g1", "g2", "g3") for _ in labels]
    ids, arr = padded(frame, "group", ["estimate", "se"])
    for label in labels:
        method = label.split("_")[0]
        ref = meta_analysis(arr["estimate"], arr["se"], method, hksj=label.endswith("_hksj"), hksj_adhoc=label.endswith("adhoc"))
        got = out[out["method"] == label]
        np.testing.assert_allclose(got["estimate"], ref.estimate, rtol=1e-12)
        np.testing.assert_allclose(got["se"], ref.se, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(got["tau2"], ref.tau2, rtol=1e-12)
        assert got["reason"].fillna("").tolist() == list(ref.reason)  # no reason ('': defined) is written NA
    g2 = out[(out["group"] == "g2") & (out["method"] == "reml_hksj")].iloc[0]
    assert g2["reason"] == "hksj_needs_k2" and np.isnan(g2["se"])


def test_meta__without_group_column_is_group_all(tmp_path):
    meta_input().drop(columns="group").to_csv(tmp_path / "in.csv", index=False)
    rc = main(["meta", str(tmp_path / "in.csv"), "--method", "dl", "--out", str(tmp_path / "out.parquet")])
    assert rc == 0
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert out["group"].tolist() == ["all"] and out["k"].tolist() == [16]


def test_meta__unknown_method_and_bad_alpha(tmp_path, capsys):
    meta_input().to_csv(tmp_path / "in.csv", index=False)
    assert main(["meta", str(tmp_path / "in.csv"), "--method", "sj", "--out", str(tmp_path / "o.csv")]) == 1
    assert "--method: unknown meta-analysis method 'sj'; valid: fe, dl, reml, pm" in capsys.readouterr().err
    assert main(["meta", str(tmp_path / "in.csv"), "--alpha", "2", "--out", str(tmp_path / "o.csv")]) == 1
    assert "--alpha" in capsys.readouterr().err


def test_meta__runs_as_a_subprocess(tmp_path):
    meta_input().to_csv(tmp_path / "in.csv", index=False)
    if (REPO / "deepmr_dist" / "cli" / "__main__.py").exists():
        launcher = ["-m", "deepmr_dist.cli"]
    else:  # the package has no __main__ yet: call the same entry point the console script uses
        launcher = ["-c", "import sys; from deepmr_dist.cli import main; sys.exit(main())"]
    proc = subprocess.run(
        [sys.executable, *launcher, "meta", str(tmp_path / "in.csv"), "--method", "dl,pm", "--out", str(tmp_path / "o.tsv")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = pd.read_csv(tmp_path / "o.tsv", sep="\t")
    assert len(out) == 6
    assert out["method"].tolist() == ["dl", "pm"] * 3


def test_mr__help_lists_every_method(capsys):
    import deepmr_dist.mr as mr

    with pytest.raises(SystemExit):
        main(["mr", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(m in text for m in mr.METHODS), text


def test_mr__missing_numbers_and_empty_codes_are_written_NA_as_r_writes_them(tmp_path):
    mr_input().to_csv(tmp_path / "in.csv", index=False)
    assert main(["mr", str(tmp_path / "in.csv"), "--method", "ivw", "--out", str(tmp_path / "out.csv")]) == 0
    lines = (tmp_path / "out.csv").read_text().splitlines()
    header, first = lines[0].split(","), lines[1].split(",")
    assert first[header.index("intercept")] == TABLE_NA == "NA"  # IVW has no intercept
    assert first[header.index("reason")] == first[header.index("note")] == TABLE_NA  # no code: missing, as a number
    assert "NaN" not in (tmp_path / "out.csv").read_text()
    assert all(cell for line in lines for cell in line.split(","))  # no empty cell: one spelling of missing


def test_mr__twosamplemr_harmonised_table_gives_the_native_tables_results(tmp_path):
    frame = mr_input()
    frame.to_csv(tmp_path / "native.csv", index=False)
    harmonised = pd.DataFrame({
        "SNP": [f"rs{i}" for i in range(len(frame))], "beta.exposure": frame["bx"], "se.exposure": frame["bxse"],
        "beta.outcome": frame["by"], "se.outcome": frame["byse"], "id.exposure": "ldl",
        "id.outcome": frame["locus"], "mr_keep": True,
    })  # fmt: skip
    harmonised.to_parquet(tmp_path / "harmonised.parquet")
    for name in ("native.csv", "harmonised.parquet"):
        assert main(["mr", str(tmp_path / name), "--method", "ivw,egger", "--out", str(tmp_path / f"{name}.out.parquet")]) == 0
    native = pd.read_parquet(tmp_path / "native.csv.out.parquet")
    two = pd.read_parquet(tmp_path / "harmonised.parquet.out.parquet")
    assert two["locus"].tolist() == [f"ldl->{locus}" for locus in native["locus"]]
    pd.testing.assert_frame_equal(two.drop(columns="locus"), native.drop(columns="locus"))


def test_mr__duplicated_rows_stop_in_one_line_or_are_kept_or_dropped_with_a_log_line(tmp_path, capsys):
    frame = mr_input()
    pd.concat([frame, frame.iloc[[3, 4]]]).to_csv(tmp_path / "in.csv", index=False)
    out = str(tmp_path / "out.csv")
    assert main(["mr", str(tmp_path / "in.csv"), "--out", out]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "deepmr mr: error:" in err
    assert "data row 26 (locus chr1:100) duplicates data row 4 (same locus and values)" in err
    counts = {}
    for policy in ("keep", "drop"):
        assert main(["mr", str(tmp_path / "in.csv"), "--duplicates", policy, "--out", out]) == 0
        assert "2 duplicated row(s)" in capsys.readouterr().err
        counts[policy] = pd.read_csv(out).set_index("locus")["n"]["chr1:100"]
    assert counts == {"keep": 10, "drop": 8}


def test_meta__duplicated_rows_stop_unless_kept_or_dropped(tmp_path, capsys):
    frame = meta_input()
    pd.concat([frame, frame.iloc[[0]]]).to_csv(tmp_path / "in.csv", index=False)
    out = str(tmp_path / "out.csv")
    assert main(["meta", str(tmp_path / "in.csv"), "--out", out]) == 1
    assert "data row 17 (group g1) duplicates data row 1 (same group and values)" in capsys.readouterr().err
    assert main(["meta", str(tmp_path / "in.csv"), "--duplicates", "drop", "--out", out]) == 0
    assert "1 duplicated row(s) dropped" in capsys.readouterr().err
    assert pd.read_csv(out).set_index("group")["k"]["g1"] == 6


@pytest.mark.parametrize("command", ["mr", "meta"])
def test_duplicates_option__help_names_the_default(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--duplicates {error,keep,drop}" in text and "error (default) stops naming the first" in text
