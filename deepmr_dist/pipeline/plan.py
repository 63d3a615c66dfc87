"""What a pipeline config resolves to: its loci, model, head and pairs, and the ``--dry-run`` plan.

These functions turn the declarative sections of a
:class:`~deepmr_dist.pipeline.config.PipelineConfig` into the inputs of the
stages (:mod:`deepmr_dist.pipeline.runner` calls them), and :func:`plan` uses
them to tell what a run would compute without running it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from deepmr_dist.errors import InputError
from deepmr_dist.io.store import tasks_per_chunk
from deepmr_dist.io.sequence import read_bed_regions, read_fasta, read_onehot, sequences_dataset
from deepmr_dist.models.architectures import head_for_tasks
from deepmr_dist.models.ensemble import ModelSpec, is_entry_point, load_members, resolve_entry_point
from deepmr_dist.models.heads import OutputHead, parse_tasks
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.simulation.generator import select_split, simulate_round
from deepmr_dist.simulation.motifs import MotifSet
from deepmr_dist.stages.predict import validate_model

__all__ = [
    "SIMULATION_TASKS",
    "Plan",
    "entry_points",
    "load_sequences",
    "member_seeds",
    "model_spec",
    "output_head",
    "pair_tasks",
    "plan",
    "resolve_pairs",
]

SIMULATION_TASKS = ("exposure", "outcome")
"""Outputs of the simulation's CNN, in output order."""


