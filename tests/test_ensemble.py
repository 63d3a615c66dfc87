"""Entry points ``package.module:factory``: standard-library callables are refused before any call; dry runs list them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.cli import main
from deepmr_dist.errors import InputError
from deepmr_dist.models.ensemble import ModelSpec, is_stdlib_module, load_members, one_line, resolve_entry_point

REPO = Path(__file__).resolve().parent.parent

# What each callable would do if it were called with the pipeline's options.
HARMFUL = {
    "os:system": {"command": "touch PWNED"},
    "subprocess:run": {"args": ["touch", "PWNED"]},
    "builtins:exec": {},
    "shutil:rmtree": {"path": "victim"},
}

USER_MODULE = '''
"""Standard-library callables re-exported under harmless names, and a project factory with options bound."""
import functools
import subprocess
from os import system as build
from shutil import rmtree as ensemble

from deepmr_dist.models.examples import simulation_ensemble

touch = functools.partial(subprocess.run, ["touch", "PWNED"])
two_members = functools.partial(simulation_ensemble, n_members=2)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module ``deepmr_test_user_module`` importable here."""
    (tmp_path / "deepmr_test_user_module.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "deepmr_test_user_module"
    sys.modules.pop("deepmr_test_user_module", None)


def _pipeline(folder: Path, source: str, options: dict) -> Path:
    path = folder / "pipeline.yaml"
    path.write_text(
        f"sequences: {{fasta: {EXAMPLE_FASTA}}}\n"
        f"model: {{sources: [{json.dumps(source)}], options: {json.dumps(options)}}}\n"
        f"store: {folder / 'run.zarr'}\n"
    )
    return path


@pytest.mark.parametrize("source", HARMFUL)
def test_cli_run__dry_run_refuses_a_standard_library_entry_point_before_calling_it(tmp_path, source):
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "keep.txt").write_text("x")
    pipeline = _pipeline(tmp_path, source, HARMFUL[source])
    done = subprocess.run(
        [sys.executable, "-m", "deepmr_dist.cli", "run", str(pipeline), "--dry-run"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"deepmr run: error: model.sources[0]: entry point {source!r} is not a model factory: "
        f"module {source.split(':')[0]!r} is part of the Python standard library; refusing to call it"
    ]
    assert not (tmp_path / "PWNED").exists()
    assert (tmp_path / "victim" / "keep.txt").exists()
    assert not (tmp_path / "run.zarr").exists()


@pytest.mark.parametrize("attr, origin", [("build", "posix"), ("ensemble", "shutil"), ("touch", "subprocess")])
def test_resolve_entry_point__standard_library_callable_reached_through_another_module_is_refused(
    tmp_path, monkeypatch, user_module, attr, origin
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"'{attr}' comes from module '{origin}', part of the Python standard library"):
        resolve_entry_point(f"{user_module}:{attr}")
    assert not (tmp_path / "PWNED").exists()


def test_cli_predict__standard_library_entry_point_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["predict", "--quiet", "--model", "os:system", "--fasta", str(EXAMPLE_FASTA), "--store", "run.zarr",
                 "--n-workers", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert [line for line in err.splitlines() if line.startswith("deepmr predict: error: ")] == [
        "deepmr predict: error: entry point 'os:system' is not a model factory: "
        "module 'os' is part of the Python standard library; refusing to call it"
    ]
    assert not (tmp_path / "run.zarr").exists()


def test_is_stdlib_module__site_packages_are_not_the_standard_library():
    # site-packages may lie inside the standard library's directory (here, and in conda or pyenv installs)
    assert is_stdlib_module("json") and is_stdlib_module("os.path") and is_stdlib_module("posix")
    assert not is_stdlib_module("numpy") and not is_stdlib_module("torch.nn") and not is_stdlib_module("deepmr_dist.models")


def test_cli_run__dry_run_lists_the_entry_points_it_calls(tmp_path, capsys):
    pipeline = _pipeline(tmp_path, EXAMPLE_ENSEMBLE, {"n_members": 2})
    assert main(["run", str(pipeline), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert f"will call entry point(s): {EXAMPLE_ENSEMBLE} (model.sources[0])" in printed.splitlines()
    assert "ensemble: 2 members" in printed
    assert not (tmp_path / "run.zarr").exists()


def test_cli_run__dry_run_of_the_quickstart_says_it_calls_no_entry_point(capsys):
    # the quickstart trains the simulation's CNN (model.train_simulation): it names no entry point
    assert main(["run", str(REPO / "pipelines" / "quickstart.yaml"), "--dry-run"]) == 0
    assert "will call entry point(s): none" in capsys.readouterr().out.splitlines()


def test_load_members__project_and_user_entry_points_still_load(user_module):
    members = load_members(ModelSpec((EXAMPLE_ENSEMBLE,), options=(("n_members", 2),)))
    assert len(members) == 2 and all(isinstance(m, nn.Module) for m in members)
    assert len(load_members(ModelSpec((f"{user_module}:two_members",)))) == 2  # a partial of a project factory
    assert callable(resolve_entry_point("deepmr_dist.models.architectures:deepsea_ensemble"))
    assert resolve_entry_point("torch.nn:Identity") is nn.Identity


# ----------------------------------------------------------------------------- model files and factories that fail


def _fake_torchscript(path: Path) -> Path:
    """A zip holding ``constants.pkl`` and ``code/`` (what TorchScript archives hold) but nothing loadable."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/constants.pkl", b"not a pickle")
        archive.writestr("m/code/m.py", "x = 1\n")
    return path


def _written(data: bytes):
    """A maker of a file holding ``data``."""
    def make(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return make


def _pickled_module(path: Path) -> Path:
    torch.save(nn.Linear(3, 2), path)  # a whole module: torch.load(weights_only=True) refuses its class
    return path


def _truncated_torchscript(path: Path) -> Path:
    torch.jit.save(torch.jit.script(nn.Linear(3, 2)), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_written(b""), "model file {path} is empty (0 bytes)"),
        (_fake_torchscript, "model file {path} looks like a TorchScript archive but cannot be loaded: RuntimeError: "),
        (_truncated_torchscript, "model file {path} is not a TorchScript archive or a simulation CNN state dict loadable "
                                 "with weights_only=True: RuntimeError: PytorchStreamReader failed reading zip archive"),
        (_pickled_module,
         "model file {path} is not a TorchScript archive or a simulation CNN state dict loadable with weights_only=True: "
         "UnpicklingError: Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by default"),
        (_written(b"hello\n"),
         "model file {path} is not a TorchScript archive or a simulation CNN state dict loadable with weights_only=True: "),
    ],
    ids=["empty", "fake-torchscript", "truncated-torchscript", "pickled-module", "text"],
)
def test_load_members__a_bad_model_file_is_one_line_naming_it_and_the_reason(tmp_path, make, expected):
    path = make(tmp_path / "member.pt")
    with pytest.raises(InputError) as err:
        load_members(ModelSpec((str(path),)))
    message = str(err.value)
    assert message.startswith(expected.format(path=path)), message
    assert "\n" not in message and "\x1b" not in message and not message.endswith(": "), message


def test_one_line__keeps_what_torch_load_refused_without_its_advice():
    with pytest.raises(Exception) as err:
        buffer = __import__("io").BytesIO()
        torch.save(nn.Linear(3, 2), buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    assert len(str(err.value).splitlines()) > 3  # torch's own text: several lines of advice
    assert one_line(err.value) == (
        "UnpicklingError: Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global by default"
    )
    assert one_line(EOFError()) == "EOFError"
    assert one_line(RuntimeError("\x1b[1mbold\x1b[0m first. second.\nthird")) == "RuntimeError: bold first"


FAILING_MODULE = '''
def broken(**options):
    raise RuntimeError("checkpoint /nowhere/model.pt not found\\nsecond line of detail")
'''


def test_load_members__an_entry_point_that_raises_is_one_line_naming_it(tmp_path, monkeypatch):
    (tmp_path / "deepmr_test_failing.py").write_text(FAILING_MODULE)
    (tmp_path / "deepmr_test_import_fails.py").write_text("raise ZeroDivisionError('at import time')\ndef f():\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        with pytest.raises(InputError) as err:
            load_members(ModelSpec(("deepmr_test_failing:broken",)))
        assert str(err.value) == (
            "entry point 'deepmr_test_failing:broken' raised RuntimeError: checkpoint /nowhere/model.pt not found"
        )
        with pytest.raises(InputError) as err:
            load_members(ModelSpec(("deepmr_test_import_fails:f",)))
        assert str(err.value) == (
            "cannot load model entry point 'deepmr_test_import_fails:f': importing 'deepmr_test_import_fails' raised "
            "ZeroDivisionError: at import time"
        )
    finally:
        sys.modules.pop("deepmr_test_failing", None)
        sys.modules.pop("deepmr_test_import_fails", None)
