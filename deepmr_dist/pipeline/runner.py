"""``deepmr run``: a declarative pipeline, stage by stage and resumable.

Stages, each skipped when its result exists and was made from the same
settings (a fingerprint of the config sections it depends on):

1. ``sequences``: FASTA, BED + genome, one-hot, or one simulated round;
2. ``train`` (simulation only): the paper's CNN, one member per Dask task;
3. ``ism``: :func:`deepmr_dist.stages.predict.predict` (resumes chunk by chunk);
4. ``effects``: effects and SEs, optionally calibrated on held-out loci;
5. ``mr``: instruments and per-locus MR of every pair, all pairs from one pass over the effects;
6. ``meta``: the meta-analysis of every (pair, method) across loci;
7. ``truth`` (simulation only): the true causal effects;
8. outputs: local and global CE tables (CSV and Parquet), the global CE per
   motif-spacing bin when ``spacing`` is configured, the resolved config,
   stage timings and the HTML report (:mod:`deepmr_dist.pipeline.report`).

Outputs beside the store ``runs/name.zarr`` go to ``runs/name/``: ``members/``
(trained simulation members), ``local_ce.{csv,parquet}``,
``global_ce.{csv,parquet}``, ``pipeline.yaml``, ``timings.json``, ``report.html``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
import zarr

from deepmr_dist import schema
from deepmr_dist.io import store
from deepmr_dist.stages.causal_effects import global_ce, local_ce
from deepmr_dist.pipeline.config_types import dump_config
from deepmr_dist.stages.effects import write_effects
from deepmr_dist.errors import InputError
from deepmr_dist.models.architectures import head_for_tasks
from deepmr_dist.models.ensemble import ModelSpec, is_entry_point, load_members, resolve_entry_point
from deepmr_dist.models.heads import OutputHead, parse_tasks
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.outputs import global_table_from, local_table_from
from deepmr_dist.pipeline.report import write_report
from deepmr_dist.stages.predict import ISMSettings, validate_model, predict
from deepmr_dist.io.sequence import read_bed_regions, read_fasta, read_onehot, sequences_dataset
from deepmr_dist.simulation.generator import one_hot, select_split, simulate_round
from deepmr_dist.pipeline.study import fit_round_calibration, motif_set
from deepmr_dist.simulation.training import TrainedMember, train_ensemble
from deepmr_dist.simulation.truth import true_causal_effects

__all__ = ["Plan", "PipelineResult", "entry_points", "output_directory", "plan", "run_pipeline"]

STAGE_ATTR = "deepmr_stage_fingerprint"
SIMULATION_TASKS = ("exposure", "outcome")


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
            f"{n_chunks} chunk(s) of {self.chunk_loci} loci, one ISM task each",
        ]
        return "\n".join(lines)


@dataclass
class PipelineResult:
    """Where a run's results are and what it printed."""

    store: str
    outputs: Path
    global_table: pd.DataFrame
    true_global_ce: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def output_directory(config: PipelineConfig) -> Path:
    """``runs/name.zarr`` -> ``runs/name`` (members, tables, figures, report)."""
    path = Path(config.store.split("://", 1)[-1])
    return path.with_suffix("") if path.suffix else path.with_name(path.name + "-outputs")


# --------------------------------------------------------------------------- stages


def load_sequences(config: PipelineConfig) -> tuple[xr.Dataset, xr.Dataset | None]:
    """The loci to mutate, and the simulated round they come from (or None)."""
    seq = config.sequences
    if seq.fasta:
        return read_fasta(seq.fasta), None
    if seq.onehot:
        return read_onehot(seq.onehot), None
    if seq.bed:
        return read_bed_regions(seq.bed, seq.genome, seq.width), None
    sim = seq.simulation
    motifs = motif_set(sim.motifs)
    ds = simulate_round(sim.scenario, sim.round, seed=sim.seed, motifs=motifs, config=sim.generator)
    test = select_split(ds, "test")
    if test.sizes["locus"] == 0:
        raise InputError("sequences.simulation.generator.n_test is 0: there are no loci to mutate")
    return sequences_dataset(test["sequence"].values.astype(np.int8), test["locus"].values), ds


