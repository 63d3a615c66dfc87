"""Tests of tabular input/output and validation of summary-statistic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.io.tables import (
    MAX_ISSUES,
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
    assert np.isnan(float(back["value"].iloc[1]))


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
