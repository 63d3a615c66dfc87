"""Bad input through the real `deepmr` command: one line naming the input and what is wrong, exit code 1, no traceback.

Each case runs ``main([...])`` in this process (stderr read with capsys) or the console script in a
subprocess (SIGINT, where the process is what is tested). Issue 14 items 5-7 and issue 17's input
conventions; the store-side faults (damaged chunks, locks) are tested with the store.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, free_port
from deepmr_dist.cli import EXIT_FAILED, EXIT_INTERRUPTED, main
from deepmr_dist.cluster import connect
from deepmr_dist.errors import InputError

INTERRUPTED = "interrupted; rerun the same command to resume (finished chunks and stages are kept)"


def one_error_line(capsys, command: str) -> str:
    """The only line on stderr, which must be ``deepmr COMMAND: error: ...``; no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"deepmr {command}: error: "), err
    return lines[0]


def predict_args(tmp_path: Path, *inputs: str, model: str = EXAMPLE_ENSEMBLE) -> list[str]:
    return ["predict", "--quiet", "--model", model, *inputs, "--store", str(tmp_path / "run.zarr"), "--n-workers", "1"]


def pipeline_yaml(tmp_path: Path, source: str, *, fasta: Path = EXAMPLE_FASTA, extra: str = "") -> Path:
    """A pipeline naming ``source`` as its one model source, for ``deepmr run --dry-run`` (which builds the model)."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        f"sequences: {{fasta: {fasta}}}\nmodel:\n  sources: [{source!r}]\n{extra}pairs: [[task0, task1]]\n"
        f"store: {tmp_path / 'run.zarr'}\n"
    )
    return path


def few_loci(n: int = 4) -> str:
    """The first ``n`` records of the bundled example as text."""
    lines = EXAMPLE_FASTA.read_text().splitlines()
    return "\n".join(lines[: 2 * n]) + "\n"


# ----------------------------------------------------------------------------- sequence inputs


def test_predict__binary_fasta_is_one_line(tmp_path, capsys):
    (tmp_path / "loci.fa").write_bytes(bytes(range(256)) * 8)
    assert main(predict_args(tmp_path, "--fasta", str(tmp_path / "loci.fa"))) == EXIT_FAILED
    line = one_error_line(capsys, "predict")
    assert line.endswith("loci.fa: not a FASTA file: byte 0x80 at the start is not text (expected a text FASTA file, "
                         "plain or gzip/bgzip-compressed)")
    assert not (tmp_path / "run.zarr").exists()


def test_predict__gzip_fasta_with_iupac_codes_runs_and_counts_them(tmp_path, capsys):
    text = few_loci()
    record = text.splitlines()[1]
    text = text.replace(record, record[:10] + "RY" + record[12:], 1)  # locus000 gets 2 IUPAC codes
    (tmp_path / "loci.fa.gz").write_bytes(gzip.compress(text.encode()))
    args = predict_args(tmp_path, "--fasta", str(tmp_path / "loci.fa.gz"))
    assert main([*args, "--iupac", "error"]) == EXIT_FAILED
    assert one_error_line(capsys, "predict").endswith(
        "record 'locus000' in " + str(tmp_path / "loci.fa.gz") + ": IUPAC code 'R' at position 11 (2 IUPAC code(s); "
        "refused by iupac 'error', read as N with iupac 'n')"
    )
    assert not (tmp_path / "run.zarr").exists()
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "4 loci in 1 chunks; computed 1 chunk(s)" in captured.out
    assert f"deepmr predict: warning: {tmp_path / 'loci.fa.gz'}: 2 IUPAC code(s) read as N in 1 record(s): 'locus000' 2" in (
        captured.err.splitlines()
    )
    sequence = xr.open_zarr(tmp_path / "run.zarr", group="ism", consolidated=False).sequence.values
    assert sequence[0, 10:12].tolist() == [4, 4] and "ACGT"[sequence[0, 9]] == record[9]


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: np.savez(p, onehot=np.zeros((2, 4, 5))),
         "is a zip archive (.npz, arrays: onehot), not a .npy array; expected one one-hot array (n_loci, 4, length) "
         "saved with numpy.save"),
        (lambda p: p.write_text(">a\nACGT\n"), "is not a .npy file (no NumPy header); expected a one-hot array saved with numpy.save"),
    ],
    ids=["npz", "text"],
)
def test_predict__onehot_that_is_not_one_npy_array_is_one_line(tmp_path, capsys, write, expected):
    path = tmp_path / "loci.npz"
    write(path)
    assert main(predict_args(tmp_path, "--onehot", str(path))) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == f"deepmr predict: error: {path} {expected}"


def test_predict__plain_gzip_genome_is_one_line_saying_bgzip(tmp_path, capsys):
    genome = tmp_path / "genome.fa.gz"
    genome.write_bytes(gzip.compress(b">chr1\n" + b"ACGT" * 50 + b"\n"))
    (tmp_path / "r.bed").write_text("chr1\t50\t150\n")
    assert main(predict_args(tmp_path, "--bed", str(tmp_path / "r.bed"), "--genome", str(genome), "--width", "20")) == 1
    line = one_error_line(capsys, "predict")
    assert f"genome FASTA {genome} cannot be indexed: " in line and "bgzip" in line


def test_predict__narrowpeak_summit_outside_its_peak_names_the_line(tmp_path, capsys):
    (tmp_path / "genome.fa").write_text(">chr1\n" + "ACGT" * 50 + "\n")
    bed = tmp_path / "peaks.narrowPeak"
    bed.write_text("chr1\t50\t150\tp1\t0\t.\t1\t1\t1\t50\nchr1\t50\t150\tp2\t0\t.\t1\t1\t1\t100\n")
    assert main(predict_args(tmp_path, "--bed", str(bed), "--genome", str(tmp_path / "genome.fa"), "--width", "20")) == 1
    assert one_error_line(capsys, "predict") == (
        f"deepmr predict: error: {bed}:2: the narrowPeak summit offset 100 (column 10) lies outside the peak's 100 bp"
    )


# ----------------------------------------------------------------------------- models


def _fake_torchscript(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/constants.pkl", b"not a pickle")
        archive.writestr("m/code/m.py", "x = 1\n")


def _truncated_torchscript(path: Path) -> None:
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), str(path))
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize(
    ("write", "expected"),
    [
        (lambda p: p.write_bytes(b""), "is empty (0 bytes)"),
        (_fake_torchscript, "looks like a TorchScript archive but cannot be loaded: RuntimeError: "),
        (_truncated_torchscript, "is not a TorchScript archive or a simulation CNN state dict loadable with weights_only=True: "
                                 "RuntimeError: PytorchStreamReader failed reading zip archive"),
        (lambda p: torch.save(nn.Linear(3, 2), p),
         "is not a TorchScript archive or a simulation CNN state dict loadable with weights_only=True: UnpicklingError: "
         "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by default"),
    ],
    ids=["empty", "fake-torchscript", "truncated-torchscript", "torch-load-refusal"],
)
def test_run_dry_run__a_bad_model_file_is_one_line_naming_it(tmp_path, capsys, write, expected):
    model = tmp_path / "member.pt"
    write(model)
    assert main(["run", str(pipeline_yaml(tmp_path, str(model))), "--dry-run"]) == EXIT_FAILED
    assert one_error_line(capsys, "run").startswith(f"deepmr run: error: model file {model} {expected}")


@pytest.fixture
def failing_modules(tmp_path, monkeypatch):
    """Importable modules: ``deepmr_test_raises:ensemble`` raises when called, ``deepmr_test_bad_import`` on import."""
    (tmp_path / "deepmr_test_raises.py").write_text(
        "def ensemble():\n    raise FileNotFoundError('no checkpoint at /nowhere/m.pt\\nmore detail')\n"
    )
    (tmp_path / "deepmr_test_bad_import.py").write_text("import numpy\nnumpy.nonexistent_function()\ndef ensemble():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in ("deepmr_test_raises", "deepmr_test_bad_import"):
        sys.modules.pop(name, None)


def test_predict__an_entry_point_that_raises_is_one_line_and_leaves_no_store(tmp_path, capsys, failing_modules):
    assert main(predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA), model="deepmr_test_raises:ensemble")) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == (
        "deepmr predict: error: entry point 'deepmr_test_raises:ensemble' raised FileNotFoundError: no checkpoint at /nowhere/m.pt"
    )
    assert not (tmp_path / "run.zarr").exists()


def test_run_dry_run__an_entry_point_whose_module_fails_to_import_is_one_line(tmp_path, capsys, failing_modules):
    assert main(["run", str(pipeline_yaml(tmp_path, "deepmr_test_bad_import:ensemble")), "--dry-run"]) == EXIT_FAILED
    line = one_error_line(capsys, "run")
    assert line.startswith(
        "deepmr run: error: model.sources[0]: cannot load model entry point 'deepmr_test_bad_import:ensemble': "
        "importing 'deepmr_test_bad_import' raised AttributeError: "
    ), line


# ----------------------------------------------------------------------------- YAML


def test_run__binary_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    assert main(["run", str(path), "--dry-run"]) == EXIT_FAILED
    assert one_error_line(capsys, "run") == (
        f"deepmr run: error: {path} is not a text file (byte 0x89 at offset 0 is not UTF-8); a config is YAML text"
    )


def test_run__alias_bomb_in_model_options_is_refused_at_once(tmp_path, capsys):
    bomb = "  options:\n    a0: &a0 [x, x, x, x]\n" + "".join(
        f"    a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]\n" for i in range(1, 10)
    )  # a9: 4**10 leaves
    path = pipeline_yaml(tmp_path, EXAMPLE_ENSEMBLE, extra=bomb)
    started = time.perf_counter()
    assert main(["run", str(path), "--dry-run"]) == EXIT_FAILED
    assert time.perf_counter() - started < 5  # the YAML is refused before pydantic or the model see it
    line = one_error_line(capsys, "run")
    assert line.startswith(f"deepmr run: error: {path}: refused: its aliases expand ") and "(at most 10,000 more" in line


def test_run__yaml_syntax_error_is_one_line_with_line_and_column(tmp_path, capsys):
    path = tmp_path / "pipeline.yaml"
    path.write_text("sequences:\n  fasta: a.fa\n model: x\n")
    assert main(["run", str(path), "--dry-run"]) == EXIT_FAILED
    assert one_error_line(capsys, "run") == (
        f"deepmr run: error: {path} is not valid YAML: line 3, column 2: while parsing a block mapping: expected "
        "<block end>, but found '<block mapping start>'"
    )


# ----------------------------------------------------------------------------- clusters


@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_workers", ["-1", "0", "10000"])
def test_predict__worker_counts_out_of_range_are_refused_before_a_store_exists(tmp_path, capsys, n_workers):
    args = predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA))
    args[args.index("--n-workers") + 1] = n_workers
    assert main(args) == EXIT_FAILED
    cores = os.cpu_count() or 1
    assert one_error_line(capsys, "predict") == (
        f"deepmr predict: error: --n-workers must be between 1 and {4 * cores} (4 worker processes per core, "
        f"{cores} core(s) here), got {n_workers}"
    )
    assert not (tmp_path / "run.zarr").exists()


def test_run__negative_n_workers_override_is_refused_before_anything_runs(tmp_path, capsys):
    assert main(["run", str(pipeline_yaml(tmp_path, EXAMPLE_ENSEMBLE)), "--n-workers", "-1"]) == EXIT_FAILED
    assert "--n-workers must be between 1 and" in one_error_line(capsys, "run")
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("not an address", "missing port number in address 'not an address'"),
        ("xyz://127.0.0.1:9", "unknown address scheme 'xyz'"),
    ],
)
def test_predict__malformed_address_or_unknown_protocol_is_one_line(tmp_path, capsys, address, reason):
    assert main([*predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA)), "--cluster", address]) == EXIT_FAILED
    line = one_error_line(capsys, "predict")
    assert line.startswith(f"deepmr predict: error: --cluster {address!r} is not a scheduler address: {reason}"), line
    assert not (tmp_path / "run.zarr").exists()


def test_connect__an_unreachable_scheduler_fails_within_the_timeout_naming_it():
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(InputError) as err, connect(address, connect_timeout=1.0):
        pass
    assert time.perf_counter() - started < 10  # measured 1.1 s; 30 s before
    assert str(err.value).startswith(f"cannot reach a Dask scheduler at {address} (waited 1 s): ")
    with pytest.raises(InputError, match="the connect timeout must be positive, got 0 s"), connect(address, connect_timeout=0):
        pass


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ("jobs: 0\n", "cluster.yaml: jobs: Input should be greater than or equal to 1 (got 0)"),
        ("kind: kubernetes\n", "cluster.yaml: kind: Input should be 'local', 'address', 'scheduler_file' or 'slurm' (got 'kubernetes')"),
        ("queues: gpu\n", "cluster.yaml: queues: Extra inputs are not permitted (got 'gpu')"),
    ],
)
def test_predict__a_bad_cluster_config_is_one_line_naming_the_file_and_field(tmp_path, capsys, config, expected):
    (tmp_path / "cluster.yaml").write_text(config)
    args = [*predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA)), "--cluster", "slurm",
            "--cluster-config", str(tmp_path / "cluster.yaml")]
    assert main(args) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == f"deepmr predict: error: {tmp_path}/{expected}"
    assert not (tmp_path / "run.zarr").exists()


def test_predict__gpu_on_an_embedded_cluster_without_cuda_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert main([*predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA)), "--gpu"]) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == (
        "deepmr predict: error: --gpu: this machine has no CUDA GPU for the embedded cluster (use --cluster ADDRESS)"
    )


@pytest.mark.slow
def test_predict__an_unreachable_scheduler_fails_after_the_default_10_s(tmp_path, capsys):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    assert main([*predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA)), "--cluster", address]) == EXIT_FAILED
    assert time.perf_counter() - started < 25
    assert one_error_line(capsys, "predict").startswith(
        f"deepmr predict: error: cannot reach a Dask scheduler at {address} (waited 10 s): "
    )
    assert not (tmp_path / "run.zarr").exists()


# ----------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--chunk-loci", "0", "chunk size must be >= 1 locus, got 0"),
        ("--mutant-batch", "-1", "mutant batch must be >= 1, got -1"),
        ("--mc-dropout", "-1", "--mc-dropout must be >= 0, got -1"),
    ],
)
def test_predict__counts_below_their_bound_are_one_line(tmp_path, capsys, option, value, message):
    assert main([*predict_args(tmp_path, "--fasta", str(EXAMPLE_FASTA)), option, value]) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == f"deepmr predict: error: {message}"
    assert not (tmp_path / "run.zarr").exists()


def test_predict__bed_width_below_one_is_one_line(tmp_path, capsys):
    (tmp_path / "r.bed").write_text("chr1\t10\t20\n")
    args = predict_args(tmp_path, "--bed", str(tmp_path / "r.bed"), "--genome", str(tmp_path / "g.fa"), "--width", "-4")
    assert main(args) == EXIT_FAILED
    assert one_error_line(capsys, "predict") == "deepmr predict: error: --width must be positive, got -4"


@pytest.mark.parametrize("n_boot", ["0", "-5"])
def test_mr__n_boot_below_two_is_one_line(tmp_path, capsys, n_boot):
    table = tmp_path / "in.csv"
    table.write_text("locus,bx,bxse,by,byse\nl1,0.1,0.01,0.2,0.02\nl1,0.2,0.01,0.3,0.02\nl1,0.3,0.01,0.5,0.02\n")
    args = ["mr", str(table), "--method", "weighted_median", "--n-boot", n_boot, "--out", str(tmp_path / "o.csv")]
    assert main(args) == EXIT_FAILED
    assert one_error_line(capsys, "mr") == f"deepmr mr: error: --n-boot must be an integer >= 2, got {n_boot}"


# ----------------------------------------------------------------------------- SIGINT


def _interrupt_predict(tmp_path: Path, *, whole_group: bool) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Start ``deepmr predict`` on the example, send SIGINT once its store holds a finished chunk; its exit and argv.

    Waiting for a finished chunk rather than for the store's first file: an interrupt while the
    store's template is being written leaves a store that the rerun refuses (reported, not fixed here).
    """
    store = tmp_path / "run.zarr"
    argv = ["predict", "--quiet", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(store),
            "--n-workers", "1", "--chunk-loci", "2"]  # fmt: skip
    # Notices of the shared machine, not of deepmr: a busy dashboard port, distributed's own warnings on close.
    env = {**os.environ, "PYTHONWARNINGS": "ignore:Port 8787 is already in use", "DASK_LOGGING__DISTRIBUTED": "error"}
    process = subprocess.Popen(
        [sys.executable, "-m", "deepmr_dist.cli", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env, start_new_session=True,  # its own process group: the group holds only what this test started
    )
    try:
        deadline = time.monotonic() + 120
        while not any((store / "ism" / "complete" / "c").glob("*")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        if whole_group:
            os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every process of the group
        else:
            os.kill(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err), argv


def test_sigint__predict_stops_with_one_line_and_the_same_command_resumes(tmp_path, capsys):
    done, argv = _interrupt_predict(tmp_path, whole_group=False)
    assert done.returncode == EXIT_INTERRUPTED, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [f"deepmr predict: {INTERRUPTED}"], done.stderr
    ism = xr.open_zarr(tmp_path / "run.zarr", group="ism", consolidated=False)
    finished = int(ism.complete.sum())
    assert 2 <= finished < 48
    assert main(argv) == 0
    assert f"computed {24 - finished // 2} chunk(s)" in capsys.readouterr().out
    assert bool(xr.open_zarr(tmp_path / "run.zarr", group="ism", consolidated=False).complete.all())


def test_sigint__ctrl_c_to_the_process_group_gives_no_worker_tracebacks(tmp_path):
    done, _ = _interrupt_predict(tmp_path, whole_group=True)
    assert done.returncode == EXIT_INTERRUPTED, (done.stdout, done.stderr)
    assert done.stderr.splitlines() == [f"deepmr predict: {INTERRUPTED}"], done.stderr


@pytest.mark.parametrize("rounds", ["-3", "0"])
def test_simulate__rounds_below_one_is_one_line_naming_the_field(rounds, capsys):
    code = main(["simulate", str(Path(__file__).resolve().parents[1] / "pipelines" / "simulation_reduced.yaml"), "--rounds", rounds, "--dry-run"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and "rounds: Input should be greater than or equal to 1" in err