def output_head(config: PipelineConfig) -> OutputHead:
    """The head of ``config.tasks`` (the simulation's CNN names its outputs exposure, outcome).

    With ``tasks.names``, kept tasks may be named (unknown names are errors
    with close matches suggested) or given by index.
    """
    tasks = config.tasks
    names = tasks.names or (list(SIMULATION_TASKS) if config.model.train_simulation else None)
    if names is not None:
        keep = None if tasks.keep is None else [names[t] if isinstance(t, int) else t for t in tasks.keep]
        return head_for_tasks(
            names, keep, transform=tasks.transform, output_index=tasks.output_index, profile_axis=tasks.profile_axis
        )
    try:
        indices, task_names = parse_tasks(None if tasks.keep is None else ",".join(map(str, tasks.keep)), None)
        return OutputHead(tasks.output_index, tasks.profile_axis, indices, tasks.transform, task_names)
    except ValueError as exc:
        raise InputError(f"tasks: {exc}") from None


def resolve_pairs(config: PipelineConfig, task_names: list[str]) -> list[tuple[str, str]]:
    """Explicit pairs checked against the model's tasks, or all ordered pairs of them."""
    if config.pairs == "all":
        return list(itertools.permutations(task_names, 2))
    for index, (exposure, outcome) in enumerate(config.pairs):
        for task in (exposure, outcome):
            if task not in task_names:
                raise InputError(f"pairs[{index}] names task {task!r}, which the model does not have; tasks: {task_names}")
    return [tuple(pair) for pair in config.pairs]


def train_members(config: PipelineConfig, round_ds: xr.Dataset, out_dir: Path, client) -> ModelSpec:
    """Train (or reuse, when trained with the same settings) the simulation's ensemble."""
    marker = out_dir / "members.json"
    fingerprint = config.stage_fingerprint("sequences", "model")
    paths = [out_dir / f"member-{i}.pt" for i in range(config.model.members)]
    if marker.exists() and json.loads(marker.read_text()).get("fingerprint") == fingerprint and all(p.exists() for p in paths):
        return ModelSpec(tuple(str(p) for p in paths))
    train = select_split(round_ds, "train", "variant")
    members: list[TrainedMember] = train_ensemble(
        one_hot(train["sequence"].values), train["label"].values, config.model.members,
        [config.sequences.simulation.seed * 1000 + i for i in range(config.model.members)],
        client=client, out_dir=out_dir, settings=config.model.training,
    )
    marker.write_text(json.dumps({"fingerprint": fingerprint, "members": [str(m.path) for m in members]}))
    return ModelSpec(tuple(str(m.path) for m in members))


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


def model_spec(config: PipelineConfig) -> ModelSpec:
    """The ensemble of ``config.model.sources``."""
    options = tuple((name, _frozen(value)) for name, value in sorted(config.model.options.items()))
    return ModelSpec(tuple(config.model.sources), mc_dropout=config.model.mc_dropout, mc_seed=config.model.mc_seed, options=options)


