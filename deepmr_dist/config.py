"""Reading validated YAML configurations.

Configs are pydantic models that forbid unknown keys; :func:`load_config`
turns a validation failure into one :class:`~deepmr_dist.errors.InputError`
whose lines give the file, the YAML path of each bad field (``training.epochs``,
``analysis.methods[2]``) and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from deepmr_dist.errors import InputError

Config = TypeVar("Config", bound=BaseModel)


def field_path(location: tuple[int | str, ...]) -> str:
    """A pydantic error location as a YAML path: ``("analysis", "methods", 2)`` -> ``analysis.methods[2]``."""
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def validation_message(source: str, error: ValidationError) -> str:
    """One line per problem: ``SOURCE: PATH: what was expected (got VALUE)``."""
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        got = problem.get("input")
        shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
        lines.append(f"{source}: {field_path(problem['loc'])}: {message}{shown}")
    return "\n".join(lines)


def parse_config(data: Any, model: type[Config], source: str) -> Config:
    """Validate ``data`` (a mapping, e.g. parsed YAML) as ``model``.

    Raises
    ------
    InputError
        Naming ``source`` and the path of every bad field.
    """
    if not isinstance(data, dict):
        raise InputError(f"{source}: expected a mapping of settings at the top level, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise InputError(validation_message(source, error)) from None


def load_config(path: str | Path, model: type[Config]) -> Config:
    """Read and validate the YAML file at ``path`` as ``model``.

    Raises
    ------
    InputError
        If the file is missing, is not valid YAML, or a field is invalid (named by its YAML path).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise InputError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {error}") from None
    return parse_config({} if data is None else data, model, str(path))


def dump_config(config: BaseModel) -> str:
    """The config as YAML, every default written out (what a run records in its output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
