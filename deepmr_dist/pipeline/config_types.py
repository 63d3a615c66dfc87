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
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    """Where a run's Dask tasks run: the ``cluster:`` section, ``--cluster-config FILE`` and the cluster options.

    ``kind`` is ``local`` (an embedded cluster bound to ``host``), ``address`` (a running scheduler),
    ``scheduler_file`` (the scheduler that wrote ``scheduler_file``) or ``slurm`` (dask-jobqueue jobs
    of the ``jobs`` ... ``python`` fields, :class:`deepmr_dist.cluster.SlurmOptions`). The TLS files,
    ``gpu``, ``min_workers`` and ``connect_timeout`` apply to every kind.
    """

    kind: Literal["local", "address", "scheduler_file", "slurm"] = Field(
        "local", description="local, address, scheduler_file or slurm (default: address when an address is given)"
    )
    address: str = Field("local", description='"local" (embedded cluster), "slurm" or a scheduler address')
    scheduler_file: str | None = Field(None, description="JSON file of `dask scheduler --scheduler-file`")
    n_workers: int | None = Field(None, description="workers of the embedded cluster (default: one per core)")
    host: str = Field("127.0.0.1", description="interface of the embedded cluster's scheduler, workers and dashboard")
    min_workers: int | None = Field(None, description="workers to wait for before submitting")
    wait_timeout: float | None = Field(None, gt=0, description="seconds to wait for them (default: as long as it takes)")
    gpu: bool | None = Field(None, description="ISM tasks request GPU=1 (default: from the kind of cluster)")
    connect_timeout: float = Field(10.0, description="seconds to wait for a scheduler to answer")
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    jobs: int = Field(1, ge=1, description="slurm: jobs to submit, one worker each")
    queue: str | None = None
    account: str | None = None
    walltime: str = "01:00:00"
    memory: str = "8GB"
    cores: int = Field(1, ge=1, description="slurm: cores per job = worker threads")
    gpus_per_job: int = Field(0, ge=0)
    job_script_prologue: list[str] = Field(default_factory=list)
    job_directives: list[str] = Field(default_factory=list, description="slurm: extra #SBATCH options")
    interface: str | None = None
    local_directory: str | None = None
    log_directory: str | None = None
    python: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _kind_of_address(cls, data: Any) -> Any:
        """``address: tcp://...`` alone means ``kind: address``, ``address: slurm`` ``kind: slurm``, a scheduler file its kind."""
        if isinstance(data, dict) and "kind" not in data:
            address = data.get("address", "local")
            if data.get("scheduler_file"):
                data = {**data, "kind": "scheduler_file"}
            elif address in ("local", "slurm"):
                data = {**data, "kind": address}
            else:
                data = {**data, "kind": "address"}
        return data

    def with_overrides(self, overrides: dict[str, Any]) -> ClusterSettings:
        """These settings with ``overrides`` (fields; ``address``/``scheduler_file`` also set ``kind``), validated.

        Raises
        ------
        InputError
            Naming each bad field (counts and timeouts are checked by :func:`deepmr_dist.cluster.connect`).
        """
        data = self.model_dump(exclude_unset=True)
        if "address" in overrides or "scheduler_file" in overrides:
            data.pop("kind", None)
            data.pop("scheduler_file" if "address" in overrides else "address", None)
        return parse_config({**data, **overrides}, ClusterSettings, "cluster options")

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments of :func:`deepmr_dist.cluster.connect` for these settings.

        Raises
        ------
        InputError
            Incomplete TLS files, or a kind whose field (``address``, ``scheduler_file``) is missing.
        """
        from deepmr_dist.cluster import SlurmOptions, TLSFiles

        options: dict[str, Any] = {
            "tls": TLSFiles.of(self.tls_ca_file, self.tls_cert, self.tls_key),
            "gpu": self.gpu, "min_workers": self.min_workers, "wait_timeout": self.wait_timeout,
            "connect_timeout": self.connect_timeout,
        }
        if self.kind == "local":
            return {**options, "address": "local", "n_workers": self.n_workers, "host": self.host}
        if self.kind == "scheduler_file":
            if not self.scheduler_file:
                raise InputError("cluster: kind scheduler_file needs scheduler_file (or --scheduler-file PATH)")
            return {**options, "scheduler_file": self.scheduler_file}
        if self.kind == "address":
            if self.address in ("local", "slurm"):
                raise InputError(f"cluster: kind address needs a scheduler address, got {self.address!r}")
            return {**options, "address": self.address}
        slurm = SlurmOptions(
            jobs=self.jobs, queue=self.queue, account=self.account, walltime=self.walltime, memory=self.memory,
            cores=self.cores, gpus_per_job=self.gpus_per_job, job_script_prologue=tuple(self.job_script_prologue),
            job_directives=tuple(self.job_directives), interface=self.interface,
            local_directory=self.local_directory, log_directory=self.log_directory, python=self.python,
        )
        return {**options, "address": "slurm", "slurm": slurm}


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


ALIAS_NODE_BUDGET = 10_000
"""Nodes that YAML aliases may add to a document beyond those it writes out (or as many as it writes, if more)."""


class YAMLExpansionError(yaml.YAMLError):
    """A YAML document whose aliases expand beyond :data:`ALIAS_NODE_BUDGET`, or refer to themselves."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [child for pair in node.value for child in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def check_expansion(root: yaml.Node) -> None:
    """Refuse a composed YAML document whose aliases would expand it beyond :data:`ALIAS_NODE_BUDGET`.

    The composed document is a graph in which an alias is one more reference to
    its anchor's node. Each node's expanded size (itself plus the expanded sizes
    of its children, every reference counted) is summed once per node, in one
    pass over the graph, so that a "billion laughs" document is measured, not
    built.

    Raises
    ------
    YAMLExpansionError
        If the expanded document holds more than ``written + max(ALIAS_NODE_BUDGET, written)``
        nodes (``written``: the distinct nodes of the file), or an alias refers to a node that contains it.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        if finished:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in _children(node))
            continue
        if id(node) in sizes:
            continue
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in _children(node):
            if id(child) in open_nodes:
                raise YAMLExpansionError(f"line {child.start_mark.line + 1}: an alias refers to a node that contains it")
            stack.append((child, False))
    written, expanded = len(sizes), sizes[id(root)]
    if expanded - written > max(ALIAS_NODE_BUDGET, written):
        raise YAMLExpansionError(
            f"its aliases expand {written:,} written nodes to {expanded:,} (at most {max(ALIAS_NODE_BUDGET, written):,} "
            f"more are allowed); write the values out, or use fewer nested aliases"
        )


class BoundedSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that checks each composed document with :func:`check_expansion` before constructing it."""

    def compose_document(self) -> yaml.Node:
        node = super().compose_document()
        check_expansion(node)
        return node