def _frozen(value: Any) -> Any:
    """YAML lists as tuples (a ModelSpec is frozen and hashable)."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


def run_pipeline(config: PipelineConfig, *, client, progress: bool = True, overwrite: bool = False) -> PipelineResult:
    """Run every stage of ``config`` on the cluster of ``client``, skipping finished ones.

    The store and the entry points are checked before anything runs: a store
    path that :func:`deepmr_dist.stages.predict.predict` would refuse for anything but
    its fingerprint is refused before training. ``overwrite`` is predict's: it
    replaces a deepmr store of another run, or one whose ``ism`` group is damaged.

    Returns
    -------
    PipelineResult
        The store, the output directory, the global CE table and, for a
        simulation, the true global CE.
    """
    store.check_overwritable(store.inspect_target(config.store), overwrite=overwrite)
    entry_points(config)  # refuses a bad entry point by its YAML field before anything runs
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    outputs = output_directory(config)
    outputs.mkdir(parents=True, exist_ok=True)
    loci, round_ds = load_sequences(config)
    seconds["sequences"] = time.perf_counter() - tick

    tick = time.perf_counter()
    spec = train_members(config, round_ds, outputs / "members", client) if config.model.train_simulation else model_spec(config)
    seconds["train"] = time.perf_counter() - tick

    tick = time.perf_counter()
    settings = ISMSettings(
        head=output_head(config), chunk_loci=config.ism.chunk_loci,
        mutant_batch=config.ism.mutant_batch, incremental=config.ism.incremental,
    )
    path = config.store
    predict(loci, spec, path, client=client, settings=settings, overwrite=overwrite, progress=progress)
    tasks = [str(t) for t in store.open_run(path)[schema.ISM]["task"].values]
    pairs = resolve_pairs(config, tasks)
    seconds["ism"] = time.perf_counter() - tick

    tick = time.perf_counter()
    fp = config.stage_fingerprint("sequences", "model", "tasks", "ism", "effects")
    if _stage_done(path, schema.EFFECTS, fp):
        effects = xr.open_zarr(path, group=schema.EFFECTS, consolidated=False)
    else:
        calibration = fit_round_calibration(round_ds, spec, ddof=config.effects.ddof) if config.effects.calibration else None
        effects = write_effects(path, ddof=config.effects.ddof, calibration=calibration)
        _mark_stage(path, schema.EFFECTS, fp)
    seconds["effects"] = time.perf_counter() - tick

    tick = time.perf_counter()
    fp = config.stage_fingerprint("sequences", "model", "tasks", "ism", "effects", "instruments", "mr", "pairs")
    if _stage_done(path, schema.MR, fp):
        local = xr.open_zarr(path, group=schema.MR, consolidated=False)
    else:
        local = local_ce(
            effects, pairs, config.mr.methods, rule=config.instruments.rule, threshold=config.instruments.threshold,
            ddof=config.effects.ddof, n_boot=config.mr.n_boot, seed=config.mr.seed,
        )
        local = store.write_group(path, local, schema.MR)
        _mark_stage(path, schema.MR, fp)
    seconds["mr"] = time.perf_counter() - tick

    tick = time.perf_counter()
    global_ = store.write_group(path, global_ce(local, meta_method=config.meta.method, hksj=config.meta.hksj), schema.META)
    true_global = None
    if round_ds is not None:
        truth = true_causal_effects(round_ds)
        store.write_group(path, truth.reindex(locus=loci["locus"].values), schema.TRUTH)
        true_global = float(truth["global_true_ce"])
    local_table, global_table = local_table_from(local), global_table_from(global_)
    for name, table in (("local_ce", local_table), ("global_ce", global_table)):
        table.to_csv(outputs / f"{name}.csv", index=False)
        table.to_parquet(outputs / f"{name}.parquet", index=False)
    if config.spacing is not None:
        spacing = spacing_table(config, local)
        for suffix in ("csv", "parquet"):
            getattr(spacing, f"to_{suffix}")(outputs / f"spacing.{suffix}", index=False)
    seconds["meta_and_tables"] = time.perf_counter() - tick
    (outputs / "pipeline.yaml").write_text(dump_config(config))
    (outputs / "timings.json").write_text(json.dumps(seconds, indent=1))

    write_report(path, outputs=outputs)
    return PipelineResult(store=path, outputs=outputs, global_table=global_table, true_global_ce=true_global, seconds=seconds)


def spacing_table(config: PipelineConfig, local: xr.Dataset) -> pd.DataFrame:
    """Global CE per (pair, method, motif-spacing bin) from the loci's motif instances."""
    from deepmr_dist.stages.spacing import locus_spacing, motif_instances, spacing_bins, stratified_global_ce

    pairs = [(str(e), str(o)) for e, o in zip(local["exposure"].values, local["outcome"].values)]
    distance = locus_spacing(motif_instances(config.spacing.motifs_bed), local, pairs, motif_names=config.spacing.motif_names)
    bins = spacing_bins(distance, config.spacing.edges)
    return stratified_global_ce(local, bins, config.meta.method, hksj=config.meta.hksj)


def _stage_done(path: str, group: str, fingerprint: str) -> bool:
    try:
        return zarr.open_group(path, path=group, mode="r").attrs.get(STAGE_ATTR) == fingerprint
    except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError):
        return False


def _mark_stage(path: str, group: str, fingerprint: str) -> None:
    zarr.open_group(path, path=group, mode="r+").attrs[STAGE_ATTR] = fingerprint
