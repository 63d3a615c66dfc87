"""Verified stores: the record written with each ISM chunk, ``verify_ism`` (cheap and full), ``mark_incomplete``
and ``deepmr verify``, on real Zarr stores written chunk by chunk (no cluster needed)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from deepmr_dist.cli import main
from deepmr_dist.errors import StoreError
from deepmr_dist.io import store
from deepmr_dist.io.lock import LOCK_NAME
from deepmr_dist.io.verify import mark_incomplete, verify_ism
from deepmr_dist.io.sequence import sequences_dataset

N_LOCI, CHUNK, LENGTH = 10, 4, 6  # chunks 0:4, 4:8 and the partial 8:10


def _predictions(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, 2, 1)).astype(np.float32), rng.normal(size=(n, 2, LENGTH, 4, 1)).astype(np.float32)


@pytest.fixture
def written(tmp_path) -> tuple[Path, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """A store of 10 loci in chunks of 4 with every chunk written: (path, {start: (ref, mut)})."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (N_LOCI, LENGTH)).astype(np.int8)
    path = tmp_path / "run.zarr"
    template = store.ism_template(sequences_dataset(codes, [f"l{i}" for i in range(N_LOCI)]), ["m0", "m1"], ["t0"], CHUNK)
    store.create_store(str(path), template, fingerprint="fp", attrs={}, chunk_loci=CHUNK)
    data = {}
    for start, stop in store.chunk_bounds(N_LOCI, CHUNK):
        data[start] = _predictions(rng, stop - start)
        store.write_ism_chunk(str(path), start, *data[start], fingerprint="fp")
    return path, data


def _chunk(path: Path, name: str, index: int) -> Path:
    trailing = {"ref_pred": 2, "mut_pred": 4, "sequence": 1, "chunk_digest": 0, "chunk_nbytes": 0, "complete": 0}[name]
    return path / "ism" / name / "c" / "/".join([str(index)] + ["0"] * trailing)


def test_write_ism_chunk__records_each_locus_digest_and_the_stored_chunk_sizes(written):
    path, data = written
    group = store.zarr.open_group(str(path), path="ism", mode="r")
    for index, (start, stop) in enumerate(store.chunk_bounds(N_LOCI, CHUNK)):
        ref, mut = data[start]
        for i in range(stop - start):  # the definition, transcribed independently of locus_digests
            expected = int.from_bytes(hashlib.blake2b(ref[i].tobytes() + mut[i].tobytes(), digest_size=8).digest(), "little")
            assert int(group["chunk_digest"][start + i]) == expected
        sizes = sum(os.path.getsize(_chunk(path, name, index)) for name in ("ref_pred", "mut_pred"))
        assert group["chunk_nbytes"][start:stop].tolist() == [sizes] * (stop - start)
    assert group["complete"][:].all()


def test_write_ism_chunk__store_replaced_by_another_run_is_not_written(written):
    path, data = written
    before = _chunk(path, "mut_pred", 1).read_bytes()
    with pytest.raises(StoreError, match="replaced by another run.*nothing written"):
        store.write_ism_chunk(str(path), 4, *_predictions(np.random.default_rng(1), 4), fingerprint="other")
    assert _chunk(path, "mut_pred", 1).read_bytes() == before


@pytest.mark.parametrize("full", [False, True])
def test_verify_ism__intact_store_has_no_damage(written, full):
    path, _ = written
    verification = verify_ism(str(path), full=full)
    assert verification.ok and verification.recorded
    assert (verification.n_chunks, verification.checked) == (3, 3)
    assert "no damage found" in verification.summary()
    verification.raise_if_damaged()


@pytest.mark.parametrize("name", ["ref_pred", "mut_pred", "chunk_digest", "chunk_nbytes"])
def test_verify_ism__deleted_chunk_is_named_by_its_loci(written, name):
    path, _ = written
    _chunk(path, name, 1).unlink()
    verification = verify_ism(str(path))
    assert [(c.start, c.stop, c.first, c.last) for c in verification.damaged] == [(4, 8, "l4", "l7")]
    assert "is missing" in verification.damaged[0].describe() and f"ism/{name}/c/1" in verification.damaged[0].describe()
    with pytest.raises(StoreError, match=r"loci 4-7 \('l4' to 'l7'\).*deepmr verify --store .* --repair") as err:
        verification.raise_if_damaged()
    assert "\n" not in str(err.value)


def test_verify_ism__truncated_chunk_is_found_by_its_size(written):
    path, _ = written
    chunk = _chunk(path, "mut_pred", 2)
    chunk.write_bytes(chunk.read_bytes()[:-10])
    damaged = verify_ism(str(path)).damaged
    assert [(c.start, c.stop) for c in damaged] == [(8, 10)]
    assert "where" in damaged[0].problems[0] and "were written" in damaged[0].problems[0]


def test_verify_ism__same_size_corruption_is_found_only_by_the_full_check(written):
    path, _ = written
    chunk = _chunk(path, "mut_pred", 0)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    assert verify_ism(str(path)).ok  # same size: the listing cannot tell
    damaged = verify_ism(str(path), full=True).damaged
    assert [(c.start, c.stop) for c in damaged] == [(0, 4)]
    assert "unreadable" in damaged[0].problems[0] or "checksum mismatch" in damaged[0].problems[0]


