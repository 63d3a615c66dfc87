"""Fault injection: for each fault, the right error (one line, exit 1, no traceback) and no data lost.

Real parts throughout: Dask worker processes, Zarr stores on disk, the example ensemble and small
torch models, ``deepmr`` processes started here and killed by their pid. The faults: a chunk deleted
or truncated or corrupted, damaged ``zarr.json``, a worker killed during a derived stage, the client
killed around a group swap, two writers, a model that raises on a worker, a read-only store, a full
disk, store paths that are no store. Tests that mount a tmpfs (read-only store as root, full disk)
need root and the right to mount; they are skipped elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from distributed import Client, LocalCluster

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, assert_close_ism, assert_same_ism, embedded_client
from deepmr_dist.cli import main
from deepmr_dist.errors import ModelOutputError, StoreError
from deepmr_dist.io import store
from deepmr_dist.io.lock import LOCK_NAME, read_lease
from deepmr_dist.io.verify import verify_ism
from deepmr_dist.io.sequence import read_fasta
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.stages.predict import ISMSettings, PredictReport, predict, predict_in_memory
from helpers_packages import importable_package

ENSEMBLE = ModelSpec((EXAMPLE_ENSEMBLE,))
SETTINGS = ISMSettings(chunk_loci=16, incremental=False)  # the 48 example loci in chunks 0-15, 16-31, 32-47


def _child_env() -> dict[str, str]:
    """The environment of a process a test starts (read when it starts: ``fault_models`` sets PYTHONPATH)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


FAULT_MODELS = '''
import os
import time

import torch
from torch import nn


class RaisesOnCRun(nn.Module):
    """Raises in forward for a batch holding six C in a row; otherwise two sums of bases."""

    def forward(self, x):
        if bool((x[:, 1, :].unfold(1, 6, 1).sum(-1).amax(-1) >= 6).any()):
            raise RuntimeError("this model cannot score six C in a row")
        return torch.stack([x[:, 0, :].sum(-1), x[:, 3, :].sum(-1)], dim=1)


def raises_on_c_run():
    return RaisesOnCRun()


class Slow(nn.Module):
    """Fixed weights and 0.3 s per forward call: runs that last long enough to overlap."""

    def __init__(self, scale):
        super().__init__()
        self.weight = nn.Parameter(scale * torch.linspace(-1.0, 1.0, 8).reshape(2, 4), requires_grad=False)

    def forward(self, x):
        time.sleep(0.3)
        return torch.einsum("bcl,tc->bt", x, self.weight)


def slow():
    return Slow(1.0)


def slow_other():
    return Slow(2.0)


def slow_block(block, marker):
    """A block of a derived stage that a worker can be killed in: records its pid in ``marker``, then takes 3 s."""
    with open(os.path.join(marker, str(os.getpid())), "w"):
        pass
    time.sleep(3.0)
    return block
'''


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def fault_models(tmp_path_factory):
    """A package ``deepmr_test_fault_models`` importable here, in worker processes and in ``deepmr`` processes."""
    with importable_package(tmp_path_factory.mktemp("fault_models"), "deepmr_test_fault_models", FAULT_MODELS) as name:
        yield name


@pytest.fixture(scope="module")
def client(fault_models):
    with embedded_client() as c:
        yield c


@pytest.fixture(scope="module")
def base(tmp_path_factory, client, example_loci) -> Path:
    """An undisturbed complete ``ism`` group of the 48 example loci, made on the module's cluster."""
    path = tmp_path_factory.mktemp("base") / "run.zarr"
    predict(example_loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False)
    return path


@pytest.fixture(scope="module")
def base_effects(tmp_path_factory, base) -> Path:
    """``base`` with an ``effects`` group."""
    path = tmp_path_factory.mktemp("base_effects") / "run.zarr"
    shutil.copytree(base, path)
    store.write_group(str(path), compute_effects(store.open_run(str(path))["ism"]), "effects", fingerprint="before")
    return path


def _copy(source: Path, tmp_path: Path) -> Path:
    path = tmp_path / "run.zarr"
    shutil.copytree(source, path)
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _group_files(path: Path, group: str) -> dict[str, bytes]:
    return {k: v for k, v in _snapshot(path).items() if k.startswith(f"{group}/")}


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(capsys, *args: str) -> str:
    """Run ``deepmr ARGS`` here; it must exit 1 with one ``deepmr CMD: error:`` line and no traceback."""
    code, _, err = _cli(capsys, *args)
    assert code == 1, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"deepmr {args[0]}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _hidden(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith(".") and p.name != LOCK_NAME)


