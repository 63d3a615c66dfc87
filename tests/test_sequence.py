"""Sequence encoding and loading from FASTA, BED + genome, and one-hot arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmr_dist.errors import InputError
from deepmr_dist.io.sequence import (
    codes_to_onehot,
    decode,
    encode,
    read_bed_regions,
    read_fasta,
    read_onehot,
)


def test_encode__acgtn_any_case_round_trips():
    codes = encode("ACGTNacgtn")
    assert codes.tolist() == [0, 1, 2, 3, 4] * 2
    assert decode(codes) == "ACGTNACGTN"


def test_encode__invalid_character_names_record_and_position():
    with pytest.raises(InputError, match=r"record 'r1'.*'X' at position 3"):
        encode("ACXT", name="r1")


def test_codes_to_onehot__n_is_all_zero_column():
    x = codes_to_onehot(torch.tensor([[0, 1, 2, 3, 4]]))
    expected = np.zeros((1, 4, 5), dtype=np.float32)
    for j, c in enumerate([0, 1, 2, 3]):
        expected[0, c, j] = 1
    assert x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), expected)


def test_read_fasta__multiline_records_become_loci(tmp_path):
    path = tmp_path / "loci.fa"
    path.write_text(">a desc\nACGT\nAC\n>b\nTTTTGG\n")
    ds = read_fasta(path)
    assert ds.locus.values.tolist() == ["a", "b"]
    assert decode(ds.sequence.values[0]) == "ACGTAC"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "contains no records"),
        (">a\nACGT\n>b\nACG\n", "equal length.*'a' has 4 bp.*'b' has 3 bp"),
        (">a\nACGT\n>a\nACGT\n", "'a' occurs more than once"),
        (">a\nACGU\n", "record 'a'.*'U' at position 4"),
        ("ACGT\n", "before the first '>'"),
    ],
)
def test_read_fasta__bad_input_is_named(tmp_path, text, match):
    path = tmp_path / "bad.fa"
    path.write_text(text)
    with pytest.raises(InputError, match=match):
        read_fasta(path)


def _genome(tmp_path):
    path = tmp_path / "genome.fa"
    path.write_text(">chr1\n" + "ACGT" * 25 + "\n>chr2\n" + "GGGGCCCCAA" * 3 + "\n")
    return path


def test_read_bed_regions__windows_are_centred_with_intervals(tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t10\t20\tpeak1\nchr2\t10\t20\n")
    ds = read_bed_regions(bed, _genome(tmp_path), width=8)
    assert ds.locus.values.tolist() == ["peak1", "chr2:11-19"]
    assert ds.start.values.tolist() == [11, 11] and ds.end.values.tolist() == [19, 19]
    assert decode(ds.sequence.values[0]) == ("ACGT" * 25)[11:19]
    assert decode(ds.sequence.values[1]) == ("GGGGCCCCAA" * 3)[11:19]


def test_read_bed_regions__past_chromosome_end_names_line(tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t10\t20\nchr2\t25\t30\n")
    with pytest.raises(InputError, match=r"r.bed:2: .*runs past the end of chr2"):
        read_bed_regions(bed, _genome(tmp_path), width=10)


def test_read_bed_regions__unknown_chromosome_names_line(tmp_path):
    bed = tmp_path / "r.bed"
    bed.write_text("chrX\t10\t20\n")
    with pytest.raises(InputError, match=r"r.bed:1: chromosome 'chrX' is not in the genome"):
        read_bed_regions(bed, _genome(tmp_path), width=4)


def test_read_onehot__zero_columns_are_n_and_bad_shapes_fail(tmp_path):
    x = np.zeros((2, 4, 3), dtype=np.float32)
    x[0, 0, 0] = x[0, 3, 1] = x[1, 2, :] = 1
    np.save(tmp_path / "x.npy", x)
    ds = read_onehot(tmp_path / "x.npy")
    assert ds.sequence.values.tolist() == [[0, 3, 4], [2, 2, 2]]
    np.save(tmp_path / "bad.npy", np.zeros((2, 5, 3)))
    with pytest.raises(InputError, match=r"bad.npy: expected a one-hot array"):
        read_onehot(tmp_path / "bad.npy")