def test_verify_ism__decodable_chunk_of_other_values_is_a_checksum_mismatch(tmp_path):
    """Chunks of random bits do not compress: Blosc stores them as they are, so any two have one size."""
    rng = np.random.default_rng(2)
    path = tmp_path / "run.zarr"
    template = store.ism_template(sequences_dataset(np.zeros((8, LENGTH), np.int8), [f"l{i}" for i in range(8)]),
                                  ["m0", "m1"], ["t0"], CHUNK)  # fmt: skip
    store.create_store(str(path), template, fingerprint="fp", attrs={}, chunk_loci=CHUNK)
    for start in (0, 4):
        bits = [rng.integers(0, 2**32, shape, dtype=np.uint32).view(np.float32) for shape in ((4, 2, 1), (4, 2, LENGTH, 4, 1))]
        store.write_ism_chunk(str(path), start, *bits)
    first, second = _chunk(path, "mut_pred", 0), _chunk(path, "mut_pred", 1)
    assert first.stat().st_size == second.stat().st_size  # the premise of this test
    second.write_bytes(first.read_bytes())
    assert verify_ism(str(path)).ok
    damaged = verify_ism(str(path), full=True).damaged
    assert [(c.start, c.stop) for c in damaged] == [(4, 8)]
    assert damaged[0].problems == ("checksum mismatch at 4 locus/loci (first: locus 4)",)


def test_verify_ism__incomplete_chunks_are_not_checked(written):
    path, _ = written
    store.zarr.open_array(str(path), path="ism/complete", mode="r+")[4:8] = False
    _chunk(path, "mut_pred", 1).unlink()
    verification = verify_ism(str(path), full=True)
    assert verification.ok and verification.checked == 2


def test_verify_ism__missing_sequence_chunk_cannot_be_repaired_by_recomputing(written):
    path, _ = written
    _chunk(path, "sequence", 0).unlink()
    verification = verify_ism(str(path))
    assert [(c.start, c.repairable) for c in verification.damaged] == [(0, False)]
    with pytest.raises(StoreError, match="sequences are damaged.*--overwrite"):
        mark_incomplete(str(path), verification)
    assert store.incomplete_chunks(str(path)) == []  # nothing written


def test_verify_ism__damaged_array_metadata_is_one_line_error_naming_it(written):
    path, _ = written
    (path / "ism" / "mut_pred" / "zarr.json").write_text('{"zarr_format": 3, "node_')
    with pytest.raises(StoreError, match=r"ism/mut_pred/zarr.json is damaged") as err:
        verify_ism(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_verify_ism__store_of_layout_1_without_record_is_checked_by_listing(written):
    path, _ = written
    for name in store.RECORD:
        store.zarr.open_group(str(path), path="ism", mode="r+").__delitem__(name)
    chunk = _chunk(path, "mut_pred", 0)
    chunk.write_bytes(chunk.read_bytes()[:-10])  # a size it cannot check without a record
    _chunk(path, "ref_pred", 2).unlink()
    verification = verify_ism(str(path))
    assert not verification.recorded and "listing only" in verification.summary()
    assert [(c.start, c.stop) for c in verification.damaged] == [(8, 10)]


def test_mark_incomplete__hands_back_exactly_the_damaged_chunks(written):
    path, data = written
    _chunk(path, "mut_pred", 1).unlink()
    assert mark_incomplete(str(path), verify_ism(str(path))) == 4
    assert store.incomplete_chunks(str(path)) == [(4, 8)]
    group = store.zarr.open_group(str(path), path="ism", mode="r")
    assert group["chunk_digest"][4:8].tolist() == [0] * 4 and group["chunk_nbytes"][4:8].tolist() == [0] * 4
    assert verify_ism(str(path)).ok  # an incomplete chunk is not damage
    store.write_ism_chunk(str(path), 4, *data[4], fingerprint="fp")  # what predict does next
    assert verify_ism(str(path), full=True).ok and store.incomplete_chunks(str(path)) == []


def test_cli_verify__damage_exits_1_naming_the_loci_and_repair_marks_them_incomplete(written, capsys):
    path, _ = written
    assert main(["verify", "--store", str(path)]) == 0
    assert "no damage found" in capsys.readouterr().out
    _chunk(path, "ref_pred", 0).unlink()
    assert main(["verify", "--store", str(path), "--full"]) == 1
    captured = capsys.readouterr()
    assert "loci 0-3 ('l0' to 'l3'): its ref_pred chunk (ism/ref_pred/c/0/0/0) is missing" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("deepmr verify: error: ")]
    assert len(errors) == 1 and "--repair" in errors[0] and "Traceback" not in captured.err
    assert main(["verify", "--store", str(path), "--repair"]) == 0
    assert "marked 1 chunk(s) (4 loci) incomplete" in capsys.readouterr().out
    assert store.incomplete_chunks(str(path)) == [(0, 4)]
    history = store.zarr.open_group(str(path), mode="r").attrs["history"].splitlines()
    assert "verify --store" in history[-1] and history[-1].endswith("--repair")  # the repair is on record
    assert not (path / LOCK_NAME).exists()  # the repair's lease is gone with it


def test_cli_verify__what_is_not_a_store_is_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for args in (["--store", str(tmp_path / "file")], ["--store", str(tmp_path / "file"), "--repair"]):
        assert main(["verify", *args]) == 1
        err = capsys.readouterr().err
        assert "it is a file" in err and "Traceback" not in err
    assert (tmp_path / "file").read_text() == "x"
    assert main(["verify", "--store", str(tmp_path)]) == 1
    assert "is not a deepmr store" in capsys.readouterr().err