def _chunk(path: Path, name: str, index: int) -> Path:
    trailing = {"ref_pred": 2, "mut_pred": 4, "complete": 0}[name]
    return path / "ism" / name / "c" / "/".join([str(index)] + ["0"] * trailing)


def _complete_loci(path: Path) -> int:
    try:
        return int(zarr.open_array(str(path), path="ism/complete", mode="r")[:].sum())
    except Exception:  # not created yet, or caught mid-write
        return 0


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


# ----------------------------------------------------------------------------- damaged chunks


def test_fault__deleted_chunk__effects_refuses_and_predict_recomputes_exactly_it(tmp_path, capsys, client, base, example_loci):
    path = _copy(base, tmp_path)
    _chunk(path, "mut_pred", 1).unlink()  # the issue's `rm S/ism/mut_pred/c/1/0/0/0/0`
    address = client.scheduler.address
    line = _error_line(capsys, "effects", "--store", str(path), "--cluster", address, "--quiet")
    assert "loci 16-31 ('locus016' to 'locus031')" in line and "ism/mut_pred/c/1/0/0/0/0) is missing" in line, line
    assert not (path / "effects").exists()
    code, out, _ = _cli(capsys, "inspect", "--store", str(path))
    assert code == 0 and "48/48 loci (100.0 %); 16 of them in damaged chunks" in out, out

    report = PredictReport.of(predict(example_loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 1
    assert_same_ism(store.open_run(str(path))["ism"], store.open_run(str(base))["ism"])  # same chunks, same workers
    assert _cli(capsys, "effects", "--store", str(path), "--cluster", address, "--quiet")[0] == 0


def test_fault__deleted_completion_chunk__effects_refuses_and_predict_recomputes_it(tmp_path, capsys, client, base, example_loci):
    path = _copy(base, tmp_path)
    _chunk(path, "complete", 2).unlink()  # reads as "not complete": nothing passes for data
    line = _error_line(capsys, "effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet")
    assert "16 loci have no ISM predictions yet (first: 'locus032')" in line, line
    report = PredictReport.of(predict(example_loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 1
    assert_same_ism(store.open_run(str(path))["ism"], store.open_run(str(base))["ism"])


def test_fault__truncated_chunk__effects_refuses_and_the_previous_effects_group_survives(tmp_path, capsys, client, base_effects):
    path = _copy(base_effects, tmp_path)
    before = _group_files(path, "effects")
    chunk = _chunk(path, "mut_pred", 2)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])  # the truncated Blosc chunk
    line = _error_line(capsys, "effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet")
    assert "loci 32-47" in line and "bytes where" in line and "were written" in line, line
    assert _group_files(path, "effects") == before and _hidden(path) == []
    assert store.stage_fingerprint(str(path), "effects") == "before"


def test_fault__same_size_corruption__effects_fails_in_one_line_and_keeps_the_previous_group(tmp_path, capsys, client, base_effects):
    path = _copy(base_effects, tmp_path)
    before = _group_files(path, "effects")
    chunk = _chunk(path, "mut_pred", 0)
    raw = bytearray(chunk.read_bytes())
    raw[4:8] = (int.from_bytes(raw[4:8], "little") - 4).to_bytes(4, "little")  # Blosc header: uncompressed size
    chunk.write_bytes(bytes(raw))
    address = client.scheduler.address
    # the listing cannot see it: the write fails on a worker, and the diagnosis names the chunk
    line = _error_line(capsys, "effects", "--store", str(path), "--cluster", address, "--quiet")
    assert "loci 0-15" in line and "unreadable" in line and "--repair" in line, line
    assert _group_files(path, "effects") == before and _hidden(path) == []
    # --verify full refuses before anything is computed
    line = _error_line(capsys, "effects", "--store", str(path), "--cluster", address, "--quiet", "--verify", "full")
    assert "loci 0-15" in line and "unreadable" in line, line
    assert _group_files(path, "effects") == before


# ----------------------------------------------------------------------------- damaged metadata


def test_fault__corrupt_root_zarr_json__every_command_refuses_in_one_line_and_touches_nothing(tmp_path, capsys, client, base_effects):
    path = _copy(base_effects, tmp_path)
    (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "gr')  # truncated
    before = _snapshot(path)
    address = client.scheduler.address
    for args in (["effects", "--store", str(path), "--cluster", address], ["inspect", "--store", str(path)],
                 ["verify", "--store", str(path)], ["verify", "--store", str(path), "--repair"],
                 ["predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(path),
                  "--cluster", address, "--chunk-loci", "16", "--full-recompute", "--overwrite"]):  # fmt: skip
        line = _error_line(capsys, *args, *(["--quiet"] if args[0] in ("effects", "predict") else []))
        assert f"{path}/zarr.json is damaged" in line, line
        assert _snapshot(path) == before


def test_fault__corrupt_array_metadata__commands_name_the_file(tmp_path, capsys, client, base, example_loci):
    path = _copy(base, tmp_path)
    (path / "ism" / "mut_pred" / "zarr.json").write_text('{"zarr_format": 3, "shape": [48,')
    before = _snapshot(path)
    for args in (["effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet"],
                 ["verify", "--store", str(path)]):  # fmt: skip
        line = _error_line(capsys, *args)
        assert f"{path}/ism/mut_pred/zarr.json is damaged" in line, line
    with pytest.raises(StoreError, match="ism/mut_pred/zarr.json is damaged"):
        predict(example_loci, ENSEMBLE, str(path), client=client, settings=SETTINGS, progress=False)
    assert _snapshot(path) == before


# ----------------------------------------------------------------------------- a worker killed during a derived stage


@pytest.mark.slow
@pytest.mark.parametrize("allowed_failures", [3, 0])
def test_fault__worker_killed_during_a_derived_stage__group_is_written_whole_or_not_at_all(tmp_path, fault_models, allowed_failures):
    path = str(tmp_path / "run.zarr")
    store.write_group(path, xr.Dataset({"local_ce": ("locus", np.zeros(8))}), "mr", fingerprint="before")
    marker = tmp_path / "started"
    marker.mkdir()
    slow_block = __import__(fault_models).slow_block
    data = da.ones(8, chunks=2).map_blocks(slow_block, str(marker), dtype=float, meta=np.array((), dtype=float))
    outcome: dict[str, object] = {}
    with dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                          dashboard_address=None) as cluster, Client(cluster) as c:  # fmt: skip
            c.wait_for_workers(2)

            def write() -> None:
                try:
                    outcome["result"] = store.write_group(path, xr.Dataset({"local_ce": ("locus", data)}), "mr", fingerprint="after")
                except BaseException as exc:  # reported by the main thread
                    outcome["result"] = exc

            thread = threading.Thread(target=write)
            thread.start()
            _wait(lambda: any(marker.iterdir()), 60, "a block to start on a worker")
            victim = int(next(marker.iterdir()).name)
            assert victim in {nanny.process.pid for nanny in cluster.workers.values()}  # a worker this test started
            os.kill(victim, signal.SIGKILL)
            thread.join(120)
    mr = xr.open_zarr(path, group="mr", consolidated=False)
    if allowed_failures:  # the lost block is recomputed on another worker: the new group, whole
        assert isinstance(outcome["result"], xr.Dataset), outcome["result"]
        np.testing.assert_array_equal(mr["local_ce"].values, np.ones(8))
        assert store.stage_fingerprint(path, "mr") == "after"
    else:  # the write fails: the previous group, whole
        assert isinstance(outcome["result"], Exception) and "KilledWorker" in type(outcome["result"]).__name__
        np.testing.assert_array_equal(mr["local_ce"].values, np.zeros(8))
        assert store.stage_fingerprint(path, "mr") == "before"
    assert _hidden(Path(path)) == []


# ----------------------------------------------------------------------------- the client killed around a group swap


KILL_AT_RENAME = """
import os, signal, sys

real_replace = os.replace


def replace(source, destination):
    if "/.effects.replaced-" in str(destination):
        if sys.argv[1] == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(source, destination)
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, destination)


os.replace = replace
from deepmr_dist.cli import main

sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("when", ["before", "between"])
def test_fault__client_killed_at_a_group_swap__never_a_half_group_and_the_rerun_repairs(tmp_path, capsys, client, base_effects, when):
    path = _copy(base_effects, tmp_path)
    expected = xr.open_zarr(path, group="effects", consolidated=False).load()
    del expected.attrs[store.STAGE_ATTR]  # `deepmr effects` records no stage fingerprint
    before = _group_files(path, "effects")
    args = ["effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet"]
    done = subprocess.run([sys.executable, "-c", KILL_AT_RENAME, when, *args], env=_child_env(), capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    groups = set(store.open_run(str(path)))
    if when == "before":  # killed with the new group staged: the previous group as it was
        assert groups == {"ism", "effects"} and _group_files(path, "effects") == before
    else:  # killed between the renames: no effects group, never a half-written one
        assert groups == {"ism"}
    assert _hidden(path)  # what the killed run left: staged and replaced copies, out of sight
    assert read_lease(str(path)).holder == "deepmr effects"
    code, _, err = _cli(capsys, *args)  # the dead holder's lease is broken, the leftovers removed
    assert code == 0, err
    assert _hidden(path) == [] and read_lease(str(path)) is None
    repaired = xr.open_zarr(path, group="effects", consolidated=False).load()
    assert repaired.attrs.pop("history").splitlines()[-1].endswith(" ".join(["deepmr", *args]))  # the rerun wrote it
    expected.attrs.pop("history")
    xr.testing.assert_identical(repaired, expected)


# ----------------------------------------------------------------------------- two writers


def _fasta(tmp_path: Path, n: int) -> Path:
    lines = EXAMPLE_FASTA.read_text().splitlines()
    path = tmp_path / "loci.fa"
    path.write_text("\n".join(lines[: 2 * n]) + "\n")
    return path


def test_fault__two_writers__the_second_is_refused_naming_the_first_which_completes_intact(tmp_path, capsys, client, fault_models, example_loci):
    fasta, path = _fasta(tmp_path, 16), tmp_path / "run.zarr"
    common = ["--fasta", str(fasta), "--store", str(path), "--cluster", client.scheduler.address, "--chunk-loci", "1",
              "--full-recompute", "--quiet"]  # fmt: skip
    first = subprocess.Popen([sys.executable, "-m", "deepmr_dist.cli", "predict", "--model", f"{fault_models}:slow", *common],
                             env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait(lambda: _complete_loci(path) >= 1 or first.poll() is not None, 120, "the first run's first chunk")
        for model, extra in ((f"{fault_models}:slow_other", ["--overwrite"]), (f"{fault_models}:slow", [])):
            line = _error_line(capsys, "predict", "--model", model, *common, *extra)
            assert f"{path} is locked by another writer: deepmr predict (pid {first.pid} on " in line, line
        assert first.poll() is None, "the first run ended before the second was refused"
        assert first.wait(300) == 0, first.stderr.read()
    finally:
        _kill(first)
    ism = store.open_run(str(path))["ism"]
    assert ism.attrs["model_sources"] == [f"{fault_models}:slow"]
    assert verify_ism(str(path), full=True).ok and store.incomplete_chunks(str(path)) == []
    spec = ModelSpec((f"{fault_models}:slow",))
    assert_close_ism(ism, predict_in_memory(example_loci.isel(locus=slice(0, 16)), spec, ISMSettings(chunk_loci=1, incremental=False)),
                     accumulation=4)  # fmt: skip


def test_fault__killed_writer__its_lease_is_broken_by_the_rerun_which_resumes(tmp_path, client, example_loci, caplog):
    path = tmp_path / "run.zarr"
    command = [sys.executable, "-m", "deepmr_dist.cli", "predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA),
               "--store", str(path), "--cluster", client.scheduler.address, "--chunk-loci", "4", "--full-recompute",
               "--quiet"]  # fmt: skip
    proc = subprocess.Popen(command, env=_child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _complete_loci(path) >= 4 or proc.poll() is not None, 300, "the first complete chunk")
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        _kill(proc)
    assert read_lease(str(path)).pid == proc.pid  # left behind by the killed writer
    settings = ISMSettings(chunk_loci=4, incremental=False)  # what the killed run used: the same run, resumed
    report = PredictReport.of(predict(example_loci, ENSEMBLE, str(path), client=client, settings=settings, progress=False))
    assert "that process is gone" in caplog.text
    assert report.chunks_computed < 12 and read_lease(str(path)) is None
    assert verify_ism(str(path), full=True).ok


HOLDER = """
import sys, time
from deepmr_dist.io.lock import lock

with lock(sys.argv[1], "hung writer", timeout=0.4):
    print("held", flush=True)
    time.sleep(600)
"""


def test_fault__hung_writer__commands_refuse_until_break_lock_breaks_its_stale_lease(tmp_path, capsys, client, base):
    path = _copy(base, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert holder.stdout.readline() == "held\n"
        os.kill(holder.pid, signal.SIGSTOP)  # alive, but its heartbeat stops: a hung process, or a lost machine
        pipeline = tmp_path / "p.yaml"
        pipeline.write_text(f"sequences: {{fasta: {EXAMPLE_FASTA}}}\nmodel: {{sources: ['{EXAMPLE_ENSEMBLE}']}}\n"
                            f"ism: {{chunk_loci: 16, incremental: false}}\nstore: {path}\nreport: false\n")  # fmt: skip
        effects = ["effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet", "--lock-timeout", "1"]
        for args in (effects, ["run", str(pipeline), "--cluster", client.scheduler.address, "--quiet", "--break-lock"]):
            line = _error_line(capsys, *args)
            assert f"locked by another writer: hung writer (pid {holder.pid} on " in line and "--break-lock" in line, line
        _wait(lambda: read_lease(str(path)).age() > 1.0, 30, "the hung writer's lease to go stale")
        assert _cli(capsys, *effects, "--break-lock")[0] == 0
        assert set(store.open_run(str(path))) == {"ism", "effects"} and read_lease(str(path)) is None
    finally:
        _kill(holder)


# ----------------------------------------------------------------------------- a model that raises on a worker


def test_fault__model_raising_on_a_worker__one_line_naming_the_loci_and_no_store_left(tmp_path, capsys, client, fault_models):
    rng = np.random.default_rng(5)
    records = {f"l{i}": "".join(rng.choice(list("AT"), 24)) for i in range(3)} | {"bad": "ATATATCCCCCCATATATATATAT"}
    fasta = tmp_path / "loci.fa"
    fasta.write_text("".join(f">{name}\n{seq}\n" for name, seq in records.items()))
    path = tmp_path / "run.zarr"
    line = _error_line(capsys, "predict", "--quiet", "--model", f"{fault_models}:raises_on_c_run", "--fasta", str(fasta),
                       "--store", str(path), "--cluster", client.scheduler.address, "--chunk-loci", "1", "--full-recompute")  # fmt: skip
    assert "ISM of loci 3-3 failed on a worker" in line and "RuntimeError: this model cannot score six C in a row" in line, line
    assert not path.exists()
    path.mkdir()  # the same through the Python API, into an existing empty folder: kept, emptied
    with pytest.raises(ModelOutputError, match="ISM of loci 3-3 failed on a worker"):
        predict(read_fasta(fasta), ModelSpec((f"{fault_models}:raises_on_c_run",)), str(path), client=client,
                settings=ISMSettings(chunk_loci=1, incremental=False), progress=False)  # fmt: skip
    assert path.is_dir() and not any(path.iterdir())


# ----------------------------------------------------------------------------- store paths that are no store


@pytest.mark.parametrize("case", ["file", "unknown_protocol"])
def test_fault__store_path_errors__one_line_for_every_command(tmp_path, capsys, client, case):
    if case == "file":
        target = tmp_path / "run.zarr"
        target.write_text("not a store\n")
        path, expected = str(target), "it is a file"
    else:
        path, expected = "nosuch://bucket/run.zarr", "Protocol not known: nosuch"
    address = client.scheduler.address
    for args in (["effects", "--store", path, "--cluster", address, "--quiet"], ["inspect", "--store", path],
                 ["verify", "--store", path, "--repair"],
                 ["predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", path,
                  "--cluster", address]):  # fmt: skip
        line = _error_line(capsys, *args)
        assert path in line and expected in line, line
    if case == "file":
        assert Path(path).read_text() == "not a store\n"


def test_fault__store_under_a_regular_file__predict_fails_in_one_line(tmp_path, capsys, client):
    (tmp_path / "file").write_text("x")
    path = tmp_path / "file" / "run.zarr"
    line = _error_line(capsys, "predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA),
                       "--store", str(path), "--cluster", client.scheduler.address)  # fmt: skip
    assert f"cannot write to {path} (taking its lock)" in line and "Not a directory" in line, line
    assert (tmp_path / "file").read_text() == "x"


# ----------------------------------------------------------------------------- read-only stores and full disks


@contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the block (root only; skipped where it cannot be mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(where)], check=True)


@contextmanager
def _read_only_copy(source: Path, tmp_path: Path) -> Iterator[Path]:
    """A copy of ``source`` that this process cannot write: mode bits for a user, a read-only mount for root
    (root ignores mode bits, so ``chmod`` would test nothing there)."""
    if os.geteuid() != 0:
        path = _copy(source, tmp_path)
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        try:
            yield path
        finally:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        return
    with _tmpfs(tmp_path / "ro", "64m") as mount:
        path = _copy(source, mount)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        yield path


def test_fault__read_only_store__writers_refuse_in_one_line_readers_work(tmp_path, capsys, client, base_effects):
    with _read_only_copy(base_effects, tmp_path) as path:
        before = _snapshot(path)
        address = client.scheduler.address
        for args in (["effects", "--store", str(path), "--cluster", address, "--quiet"], ["verify", "--store", str(path), "--repair"],
                     ["predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(path),
                      "--cluster", address, "--chunk-loci", "16", "--full-recompute"]):  # fmt: skip
            line = _error_line(capsys, *args)
            assert f"cannot write to {path} (taking its lock)" in line, line
            assert "Read-only file system" in line or "Permission denied" in line, line
        assert _cli(capsys, "inspect", "--store", str(path))[0] == 0
        assert _cli(capsys, "verify", "--store", str(path), "--full")[0] == 0
        assert _snapshot(path) == before


def _fill(folder: Path, leave: int) -> Path:
    """Fill the filesystem of ``folder`` up to ``leave`` free bytes with one file; return it."""
    filler = folder / "filler"
    stat = os.statvfs(folder)
    filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
    return filler


def test_fault__full_disk__effects_fails_in_one_line_and_ism_is_intact_then_succeeds(tmp_path, capsys, client, base):
    with _tmpfs(tmp_path / "small", "16m") as mount:
        path = _copy(base, mount)
        filler = _fill(mount, 64 * 1024)
        args = ["effects", "--store", str(path), "--cluster", client.scheduler.address, "--quiet"]
        line = _error_line(capsys, *args)
        assert f"cannot write group 'effects' of {path}: No space left on device" in line, line
        assert set(store.open_run(str(path))) == {"ism"} and _hidden(path) == []
        assert verify_ism(str(path), full=True).ok
        filler.unlink()
        assert _cli(capsys, *args)[0] == 0
        assert set(store.open_run(str(path))) == {"ism", "effects"}


def test_fault__full_disk__predict_fails_in_one_line_and_removes_the_store_it_created(tmp_path, capsys, client):
    with _tmpfs(tmp_path / "small", "16m") as mount:
        _fill(mount, 256 * 1024)
        path = mount / "run.zarr"
        line = _error_line(capsys, "predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA),
                           "--store", str(path), "--cluster", client.scheduler.address, "--chunk-loci", "16",
                           "--full-recompute")  # fmt: skip
        assert "No space left on device" in line, line
        assert not path.exists()


def test_fault__interrupt_while_the_store_is_created__leaves_no_store_and_the_rerun_completes(
    tmp_path, client, example_loci, monkeypatch
):
    """Ctrl-C right after the store's metadata is written (before any chunk): the half-made store is removed."""
    path = str(tmp_path / "run.zarr")
    create = store.create_store

    def create_then_interrupt(*args, **kwargs):
        create(*args, **kwargs)
        assert (tmp_path / "run.zarr" / "zarr.json").exists()  # the store was there when the interrupt came
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "create_store", create_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        predict(example_loci, ENSEMBLE, path, client=client, settings=SETTINGS, progress=False)
    assert not (tmp_path / "run.zarr").exists()
    monkeypatch.setattr(store, "create_store", create)
    report = PredictReport.of(predict(example_loci, ENSEMBLE, path, client=client, settings=SETTINGS, progress=False))
    assert report.chunks_computed == 3 and store.incomplete_chunks(path) == []
