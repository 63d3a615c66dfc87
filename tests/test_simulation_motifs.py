"""Motif loading for the simulation: JASPAR (offline), JASPAR and MEME files, smoothing."""

from __future__ import annotations

import numpy as np
import pytest

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.motifs import (
    DEFAULT_MOTIFS,
    PSEUDOCOUNT,
    Motif,
    MotifSet,
    jaspar_motif,
    read_motif,
    read_motifs,
    resolve_motif,
    smooth,
)

MEME_TEXT = """MEME version 4

ALPHABET= ACGT

strands: + -

Background letter frequencies
A 0.25 C 0.25 G 0.25 T 0.25

MOTIF first alt_name
letter-probability matrix: alength= 4 w= 3 nsites= 20 E= 0
0.1 0.2 0.3 0.4
0.7 0.1 0.1 0.1
0.25 0.25 0.25 0.25

MOTIF second
letter-probability matrix: alength= 4 w= 2 nsites= 20 E= 0
1 0 0 0
0 0 0 1
"""


def test_motifs__defaults_are_pinned_vertebrate_core_matrices():
    from pyjaspar import jaspardb

    database = jaspardb()
    expected_names = {"exposure": "GATA1", "outcome": "TAL1::TCF3", "confounder": "SOX2"}
    for role, matrix_id in DEFAULT_MOTIFS.items():
        assert matrix_id.split(".")[0] in {"MA0035", "MA0091", "MA0143"}
        assert "." in matrix_id  # versioned, so a database update cannot change it
        record = database.fetch_motif_by_id(matrix_id)
        assert record.collection == "CORE" and record.tax_group == "vertebrates"
        assert record.name.upper() == expected_names[role]


def test_motifs__jaspar_probabilities_are_normalized_counts_in_acgt_order():
    from pyjaspar import jaspardb

    record = jaspardb().fetch_motif_by_id("MA0035.3")
    counts = np.array([[record.counts[base][i] for base in "ACGT"] for i in range(record.length)])
    motif = jaspar_motif("MA0035.3")
    np.testing.assert_allclose(motif.probabilities, counts / counts.sum(axis=1, keepdims=True))
    assert motif.id == "MA0035.3" and motif.length == record.length


def test_motifs__unknown_jaspar_id_raises_naming_it():
    with pytest.raises(InputError, match="MA9999.1"):
        jaspar_motif("MA9999.1")


def test_motifs__smooth_is_row_times_one_minus_p_plus_p_over_four():
    rows = np.array([[1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    p = PSEUDOCOUNT
    expected = np.array([[1 - p + p / 4, p / 4, p / 4, p / 4], [0.1 * (1 - p) + p / 4, 0.2 * (1 - p) + p / 4,
                                                                0.3 * (1 - p) + p / 4, 0.4 * (1 - p) + p / 4]])
    np.testing.assert_allclose(smooth(rows), expected, rtol=0, atol=1e-15)
    assert PSEUDOCOUNT == 1e-5


def test_motifs__jaspar_file_round_trips(tmp_path):
    from pyjaspar import jaspardb

    record = jaspardb().fetch_motif_by_id("MA0091.1")
    path = tmp_path / "tal1.jaspar"
    path.write_text(format(record, "jaspar"))
    motif = read_motif(path)
    np.testing.assert_allclose(motif.probabilities, jaspar_motif("MA0091.1").probabilities)
    assert motif.id == "tal1.jaspar:MA0091.1"


def test_motifs__meme_file_with_two_motifs_is_read_and_picked_by_name(tmp_path):
    path = tmp_path / "two.meme"
    path.write_text(MEME_TEXT)
    first, second = read_motifs(path)
    np.testing.assert_allclose(first.probabilities, [[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1], [0.25] * 4])
    assert second.consensus == "AT"
    assert read_motif(path, "second").name == "second"
    assert resolve_motif(f"{path}::first").length == 3
    with pytest.raises(InputError, match="holds 2 motifs"):
        read_motif(path)
    with pytest.raises(InputError, match="no motif named 'third'"):
        read_motif(path, "third")


def test_motifs__bad_files_raise_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.txt"
    garbage.write_text("this is not a motif\n")
    with pytest.raises(InputError, match="garbage.txt"):
        read_motifs(garbage)
    broken = tmp_path / "broken.jaspar"
    broken.write_text(">MA1 broken\nA [1 2]\nC [1 2]\n")
    with pytest.raises(InputError, match="broken.jaspar"):
        read_motifs(broken)
    with pytest.raises(InputError, match="missing.meme"):
        read_motifs(tmp_path / "missing.meme")
    with pytest.raises(InputError, match="missing.meme"):
        resolve_motif(tmp_path / "missing.meme")


def test_motifs__invalid_matrix_raises_naming_the_motif():
    with pytest.raises(InputError, match="'bad'"):
        Motif("bad", "x", np.ones((3, 5)))
    with pytest.raises(InputError, match=r"rows \[1\]"):
        Motif("empty_row", "x", np.array([[1.0, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(InputError, match="non-negative"):
        Motif("negative", "x", np.array([[1.0, -1, 0, 1]]))


def test_motifs__default_set_has_three_roles():
    motifs = MotifSet.default()
    assert [motifs[role].id for role in ("exposure", "outcome", "confounder")] == list(DEFAULT_MOTIFS.values())
    with pytest.raises(KeyError):
        motifs["mediator"]