@dataclass(frozen=True)
class Plan:
    """What a pipeline will compute (``--dry-run``).

    ``entry_points`` holds ``(entry point, YAML field)`` of the Python code the
    pipeline calls to build its model (already called once by :func:`plan` to
    learn the model's tasks).
    """

    entry_points: list[tuple[str, str]]
    n_loci: int
    length: int
    n_members: int
    tasks: list[str]
    pairs: list[tuple[str, str]]
    chunk_loci: int
    forward_passes: int
    mut_pred_bytes: int
    train_members: int

    def describe(self) -> str:
        """The plan as the lines ``--dry-run`` prints."""
        n_chunks = -(-self.n_loci // self.chunk_loci)
        calls = ", ".join(f"{source} ({field})" for source, field in self.entry_points) or "none"
        lines = [
            f"will call entry point(s): {calls}",
            f"loci: {self.n_loci} x {self.length} bp; ensemble: {self.n_members} members"
            + (f" (trained first: {self.train_members} members)" if self.train_members else ""),
            f"tasks: {', '.join(self.tasks)}; pairs: {len(self.pairs)} ({', '.join(f'{e}->{o}' for e, o in self.pairs)})",
            f"forward passes: {self.forward_passes:,} (loci x members x (3 x length mutants + reference))",
            f"store: mut_pred {self.mut_pred_bytes / 2**20:,.1f} MiB float32 before compression; "
            f"{n_chunks} chunk(s) of {self.chunk_loci} loci, one ISM task each{self._task_chunking()}",
        ]
        return "\n".join(lines)

    def _task_chunking(self) -> str:
        """How each ``mut_pred`` chunk is split along ``task`` (:func:`deepmr_dist.io.store.tasks_per_chunk`)."""
        column = min(self.chunk_loci, self.n_loci) * self.n_members * self.length * 4 * 4
        per = tasks_per_chunk(column, len(self.tasks))
        if per == len(self.tasks):
            return ""
        return f", each a shard of inner chunks of {per} task(s) ({per * column / 2**20:,.2f} MiB)"


def load_sequences(config: PipelineConfig) -> tuple[xr.Dataset, xr.Dataset | None]:
    """The loci to mutate, and the simulated round they come from (or None).

    Raises
    ------
    InputError
        If a sequence file is bad (named), or a simulated round has no test loci.
    """
    seq = config.sequences
    if seq.fasta:
        return read_fasta(seq.fasta, iupac=seq.iupac), None
    if seq.onehot:
        return read_onehot(seq.onehot), None
    if seq.bed:
        return read_bed_regions(seq.bed, seq.genome, seq.width, iupac=seq.iupac), None
    sim = seq.simulation
    motifs = MotifSet.resolve(sim.motifs.exposure, sim.motifs.outcome, sim.motifs.confounder)
    ds = simulate_round(sim.scenario, sim.round, seed=sim.seed, motifs=motifs, config=sim.generator)
    test = select_split(ds, "test")
    if test.sizes["locus"] == 0:
        raise InputError("sequences.simulation.generator.n_test is 0: there are no loci to mutate")
    return sequences_dataset(test["sequence"].values.astype(np.int8), test["locus"].values), ds


def member_seeds(config: PipelineConfig) -> list[int]:
    """Training seeds of the simulation's members: ``model.seeds``, or 1000 x the round's seed + member index."""
    if config.model.seeds is not None:
        return list(config.model.seeds)
    return [config.sequences.simulation.seed * 1000 + i for i in range(config.model.members)]


def output_head(config: PipelineConfig) -> OutputHead:
    """The head of ``config.tasks`` (the simulation's CNN names its outputs exposure, outcome).

    With ``tasks.names``, kept tasks may be named (unknown names are errors
    with close matches suggested) or given by index. ``tasks.keep: pairs``
    keeps the tasks of :func:`pair_tasks`.
    """
    tasks = config.tasks
    names = tasks.names or (list(SIMULATION_TASKS) if config.model.train_simulation else None)
    keep = pair_tasks(config, names) if tasks.keep == "pairs" else tasks.keep
    if names is not None:
        keep = None if keep is None else [names[t] if isinstance(t, int) else t for t in keep]
        return head_for_tasks(
            names, keep, transform=tasks.transform, output_index=tasks.output_index, profile_axis=tasks.profile_axis
        )
    try:
        indices, task_names = parse_tasks(None if keep is None else ",".join(map(str, keep)), None)
        return OutputHead(tasks.output_index, tasks.profile_axis, indices, tasks.transform, task_names)
    except ValueError as exc:
        raise InputError(f"tasks: {exc}") from None


_DEFAULT_NAME = re.compile(r"task(\d+)")
"""The name :class:`~deepmr_dist.models.heads.OutputHead` gives output ``i`` when no names are known: ``task<i>``."""


def pair_tasks(config: PipelineConfig, names: list[str] | None) -> list[str] | list[int]:
    """The tasks ``config.pairs`` names, each once, in model output order (``tasks.keep: pairs``).

    Parameters
    ----------
    names
        Names of every model output (``tasks.names``, or the simulation's); ``None``:
        the outputs have the default names ``task0, task1, ...``, and the indices are returned.

    Raises
    ------
    InputError
        Naming the pair whose task is not an output of the model (by ``names``, or not ``task<i>``).
    """
    found: dict[str, int] = {}
    for index, pair in enumerate(config.pairs):
        for task in pair:
            match = _DEFAULT_NAME.fullmatch(task)
            if names is not None and task not in names:
                raise InputError(
                    f"pairs[{index}] names task {task!r}, which tasks.names does not have (tasks.keep: pairs keeps the pairs' tasks)"
                )
            if names is None and match is None:
                raise InputError(
                    f"pairs[{index}] names task {task!r}, but without tasks.names the outputs are named "
                    "task0, task1, ... (give tasks.names to keep the pairs' tasks by name)"
                )
            found[task] = names.index(task) if names is not None else int(match.group(1))
    ordered = sorted(found, key=found.__getitem__)
    return ordered if names is not None else [found[task] for task in ordered]


def resolve_pairs(config: PipelineConfig, task_names: list[str]) -> list[tuple[str, str]]:
    """Explicit pairs checked against the model's tasks, or all ordered pairs of them."""
    if config.pairs == "all":
        return list(itertools.permutations(task_names, 2))
    for index, (exposure, outcome) in enumerate(config.pairs):
        for task in (exposure, outcome):
            if task not in task_names:
                raise InputError(f"pairs[{index}] names task {task!r}, which the model does not have; tasks: {task_names}")
    return [tuple(pair) for pair in config.pairs]


def entry_points(config: PipelineConfig) -> list[tuple[str, str]]:
    """``(entry point, YAML field)`` of every ``package.module:factory`` in ``model.sources``, resolved but not called.

    Raises
    ------
    InputError
        Naming the field of an entry point that cannot be imported or that
        :func:`deepmr_dist.models.ensemble.resolve_entry_point` refuses (the standard library).
    """
    found = []
    for index, source in enumerate(config.model.sources):
        if is_entry_point(source):
            field = f"model.sources[{index}]"
            try:
                resolve_entry_point(source)
            except InputError as exc:
                raise InputError(f"{field}: {exc}") from None
            found.append((source, field))
    return found


def model_spec(config: PipelineConfig) -> ModelSpec:
    """The ensemble of ``config.model.sources``; URLs among them are read with ``model.storage_options``, else the store's."""
    options = tuple((name, _frozen(value)) for name, value in sorted(config.model.options.items()))
    storage = config.model.storage_options if config.model.storage_options is not None else config.storage_options
    return ModelSpec(tuple(config.model.sources), mc_dropout=config.model.mc_dropout, mc_seed=config.model.mc_seed,
                     options=options, storage_options=storage or None)  # fmt: skip


def _frozen(value: Any) -> Any:
    """YAML lists as tuples (a ModelSpec is frozen and hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def plan(config: PipelineConfig) -> Plan:
    """Loci, members, tasks, pairs, forward passes and store size, without running anything heavy.

    The model is built (its entry points called, see :func:`entry_points`) to learn its tasks.
    """
    calls = entry_points(config)
    loci, _ = load_sequences(config)
    head = output_head(config)
    if config.model.train_simulation:
        n_members, tasks = config.model.members, list(head.task_names or SIMULATION_TASKS)
    else:
        spec = model_spec(config)
        members = load_members(spec)
        tasks = validate_model(members, spec, head, loci)
        n_members = len(members)
    pairs = resolve_pairs(config, tasks)
    n_loci, length = loci.sizes["locus"], loci.sizes["position"]
    return Plan(
        entry_points=calls, n_loci=n_loci, length=length, n_members=n_members, tasks=tasks, pairs=pairs,
        chunk_loci=config.ism.chunk_loci,
        forward_passes=n_loci * n_members * (3 * length + 1),
        mut_pred_bytes=n_loci * n_members * length * 4 * len(tasks) * 4,
        train_members=config.model.members if config.model.train_simulation else 0,
    )
