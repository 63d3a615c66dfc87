"""Reading validated YAML configurations, and the pieces every config shares.

Configs are pydantic models built from :class:`Section` (unknown keys are
errors); :func:`load_config` turns a validation failure into one
:class:`~deepmr_dist.errors.InputError` whose lines give the file, the YAML
path of each bad field (``training.epochs``, ``analysis.methods[2]``) and what
was expected. :data:`InstrumentRule`, :data:`MetaMethod`, :data:`Transform`
and :data:`MRMethods` check a field with the library's one check of those
names (an :class:`~deepmr_dist.errors.InputError` listing the valid ones);
:class:`ClusterSettings` is where a run's Dask tasks go.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from deepmr_dist.errors import InputError
from deepmr_dist.meta import check_method
from deepmr_dist.models.transforms import check_transform
from deepmr_dist.mr import check_methods
from deepmr_dist.stages.instruments import check_rule

Config = TypeVar("Config", bound=BaseModel)


class Section(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


# The checks raise InputError, a ValueError, which pydantic reports under the field's path.


def _mr_methods(methods: list[str]) -> list[str]:
    return list(check_methods(methods))


InstrumentRule = Annotated[str, AfterValidator(check_rule)]
"""A rule of :data:`deepmr_dist.stages.instruments.RULES`, checked by :func:`~deepmr_dist.stages.instruments.check_rule`."""
MetaMethod = Annotated[str, AfterValidator(check_method)]
"""A method of :func:`deepmr_dist.meta.meta_analysis`, checked by :func:`deepmr_dist.meta.check_method`."""
Transform = Annotated[str, AfterValidator(check_transform)]
"""A transform of :class:`~deepmr_dist.models.heads.OutputHead`, checked by :func:`deepmr_dist.models.transforms.check_transform`."""
MRMethods = Annotated[list[str], AfterValidator(_mr_methods)]
"""A non-empty list of :data:`deepmr_dist.mr.METHODS`, repeats dropped, checked by :func:`deepmr_dist.mr.check_methods`."""


class ClusterSettings(Section):
    """Where a run's Dask tasks run."""

    address: str = Field("local", description='"local" (embedded cluster) or a scheduler address')
    n_workers: int | None = Field(None, ge=1, description="workers of the embedded cluster (default: one per core)")


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


def read_yaml_mapping(path: Path) -> dict:
    """The YAML file at ``path`` as loaded by ``yaml.safe_load`` (``{}`` for an empty file).

    Raises
    ------
    InputError
        If the file cannot be read or is not valid YAML.
    """
    try:
        text = path.read_text()
    except OSError as error:
        raise InputError(f"cannot read config {path}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {error}") from None
    return {} if data is None else data


def load_config(path: str | Path, model: type[Config]) -> Config:
    """Read and validate the YAML file at ``path`` as ``model``.

    Raises
    ------
    InputError
        If the file is missing, is not valid YAML, or a field is invalid (named by its YAML path).
    """
    path = Path(path)
    return parse_config(read_yaml_mapping(path), model, str(path))


def dump_config(config: BaseModel) -> str:
    """The config as YAML, every default written out (what a run records in its output)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
