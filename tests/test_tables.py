"""Tests of tabular input/output and validation of summary-statistic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.schema import TABLE_NA
from deepmr_dist.io.tables import (
    MAX_ISSUES,
    duplicate_message,
    exclusion_message,
    pad_long_table,
    read_meta_table,
    read_mr_table,
    read_table,
    table_format,
    write_table,
)

MR_CSV = """locus,bx,bxse,by,byse
L2,0.1,0.01,0.2,0.02
L1,abc,0.01,0.2,0.02
L1,0.3,-1,0.2,inf
L2, 0.3 ,0.01,NA,0.02
L3,1e-2,0.01,0.5,0.03
L2,0.4,0.02,0.8,0.05
L4,0.4,0.02,0.8,0
"""


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_mr_table__pads_valid_rows_in_first_appearance_order(tmp_path):
    table = read_mr_table(write(tmp_path, "in.csv", MR_CSV))
    assert table.ids == ["L2", "L1", "L3", "L4"]
    assert table.n_valid.tolist() == [2, 0, 1, 0]
    assert table.n_excluded.tolist() == [1, 2, 0, 1]
    assert table["bx"].shape == (4, 2)
    np.testing.assert_array_equal(table["bx"][0], [0.1, 0.4])
    np.testing.assert_array_equal(table["by"][0], [0.2, 0.8])
    assert np.isnan(table["bx"][1]).all()  # a locus with only bad rows stays, empty
    np.testing.assert_array_equal(table["byse"][2], [0.03, np.nan])


def test_read_mr_table__issues_name_row_locus_column_and_value(tmp_path):
    table = read_mr_table(write(tmp_path, "in.csv", MR_CSV))
    issues = {i.row: i for i in table.issues}
    assert sorted(issues) == [2, 3, 4, 7]
    assert issues[2].id == "L1" and "non-numeric value 'abc' in column bx" in issues[2].problem
    assert "bxse = -1 is not positive" in issues[3].problem
    assert "non-finite value inf in column byse" in issues[3].problem
    assert "missing value in column by" in issues[4].problem
    assert "byse = 0 is not positive" in issues[7].problem
    message = exclusion_message(table)
    assert str(table.source) in message and "excluded 4 invalid row(s)" in message
    assert "row 2 (L1)" in message and "n_excluded" in message


def test_no_bad_rows__no_message(tmp_path):
    table = read_mr_table(write(tmp_path, "in.csv", "locus,bx,bxse,by,byse\nA,1,1,1,1\n"))
    assert exclusion_message(table) is None
    assert table.total_excluded == 0


def test_missing_columns__input_error_names_them_and_the_file(tmp_path):
    path = write(tmp_path, "bad.csv", "locus,bx,by\nA,1,2\n")
    with pytest.raises(InputError, match=r"bad\.csv: missing required column\(s\) bxse, byse"):
        read_mr_table(path)


def test_missing_locus__input_error_names_rows(tmp_path):
    path = write(tmp_path, "bad.csv", "locus,bx,bxse,by,byse\nA,1,1,1,1\n,1,1,1,1\n")
    with pytest.raises(InputError, match=r"bad\.csv: 1 row\(s\) without a locus \(data row\(s\) 2\)"):
        read_mr_table(path)


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("absent.csv", None, "file not found"),
        ("empty.csv", "", "empty"),
        ("header_only.csv", "locus,bx,bxse,by,byse\n", "no data rows"),
        ("x.xlsx", "a", "unsupported table type"),
        ("corrupt.parquet", "not parquet", "cannot read as parquet"),
    ],
)
def test_unreadable_inputs__input_error(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=match):
        read_mr_table(path)


def test_meta_table__without_group_column_is_one_group_all(tmp_path):
    table = read_meta_table(write(tmp_path, "m.csv", "estimate,se\n0.1,0.2\n0.3,0.4\n"))
    assert table.ids == ["all"]
    np.testing.assert_array_equal(table["estimate"], [[0.1, 0.3]])


def test_meta_table__groups_and_counts(tmp_path):
    table = read_meta_table(write(tmp_path, "m.csv", "group,estimate,se\ng,0.1,0.2\nh,0.3,-0.4\ng,,0.1\n"))
    assert table.ids == ["g", "h"]
    assert table.n_valid.tolist() == [1, 0]
    assert table.n_excluded.tolist() == [1, 1]
    assert table.exclusion_frame().to_dict("list") == {"group": ["g", "h"], "n_excluded": [1, 1]}


def test_parquet__numeric_and_text_columns_validate_the_same(tmp_path):
    frame = pd.DataFrame(
        {"locus": [1, 1, 2], "bx": [0.1, np.nan, 0.3], "bxse": [0.1, 0.1, 0.1], "by": ["0.2", "x", "0.1"], "byse": [0.1, 0.1, 0.0]}
    )
    path = tmp_path / "in.parquet"
    frame.to_parquet(path)
    table = read_mr_table(path)
    assert table.ids == ["1", "2"]
    assert table.n_valid.tolist() == [1, 0]
    assert table.n_excluded.tolist() == [1, 1]
    assert "missing value in column bx" in table.issues[0].problem
    assert "non-numeric value 'x' in column by" in table.issues[0].problem


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet"])
def test_write_then_read__round_trip(tmp_path, suffix):
    frame = pd.DataFrame({"locus": ["a", "b"], "value": [1.5, np.nan], "reason": ["", "x"]})
    path = tmp_path / "sub" / f"out{suffix}"
    write_table(frame, path)
    back = read_table(path)
    assert back["locus"].tolist() == ["a", "b"]
    assert float(back["value"].iloc[0]) == 1.5
    assert back["reason"].tolist() == ["", "x"]
    if suffix == ".parquet":
        assert np.isnan(back["value"].iloc[1])
    else:  # text tables spell NaN as R does, and every reader (ours, pandas, R) takes it as missing
        assert back["value"].iloc[1] == TABLE_NA == "NA"
        assert np.isnan(pd.read_csv(path, sep="," if suffix == ".csv" else "\t")["value"].iloc[1])
        padded = pad_long_table(back.assign(se=1.0), id_column="locus", value_columns=["value", "se"], se_columns=["se"])
        assert padded.n_excluded.tolist() == [0, 1] and "missing value in column value" in padded.issues[0].problem


def test_table_format__by_suffix():
    assert table_format("x.CSV") == "csv"
    assert table_format("x.csv.gz") == "csv"
    assert table_format("x.tsv") == "tsv"
    assert table_format("dir/x.parquet") == "parquet"


def test_issue_list__is_capped_but_every_row_is_counted():
    n = MAX_ISSUES + 30
    frame = pd.DataFrame({"group": ["g"] * n, "estimate": ["x"] * n, "se": ["1"] * n})
    table = pad_long_table(frame, id_column="group", value_columns=("estimate", "se"), se_columns=("se",))
    assert table.total_excluded == n
    assert len(table.issues) == MAX_ISSUES
    assert f"and {n - 5} more" in exclusion_message(table)


# --------------------------------------------------------------------------- TwoSampleMR's harmonised layout

TWOSAMPLEMR_CSV = """SNP,effect_allele.exposure,beta.exposure,se.exposure,beta.outcome,se.outcome,id.exposure,id.outcome,mr_keep
rs1,A,0.1,0.01,0.2,0.02,ieu-a-2,ieu-a-7,TRUE
rs2,G,-0.3,0.02,-0.5,0.04,ieu-a-2,ieu-a-7,TRUE
rs3,T,0.2,0.01,0.1,0.03,ieu-a-2,ieu-a-7,FALSE
rs1,A,0.1,0.01,0.4,0.05,ieu-a-2,ieu-a-9,TRUE
"""


def test_read_mr_table__twosamplemr_harmonised_columns_are_detected_from_the_header(tmp_path):
    table = read_mr_table(write(tmp_path, "harmonised.csv", TWOSAMPLEMR_CSV))
    assert table.ids == ["ieu-a-2->ieu-a-7", "ieu-a-2->ieu-a-9"]
    np.testing.assert_array_equal(table["bx"][0], [0.1, -0.3])
    np.testing.assert_array_equal(table["bxse"][0], [0.01, 0.02])
    np.testing.assert_array_equal(table["by"][0], [0.2, -0.5])
    np.testing.assert_array_equal(table["byse"][1], [0.05, np.nan])
    assert table.n_excluded.tolist() == [1, 0]  # rs3: mr_keep FALSE, as TwoSampleMR::mr() leaves it out
    assert table.issues[0].row == 3 and "mr_keep = FALSE" in table.issues[0].problem
    assert table.n_duplicates == 0  # rs1 twice, but in two analyses


def test_read_mr_table__twosamplemr_without_analysis_ids_is_one_locus_all(tmp_path):
    text = "SNP,beta.exposure,se.exposure,beta.outcome,se.outcome\nrs1,0.1,0.01,0.2,0.02\nrs2,0.2,0.01,0.3,0.02\n"
    table = read_mr_table(write(tmp_path, "h.tsv", text.replace(",", "\t")))
    assert table.ids == ["all"] and table.n_valid.tolist() == [2]


# --------------------------------------------------------------------------- duplicated rows

DUP_CSV = """locus,bx,bxse,by,byse
A,0.1,0.01,0.2,0.02
A,0.2,0.01,0.3,0.02
B,0.1,0.01,0.2,0.02
A,0.10,0.010,0.2,0.02
A,0.2,0.01,0.3,0.02
A,0.1,-1,0.2,0.02
"""


def test_duplicates__a_repeated_locus_and_values_is_refused_naming_the_first(tmp_path):
    path = write(tmp_path, "dup.csv", DUP_CSV)
    with pytest.raises(InputError, match=r"dup\.csv: data row 4 \(locus A\) duplicates data row 1 \(same locus and values\); "
                       r"2 duplicated row\(s\) in all; --duplicates keep or drop"):  # fmt: skip
        read_mr_table(path)


def test_duplicates__keep_uses_every_row_and_drop_the_first_of_each_both_counted(tmp_path):
    path = write(tmp_path, "dup.csv", DUP_CSV)  # row 3: the same values in another locus; row 6: invalid
    kept, dropped = read_mr_table(path, duplicates="keep"), read_mr_table(path, duplicates="drop")
    assert kept.n_valid.tolist() == [4, 1] and dropped.n_valid.tolist() == [2, 1]
    np.testing.assert_array_equal(dropped["bx"][0], [0.1, 0.2])
    assert kept.n_duplicates == dropped.n_duplicates == 2
    assert kept.n_excluded.tolist() == dropped.n_excluded.tolist() == [1, 0]
    assert duplicate_message(kept) == (
        f"{path}: 2 duplicated row(s) kept as separate rows; the first: row 4 (A): duplicates data row 1 "
        "(same locus and values)"
    )
    assert "dropped (the first of each kept)" in duplicate_message(dropped)
    assert duplicate_message(read_mr_table(write(tmp_path, "ok.csv", MR_CSV))) is None


def test_duplicates__a_repeated_snp_with_other_values_is_a_duplicate(tmp_path):
    text = "locus,SNP,bx,bxse,by,byse\nA,rs1,0.1,0.01,0.2,0.02\nA,rs2,0.3,0.01,0.2,0.02\nA,rs1,0.5,0.01,0.4,0.02\n"
    with pytest.raises(InputError, match=r"data row 3 \(locus A\) duplicates data row 1 \(same locus and SNP\)"):
        read_mr_table(write(tmp_path, "snp.csv", text))


def test_duplicates__meta_rows_repeat_by_group_and_values_or_study(tmp_path):
    text = "group,study,estimate,se\ng,s1,0.1,0.2\ng,s2,0.3,0.2\ng,s1,0.5,0.1\nh,s1,0.1,0.2\n"
    path = write(tmp_path, "m.csv", text)
    with pytest.raises(InputError, match=r"data row 3 \(group g\) duplicates data row 1 \(same group and study\)"):
        read_meta_table(path)
    assert read_meta_table(path, duplicates="drop").n_valid.tolist() == [2, 1]


def test_duplicates__unknown_policy_is_an_input_error():
    frame = pd.DataFrame({"estimate": ["1"], "se": ["1"]})
    with pytest.raises(InputError, match="duplicates must be one of error, keep, drop, got 'first'"):
        pad_long_table(frame, id_column=None, value_columns=["estimate", "se"], duplicates="first")
