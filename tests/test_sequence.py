"""Sequence encoding and loading from FASTA, BED + genome, and one-hot arrays."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
import torch

from deepmr_dist.errors import InputError
from deepmr_dist.io.sequence import (
    IUPAC_CODES,
    codes_to_onehot,
    decode,
    encode,
    read_bed,
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


# ----------------------------------------------------------------------------- compressed and binary files


def _bgzip(path, data: bytes):
    """Write ``data`` BGZF-compressed (as samtools' bgzip does) with Biopython's writer."""
    from Bio import bgzf

    with bgzf.BgzfWriter(str(path), "wb") as writer:
        writer.write(data)
    return path


def test_read_fasta__gzip_and_bgzip_read_as_the_plain_file(tmp_path):
    # 800 records of 100 bp: 89 kB of text, more than one 64 kB BGZF block
    rng = np.random.default_rng(0)
    records = ["".join(rng.choice(list("ACGT"), 100)) for _ in range(800)]
    text = "".join(f">r{i}\n{seq[:60]}\n{seq[60:]}\n" for i, seq in enumerate(records))
    (tmp_path / "plain.fa").write_text(text)
    with gzip.open(tmp_path / "loci.fa.gz", "wt") as handle:
        handle.write(text)
    _bgzip(tmp_path / "loci.bgz.fa.gz", text.encode())
    expected = np.array([["ACGT".index(b) for b in seq] for seq in records], dtype=np.int8)
    for name in ("plain.fa", "loci.fa.gz", "loci.bgz.fa.gz"):
        ds = read_fasta(tmp_path / name)
        assert ds.locus.values.tolist() == [f"r{i}" for i in range(800)], name
        np.testing.assert_array_equal(ds.sequence.values, expected, err_msg=name)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(256)) * 4, r"bin.fa: not a FASTA file: byte 0x80 at the start is not text"),
        (b">a\nACGT\n>b\nAC\x00T\n", r"bin.fa:4: a NUL byte: this is a binary file, not a FASTA file"),
        (gzip.compress(b">a\nACGT\n" * 1000)[:-20], r"bin.fa: damaged gzip data after line \d+"),
        (gzip.compress(bytes(range(256)) * 4), r"bin.fa: not a FASTA file: byte 0x80 at the start is not text"),
    ],
    ids=["binary", "nul-byte", "truncated-gzip", "gzip-of-binary"],
)
def test_read_fasta__binary_or_damaged_file_is_one_line(tmp_path, content, match):
    path = tmp_path / "bin.fa"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_fasta(path)
    assert "\n" not in str(err.value)


def test_read_bed_regions__bgzip_genome_reads_as_the_plain_one_and_plain_gzip_is_refused(tmp_path):
    genome = _genome(tmp_path)
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t10\t20\tpeak1\nchr2\t10\t20\n")
    compressed = _bgzip(tmp_path / "genome.fa.gz", genome.read_bytes())
    plain, bgz = read_bed_regions(bed, genome, width=8), read_bed_regions(bed, compressed, width=8)
    np.testing.assert_array_equal(bgz.sequence.values, plain.sequence.values)
    assert decode(bgz.sequence.values[1]) == ("GGGGCCCCAA" * 3)[11:19]
    gz = tmp_path / "genome.gz.fa.gz"
    gz.write_bytes(gzip.compress(genome.read_bytes()))
    with pytest.raises(InputError, match=r"genome FASTA .*genome.gz.fa.gz cannot be indexed: .*bgzip") as err:
        read_bed_regions(bed, gz, width=8)
    assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- soft-masking and IUPAC codes


def test_read_fasta__soft_masked_bases_are_bases(tmp_path):
    path = tmp_path / "masked.fa"
    path.write_text(">a\nacgtnACGTN\n>b\nAAAAaaaaCC\n")
    ds = read_fasta(path)
    assert ds.sequence.values.tolist() == [[0, 1, 2, 3, 4] * 2, [0] * 8 + [1, 1]]


def test_read_bed_regions__soft_masked_genome_reads_as_upper_case(tmp_path):
    genome = tmp_path / "masked.fa"
    genome.write_text(">chr1\nACGTacgtACGTacgt\n")
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t2\t8\n")
    ds = read_bed_regions(bed, genome, width=6)  # centre 5: [2, 8)
    assert decode(ds.sequence.values[0]) == "GTACGT"


def test_read_fasta__iupac_codes_become_n_with_a_count_per_record(tmp_path, caplog):
    path = tmp_path / "iupac.fa"
    # 'a': R, y (2 codes); 'b': all ten codes in upper and lower case (20); 'c': none
    path.write_text(f">a\nARyN{'A' * 16}\n>b\n{IUPAC_CODES}{IUPAC_CODES.lower()}\n>c\n{'ACGT' * 5}\n")
    with caplog.at_level(logging.WARNING, logger="deepmr_dist"):
        ds = read_fasta(path)
    assert ds.sequence.values.tolist() == [[0, 4, 4, 4] + [0] * 16, [4] * 20, [0, 1, 2, 3] * 5]
    warnings = [r.getMessage() for r in caplog.records if "IUPAC" in r.getMessage()]
    assert warnings == [f"{path}: 22 IUPAC code(s) read as N in 2 record(s): 'a' 2, 'b' 20"]


def test_read_fasta__iupac_error_refuses_naming_record_code_and_position(tmp_path):
    path = tmp_path / "iupac.fa"
    path.write_text(">a\nACGT\n>b\nACsK\n")
    with pytest.raises(InputError, match=r"record 'b' in .*iupac.fa: IUPAC code 's' at position 3 \(2 IUPAC code\(s\)"):
        read_fasta(path, iupac="error")
    with pytest.raises(InputError, match=r"iupac must be one of n, error, got 'N'"):
        read_fasta(path, iupac="N")


def test_read_bed_regions__iupac_in_the_genome_follows_the_option(tmp_path, caplog):
    genome = tmp_path / "genome.fa"
    genome.write_text(">chr1\nACGTRYACGT\n")
    bed = tmp_path / "r.bed"
    bed.write_text("chr1\t0\t10\n")
    with caplog.at_level(logging.WARNING, logger="deepmr_dist"):
        ds = read_bed_regions(bed, genome, width=10)
    assert ds.sequence.values.tolist() == [[0, 1, 2, 3, 4, 4, 0, 1, 2, 3]]
    assert any("2 IUPAC code(s) read as N in 1 record(s): 'chr1:0-10' 2" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match=r"record 'chr1:0-10' in .*genome.fa: IUPAC code 'R' at position 5"):
        read_bed_regions(bed, genome, width=10, iupac="error")


# ----------------------------------------------------------------------------- narrowPeak summits


def _narrowpeak(chrom, start, end, summit) -> str:
    """One narrowPeak line: name, score, strand, signal, p, q, then the summit offset (column 10)."""
    return f"{chrom}\t{start}\t{end}\t.\t0\t.\t5.0\t3.0\t2.0\t{summit}\n"


def test_read_bed_regions__narrowpeak_windows_centre_on_the_summit(tmp_path):
    genome = tmp_path / "genome.fa"
    chrom = "".join("ACGT"[(i * 7) % 4] if i % 5 else "N" for i in range(200))
    genome.write_text(f">chr1\n{chrom}\n")
    bed = tmp_path / "peaks.narrowPeak"
    bed.write_text(
        _narrowpeak("chr1", 40, 100, 7)  # summit at 47: window [44, 50)
        + _narrowpeak("chr1", 40, 100, -1)  # no summit: middle 70, window [67, 73)
        + "chr1\t40\t100\tbed12\t0\t+\t40\t100\t0\t2\t10,10\t0,50\n"  # BED12: column 10 is blockCount
    )
    ds = read_bed_regions(bed, genome, width=6)
    assert ds.start.values.tolist() == [44, 67, 67] and ds.end.values.tolist() == [50, 73, 73]
    assert ds.locus.values.tolist() == ["chr1:44-50", "chr1:67-73", "bed12"]
    assert decode(ds.sequence.values[0]) == chrom[44:50]


def test_read_bed__gzip_narrowpeak_is_read(tmp_path):
    path = tmp_path / "peaks.narrowPeak.gz"
    path.write_bytes(gzip.compress((_narrowpeak("chr2", 5, 25, 3) + _narrowpeak("chr2", 30, 50, 19)).encode()))
    table = read_bed(path)
    assert table[["chrom", "start", "end", "summit", "line"]].values.tolist() == [["chr2", 5, 25, 3, 1], ["chr2", 30, 50, 19, 2]]


@pytest.mark.parametrize(
    ("summit", "match"),
    [("20", r"peaks.bed:1: the narrowPeak summit offset 20 \(column 10\) lies outside the peak's 20 bp"),
     ("-2", r"peaks.bed:1: the narrowPeak summit offset -2"),
     ("x", r"peaks.bed:1: the narrowPeak summit \(column 10\) must be an integer, got 'x'")],
)
def test_read_bed__bad_narrowpeak_summit_names_the_line(tmp_path, summit, match):
    path = tmp_path / "peaks.bed"
    path.write_text(_narrowpeak("chr1", 10, 30, summit))
    with pytest.raises(InputError, match=match):
        read_bed(path)


# ----------------------------------------------------------------------------- one-hot files that are not .npy


def test_read_onehot__npz_and_other_files_are_named_with_what_is_expected(tmp_path):
    np.savez(tmp_path / "x.npz", onehot=np.zeros((2, 4, 3)), labels=np.arange(2))
    with pytest.raises(InputError, match=r"x.npz is a zip archive \(.npz, arrays: onehot, labels\), not a .npy array; "
                                         r"expected one one-hot array \(n_loci, 4, length\) saved with numpy.save"):
        read_onehot(tmp_path / "x.npz")
    (tmp_path / "x.npy").write_text(">a\nACGT\n")
    with pytest.raises(InputError, match=r"x.npy is not a .npy file \(no NumPy header\)"):
        read_onehot(tmp_path / "x.npy")
    np.save(tmp_path / "s.npy", np.full((1, 4, 2), "a"))
    with pytest.raises(InputError, match=r"s.npy: expected a numeric one-hot array, got dtype <U1"):
        read_onehot(tmp_path / "s.npy")
