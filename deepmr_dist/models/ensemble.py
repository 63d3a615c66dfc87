"""Ensemble members: loading, MC-dropout with frozen masks, fingerprints.

A model spec is what a user passes as ``--model`` (repeatable):

* a TorchScript file (``torch.jit.save``), one member per file,
* a state-dict file of the paper's simulation CNN as written by
  :func:`deepmr_dist.simulation.training.train_ensemble` (the simulation's
  trained ensemble; read with ``weights_only=True``), one member per file, or
* an entry point ``package.module:factory``; ``factory()`` returns one
  ``torch.nn.Module`` or a list of them (one per member).

An entry point is code the user chose and is run as such. As a guard against
accidents (not a sandbox), :func:`resolve_entry_point` refuses, before calling
anything, a callable that belongs to the Python standard library (``os:system``,
``subprocess:run``, ``builtins:exec``, or such a function re-exported by another module).

With ``mc_dropout=N`` the spec must name exactly one Python model; its members
are N copies whose ``nn.Dropout`` layers are replaced by :class:`FrozenDropout`
masks, each mask fixed for the reference and every one of its mutants (so the
covariance between mutant and reference predictions keeps its meaning).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import inspect
import re
import sys
import sysconfig
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepmr_dist.errors import InputError


class FrozenDropout(nn.Module):
    """Dropout with one mask, drawn once from a seed and reused for every input.

    The mask covers one example (``x.shape[1:]``) and is broadcast over the
    batch, so identical inputs give identical outputs.
    """

    def __init__(self, p: float, seed: int) -> None:
        super().__init__()
        self.p = float(p)
        self.seed = int(seed)
        self._masks: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}

    def mask(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """The frozen mask (scaled by 1/(1-p)) for one example of ``shape``."""
        key = (shape, device)
        if key not in self._masks:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.rand(shape, generator=generator) >= self.p
            self._masks[key] = (keep.to(torch.float32) / (1.0 - self.p)).to(device)
        return self._masks[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask(tuple(x.shape[1:]), x.device).to(x.dtype)


def freeze_dropout(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every ``nn.Dropout`` replaced by a :class:`FrozenDropout`.

    Raises
    ------
    InputError
        If the model has no ``nn.Dropout`` layer (MC-dropout would give identical members).
    """
    member = copy.deepcopy(model).eval()
    dropouts = [(name, m) for name, m in member.named_modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    if not dropouts:
        raise InputError("MC-dropout needs a model with nn.Dropout layers, but this model has none")
    for index, (name, module) in enumerate(dropouts):
        parent_name, _, attr = name.rpartition(".")
        parent = member.get_submodule(parent_name) if parent_name else member
        setattr(parent, attr, FrozenDropout(module.p, seed=seed * 1_000_003 + index))
    return member


@dataclass(frozen=True)
class ModelSpec:
    """What to load as the ensemble.

    Parameters
    ----------
    sources
        TorchScript paths and/or ``package.module:factory`` entry points.
    mc_dropout
        Number of frozen dropout masks (0: the sources are the members).
    mc_seed
        Seed of the dropout masks.
    options
        Keyword arguments of every entry point's factory, as ``(name, value)``
        pairs (e.g. ``(("n_members", 5), ("tasks", ("Oct4", "Sox2")))``).
    storage_options
        fsspec options of the sources given as URLs (``s3://bucket/m0.pt``): s3fs's
        ``client_kwargs`` (endpoint), ``key``/``secret``, ...; None: fsspec's defaults
        and the environment. They may hold credentials, so they are left out of the
        spec's repr and hash, and never enter the model's fingerprint.
    """

    sources: tuple[str, ...]
    mc_dropout: int = 0
    mc_seed: int = 0
    options: tuple[tuple[str, Any], ...] = ()
    storage_options: Mapping[str, Any] | None = field(default=None, repr=False, hash=False)

    def __post_init__(self) -> None:
        if not self.sources:
            raise InputError("no model given: pass --model at least once")
        if self.mc_dropout < 0:
            raise InputError(f"--mc-dropout must be >= 0, got {self.mc_dropout}")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (a zip holding ``constants.pkl`` and ``code/``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


_STDLIB_DIRECTORIES = tuple({Path(sysconfig.get_paths()[key]).resolve() for key in ("stdlib", "platstdlib")})
_SITE_DIRECTORIES = tuple({Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib")})


def _in_stdlib_directory(file: str) -> bool:
    """Whether ``file`` lies in the standard library's directory, outside site-packages (which may lie inside it)."""
    path = Path(file).resolve()
    if {"site-packages", "dist-packages"} & set(path.parts) or any(path.is_relative_to(d) for d in _SITE_DIRECTORIES):
        return False
    return any(path.is_relative_to(d) for d in _STDLIB_DIRECTORIES)


def is_stdlib_module(name: str) -> bool:
    """Whether module ``name`` belongs to the Python standard library: by name, as a builtin, or by its file."""
    top = name.partition(".")[0]
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return True
    file = getattr(sys.modules.get(name), "__file__", None)
    return file is not None and _in_stdlib_directory(file)


def is_entry_point(source: str) -> bool:
    """Whether a model source names Python code (``package.module:factory``) rather than a file."""
    return ":" in source and "://" not in source and not Path(source).is_file()


def _defining_module(obj: Any) -> str:
    """The module that defines ``obj`` (a module: itself), looking through :class:`functools.partial` to what it wraps."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.ismodule(obj):
        return obj.__name__
    return getattr(obj, "__module__", None) or type(obj).__module__


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
_UNPICKLER_PREFIX = "WeightsUnpickler error:"
"""Where ``torch.load(weights_only=True)`` says, inside its many lines, what it refused."""


def one_line(error: BaseException) -> str:
    """``Type: reason`` in one line: the first sentence of the message's first non-blank line.

    Terminal colour codes are dropped, and of a refusal by ``torch.load(weights_only=True)``
    (several lines of advice) only what its unpickler refused is kept.
    """
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(error)).splitlines() if line.strip()]
    refused = [line.partition(_UNPICKLER_PREFIX)[2].strip() for line in lines if _UNPICKLER_PREFIX in line]
    first = (refused or lines or [""])[0]
    sentence = first.split(". ")[0].rstrip(".").strip()
    return f"{type(error).__name__}: {sentence}" if sentence else type(error).__name__


def resolve_entry_point(source: str) -> Callable[..., Any]:
    """Import ``package.module:factory`` and return the factory, without calling it.

    Raises
    ------
    InputError
        If it cannot be imported or is not callable, or if the module it names
        or the module that defines it belongs to the Python standard library
        (see :func:`is_stdlib_module`): such a callable is not a model factory.
    """
    module_name, _, factory_name = source.partition(":")
    refusal = f"entry point {source!r} is not a model factory: {{}} part of the Python standard library; refusing to call it"
    if is_stdlib_module(module_name):
        raise InputError(refusal.format(f"module {module_name!r} is"))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"cannot load model entry point {source!r}: {exc}") from None
    except Exception as exc:  # the user's module runs when imported and may raise anything
        raise InputError(f"cannot load model entry point {source!r}: importing {module_name!r} raised {one_line(exc)}") from None
    try:
        factory = getattr(module, factory_name)
    except AttributeError as exc:
        raise InputError(f"cannot load model entry point {source!r}: {exc}") from None
    owner = _defining_module(factory)
    if is_stdlib_module(owner):
        raise InputError(refusal.format(f"{factory_name!r} comes from module {owner!r},"))
    if not callable(factory):
        raise InputError(f"entry point {source!r} is not callable")
    return factory


def _load_file(path: Path) -> list[nn.Module]:
    """The member in a TorchScript archive or a simulation CNN state-dict file; any failure is one line naming the file."""
    if path.stat().st_size == 0:
        raise InputError(f"model file {path} is empty (0 bytes)")
    if _is_torchscript(path):
        try:
            return [torch.jit.load(str(path), map_location="cpu")]
        except Exception as exc:  # torch.jit.load raises RuntimeError, ValueError, ... on a damaged archive
            raise InputError(f"model file {path} looks like a TorchScript archive but cannot be loaded: {one_line(exc)}") from None
    from deepmr_dist.models.architectures import load_simulation_cnns

    try:
        return load_simulation_cnns([path])
    except InputError as exc:
        raise InputError(
            f"model file {path} is not a TorchScript archive or a simulation CNN state dict loadable with "
            f"weights_only=True: {one_line(exc.__cause__ or exc)}"
        ) from None


def _load_url(url: str, storage_options: Mapping[str, Any] | None) -> list[nn.Module]:
    """The member in a model file at an fsspec URL (``s3://bucket/m0.pt``), copied to a local temporary file.

    ``storage_options`` go to fsspec (an endpoint, credentials); without them,
    credentials and endpoints come from the environment, as s3fs and gcsfs read them.
    """
    import fsspec

    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            data = f.read()
    except (OSError, ValueError, TypeError, ImportError) as exc:  # TypeError: an option the filesystem does not take
        raise InputError(f"model file {url} cannot be read: {one_line(exc)}") from None
    with tempfile.TemporaryDirectory(prefix="deepmr-model-") as folder:
        local = Path(folder) / (url.rstrip("/").rpartition("/")[2] or "model.pt")
        local.write_bytes(data)
        try:
            return _load_file(local)
        except InputError as exc:
            raise InputError(str(exc).replace(str(local), url)) from None


def _load_source(source: str, options: dict[str, Any], storage_options: Mapping[str, Any] | None) -> list[nn.Module]:
    if "://" in source:
        return _load_url(source, storage_options)
    path = Path(source)
    if path.is_file():
        return _load_file(path)
    if is_entry_point(source):
        factory = resolve_entry_point(source)
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as exc:
            raise InputError(f"entry point {source!r} does not take the options {sorted(options)}: {exc}") from None
        try:
            built = factory(**options)
        except Exception as exc:  # the user's factory is code and may raise anything
            raise InputError(f"entry point {source!r} raised {one_line(exc)}") from None
        members = list(built) if isinstance(built, (list, tuple)) else [built]
        if not members or not all(isinstance(m, nn.Module) for m in members):
            raise InputError(f"entry point {source!r} must return a torch.nn.Module or a list of them")
        return members
    raise InputError(f"model {source!r} is neither an existing TorchScript file nor an entry point package.module:factory")


def load_members(spec: ModelSpec, device: torch.device | str = "cpu") -> list[nn.Module]:
    """Load every ensemble member in eval mode on ``device``."""
    members = [m for source in spec.sources for m in _load_source(source, dict(spec.options), spec.storage_options)]
    if spec.mc_dropout:
        if len(members) != 1:
            raise InputError(f"--mc-dropout needs exactly one model, got {len(members)} members")
        if isinstance(members[0], torch.jit.ScriptModule):
            raise InputError("--mc-dropout needs a Python model (an entry point), not a TorchScript archive")
        members = [freeze_dropout(members[0], seed=spec.mc_seed * 10_007 + i) for i in range(spec.mc_dropout)]
    return [m.to(device).eval() for m in members]


def member_names(spec: ModelSpec, n_members: int) -> list[str]:
    """Names of the ``member`` coordinate."""
    prefix = "mask" if spec.mc_dropout else "member"
    return [f"{prefix}{i}" for i in range(n_members)]


def fingerprint(members: Sequence[nn.Module], spec: ModelSpec) -> str:
    """A SHA-256 over every member's parameters and buffers and the MC-dropout settings."""
    digest = hashlib.sha256(f"mc_dropout={spec.mc_dropout};mc_seed={spec.mc_seed}".encode())
    for member in members:
        digest.update(type(member).__name__.encode())
        for name, tensor in member.state_dict().items():
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