def _yaml_problem(error: yaml.YAMLError) -> str:
    """What a YAML error says, in one line (``line L, column C: context: problem`` where it has a mark)."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        what = ": ".join(part for part in (error.context, error.problem) if part)
        return f"line {mark.line + 1}, column {mark.column + 1}: {what}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def read_yaml_mapping(path: Path) -> dict:
    """The YAML file at ``path`` as loaded by :class:`BoundedSafeLoader` (``{}`` for an empty file).

    The loader constructs only plain YAML types, as ``yaml.safe_load`` does, and
    refuses aliases that would expand the document beyond :data:`ALIAS_NODE_BUDGET`
    nodes (measured before anything is built) or that refer to themselves.

    Raises
    ------
    InputError
        In one line naming the file: if it cannot be read, is not UTF-8 text, is not valid YAML (with
        the line and column), nests too deeply, or expands beyond the bound.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read config {path}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not a text file (byte 0x{error.object[error.start]:02x} at offset {error.start} is not "
            f"UTF-8); a config is YAML text"
        ) from None
    try:
        data = yaml.load(text, Loader=BoundedSafeLoader)
    except YAMLExpansionError as error:
        raise InputError(f"{path}: refused: {error}") from None
    except yaml.YAMLError as error:
        raise InputError(f"{path} is not valid YAML: {_yaml_problem(error)}") from None
    except RecursionError:
        raise InputError(f"{path}: YAML nested too deeply to read") from None
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
