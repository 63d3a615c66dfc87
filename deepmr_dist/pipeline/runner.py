"""The one runner: a pipeline's stages, each fingerprinted, skipped when unchanged, timed and written once.

:data:`STAGES` is the table of every stage ``deepmr run`` knows, in order. A
stage names the store group it writes, the config sections its result
depends on and the stages whose results it reads. Its fingerprint is the
SHA-256 of those sections and of those stages' fingerprints, so a change
anywhere upstream (a new model file behind the same path included: the ``ism``
stage's fingerprint is the store's, which hashes the weights) recomputes
exactly the stages downstream of it. A stage whose recorded fingerprint equals
the new one is not run; its result is opened from the store.

- A group stage's result is written by :func:`deepmr_dist.io.store.write_group`,
  which writes it under a staging name and swaps it in, fingerprint included,
  only once every chunk is written: a stage that fails leaves the previous group.
- ``ism`` keeps its own per-chunk ``complete`` ledger
  (:func:`deepmr_dist.stages.predict.predict` resumes chunk by chunk), so the
  runner always calls it; before anything reads its predictions, the runner
  verifies them (:func:`deepmr_dist.io.verify.verify_ism`: listing and sizes, or
  every checksum with ``verify="full"``) and has damaged chunks recomputed.
- The whole run holds the store's lease (:func:`deepmr_dist.io.lock.lock`): a
  second writer of the same store is refused.
- Stages without a group (the trained members) record their fingerprints in
  ``stages.json`` in the output folder.
- ``outputs`` (the tables, the resolved config, the timings and the report)
  is rewritten on every run.

A simulation study (:mod:`deepmr_dist.pipeline.study`) is a loop over rounds
that builds each round's :class:`PipelineConfig` and calls :func:`run_pipeline`;
its ``--rescore`` is a rerun in which training and ISM are unchanged, hence skipped.

A new stage is one entry in :data:`STAGES` and one function ``(Run) -> result``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.cluster import task_resources
from deepmr_dist.io import store
from deepmr_dist.io.progress import shown as progress_bars
from deepmr_dist.io.location import check_reachable, normalize
from deepmr_dist.io.lock import DEFAULT_LOCK_TIMEOUT, lock
from deepmr_dist.io.verify import mark_incomplete, verify_ism
from deepmr_dist.models.ensemble import ModelSpec, load_members
from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import dump_config
from deepmr_dist.pipeline.outputs import Outputs, global_table_from, local_table_from, output_location, write_table
from deepmr_dist.pipeline.plan import entry_points, load_sequences, member_seeds, model_spec, output_head, resolve_pairs
from deepmr_dist.simulation.generator import one_hot, select_split
from deepmr_dist.simulation.training import train_ensemble
from deepmr_dist.simulation.truth import true_causal_effects_of
from deepmr_dist.stages.calibration import Calibration, fit_simulated_calibration
from deepmr_dist.stages.causal_effects import global_ce, local_ce
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.stages.predict import ISMSettings, predict

__all__ = ["STAGES", "PipelineResult", "Run", "Stage", "run_pipeline"]

log = logging.getLogger(__name__)

LEDGER = "stages.json"
"""File in the output folder holding the fingerprints of the stages that write no store group."""


@dataclass
class Run:
    """The state of one run, passed to every stage function.

    ``results`` maps a finished stage's name to its result (a lazily opened
    Dataset for a group stage); ``fingerprints`` to its fingerprint.
    """

    config: PipelineConfig
    client: Any
    outputs: Outputs
    progress: bool = True
    overwrite: bool = False
    verify: Literal["cheap", "full"] = "cheap"
    loci: xr.Dataset | None = None
    simulated: xr.Dataset | None = None
    results: dict[str, Any] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> str:
        """The run store's path or URL."""
        return self.config.store

    @property
    def storage_options(self) -> dict[str, Any] | None:
        """fsspec options of the store (None for a local one)."""
        return self.config.storage_options or None


@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Attributes
    ----------
    name
        Also the key of its result in :attr:`Run.results`.
    compute
        ``(run) -> result``: a Dataset for a group stage (written by the runner), anything otherwise.
    group
        The store group the result is written to, or ``None``.
    sections
        Config sections the result depends on.
    after
        Stages whose results it reads (their fingerprints enter its own).
    when
        Whether the config has this stage at all.
    load
        How a skipped group-less stage's result is rebuilt (``None``: the stage is never skipped).
    ledger
        The stage keeps its own resume ledger and fingerprint (``ism``): always called, it returns
        ``(result, whether it found everything already done)``, and its fingerprint is the store's.
    """

    name: str
    compute: Callable[[Run], Any]
    group: str | None = None
    sections: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    when: Callable[[PipelineConfig], bool] = lambda config: True
    load: Callable[[Run], Any] | None = None
    ledger: bool = False


@dataclass
class PipelineResult:
    """Where a run's results are, what it computed and what it skipped.

    ``datasets`` holds every group stage's result, opened lazily from the
    store; ``simulated`` the simulated round of a simulation pipeline.
    """

    store: str
    outputs: Path | str
    """The output folder, or its URL where it is remote."""
    global_table: pd.DataFrame
    true_global_ce: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    datasets: dict[str, xr.Dataset] = field(default_factory=dict)
    simulated: xr.Dataset | None = None
    members: ModelSpec | None = None


# --------------------------------------------------------------------------- stage functions


def _sequences(run: Run) -> xr.Dataset:
    run.loci, run.simulated = load_sequences(run.config)
    return run.loci


MEMBERS = "members"
"""Folder of the trained members in the outputs location (``member-<i>.pt`` and ``member-<i>.json``)."""


def _member_names(run: Run) -> list[str]:
    """The trained members' names in the outputs location, local or remote: ``members/member-<i>.pt``."""
    return [f"{MEMBERS}/member-{i}.pt" for i in range(run.config.model.members)]


def _members_spec(run: Run) -> ModelSpec:
    """The trained members as a model: read through fsspec with the outputs' storage options."""
    return ModelSpec(tuple(run.outputs.url(name) for name in _member_names(run)), storage_options=run.outputs.storage_options)


def _train(run: Run) -> ModelSpec:
    train = select_split(run.simulated, "train", "variant")
    train_ensemble(
        one_hot(train["sequence"].values), train["label"].values, run.config.model.members, member_seeds(run.config),
        client=run.client, resources=task_resources(run.client), out_dir=run.outputs.url(MEMBERS),
        storage_options=run.outputs.storage_options, settings=run.config.model.training,
    )  # fmt: skip
    return _members_spec(run)


def _trained(run: Run) -> ModelSpec | None:
    return _members_spec(run) if all(run.outputs.exists(name) for name in _member_names(run)) else None


def _model(run: Run) -> ModelSpec:
    return model_spec(run.config)


def _calibration(run: Run) -> xr.Dataset:
    held_out = select_split(run.simulated, "calibration")
    sim = run.config.sequences.simulation
    source = f"scenario {sim.scenario} round {sim.round}: {held_out.sizes['locus']} calibration loci"
    members = load_members(run.results["model"])
    fitted = fit_simulated_calibration(members, held_out, ddof=run.config.effects.ddof, source=source)
    return fitted.to_dataset()


def _ism(run: Run) -> tuple[xr.Dataset, bool]:
    settings = ISMSettings(
        head=output_head(run.config), chunk_loci=run.config.ism.chunk_loci,
        mutant_batch=run.config.ism.mutant_batch, incremental=run.config.ism.incremental,
        precision=run.config.ism.precision, compile=run.config.ism.compile,
    )  # fmt: skip
    ism = predict(run.loci, run.results["model"], run.store, client=run.client, settings=settings,
                  overwrite=run.overwrite, progress=run.progress, storage_options=run.storage_options)  # fmt: skip
    return ism, ism.attrs["predict_report"]["chunks_computed"] == 0


def _effects(run: Run) -> xr.Dataset:
    calibration = None
    if "calibration" in run.results:
        calibration = Calibration.from_dataset(run.results["calibration"].load())
    effects = run.config.effects
    return compute_effects(run.results["ism"], ddof=effects.ddof, calibration=calibration, dtype=effects.dtype)


def _mr(run: Run) -> xr.Dataset:
    config = run.config
    pairs = resolve_pairs(config, [str(t) for t in run.results["ism"]["task"].values])
    return local_ce(
        run.results["effects"], pairs=pairs, methods=config.mr.methods, rule=config.instruments.rule,
        threshold=config.instruments.threshold, ddof=config.effects.ddof, n_boot=config.mr.n_boot, seed=config.mr.seed,
    )  # fmt: skip


def _meta(run: Run) -> xr.Dataset:
    return global_ce(run.results["mr"], meta_method=run.config.meta.method, hksj=run.config.meta.hksj)


def _truth(run: Run) -> xr.Dataset:
    return true_causal_effects_of(run.simulated, run.loci["locus"].values)


def _outputs(run: Run) -> pd.DataFrame:
    """The local and global CE tables (CSV and Parquet), the spacing table, the resolved config."""
    local, global_ = run.results["mr"], run.results["meta"]
    global_table = global_table_from(global_)
    write_table(local_table_from(local), run.outputs, "local_ce")
    write_table(global_table, run.outputs, "global_ce")
    if run.config.spacing is not None:
        write_table(_spacing_table(run.config, local), run.outputs, "spacing")
    # storage options may hold credentials: the written config leaves them out
    run.outputs.write_bytes("pipeline.yaml", dump_config(run.config.model_copy(update={"storage_options": {}})).encode())
    return global_table


def _report(run: Run) -> Path | str:
    from deepmr_dist.pipeline.report import write_report

    return write_report(run.store, outputs=run.outputs, storage_options=run.storage_options)


def _spacing_table(config: PipelineConfig, local: xr.Dataset) -> pd.DataFrame:
    """Global CE per (pair, method, motif-spacing bin) from the loci's motif instances."""
    from deepmr_dist.stages.spacing import locus_spacing, motif_instances, spacing_bins, stratified_global_ce

    pairs = [(str(e), str(o)) for e, o in zip(local["exposure"].values, local["outcome"].values)]
    distance = locus_spacing(motif_instances(config.spacing.motifs_bed), local, pairs, motif_names=config.spacing.motif_names)
    bins = spacing_bins(distance, config.spacing.edges)
    return stratified_global_ce(local, spacing_bins=bins, meta_method=config.meta.method, hksj=config.meta.hksj)


def _trains(config: PipelineConfig) -> bool:
    return config.model.train_simulation


def _simulates(config: PipelineConfig) -> bool:
    return config.sequences.simulation is not None


STAGES: tuple[Stage, ...] = (
    Stage("sequences", _sequences, sections=("sequences",)),
    Stage("model", _train, sections=("sequences", "model"), after=("sequences",), when=_trains, load=_trained),
    Stage("model", _model, sections=("model",), when=lambda config: not _trains(config)),
    Stage("ism", _ism, group=schema.ISM, after=("sequences", "model"), ledger=True),
    # After ism, which creates the store: a store holding only a calibration group is not one predict continues.
    Stage("calibration", _calibration, group=schema.CALIBRATION, sections=("sequences", "effects"), after=("model",),
          when=lambda config: config.effects.calibration),
    Stage("effects", _effects, group=schema.EFFECTS, sections=("effects",), after=("ism", "calibration")),
    Stage("mr", _mr, group=schema.MR, sections=("effects", "instruments", "mr", "pairs"), after=("effects",)),
    Stage("meta", _meta, group=schema.META, sections=("meta",), after=("mr",)),
    Stage("truth", _truth, group=schema.TRUTH, sections=("sequences",), after=("sequences",), when=_simulates),
    Stage("outputs", _outputs, after=("mr", "meta")),
    Stage("report", _report, after=("outputs",), when=lambda config: config.report),
)  # fmt: skip
"""Every stage, in the order they run; rows whose ``when`` is false for a config are left out of its run."""


# --------------------------------------------------------------------------- the runner


def stage_fingerprint(stage: Stage, run: Run) -> str:
    """SHA-256 of the stage's config sections and of the fingerprints of the stages it reads."""
    sections = run.config.model_dump(mode="json", include=set(stage.sections))
    upstream = {name: run.fingerprints[name] for name in stage.after if name in run.fingerprints}
    text = json.dumps({"stage": stage.name, "sections": sections, "after": upstream}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def run_pipeline(
    config: PipelineConfig,
    *,
    client,
    progress: bool = True,
    overwrite: bool = False,
    verify: Literal["cheap", "full"] = "cheap",
    break_lock: bool = False,
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
) -> PipelineResult:
    """Run every stage of ``config`` (:data:`STAGES`) on the cluster of ``client``, skipping unchanged ones.

    The store and the entry points are checked before anything runs: a store
    path that :func:`deepmr_dist.stages.predict.predict` would refuse for anything but
    its fingerprint is refused before training. ``overwrite`` is predict's: it
    replaces a deepmr store of another run, or one whose ``ism`` group is damaged.

    Parameters
    ----------
    verify
        How the ISM chunks are verified before a stage reads them: ``"cheap"``
        (listing and sizes) or ``"full"`` (every chunk read and its checksum compared).
    break_lock, lock_timeout
        As :func:`deepmr_dist.stages.predict.predict`: the run holds the store's lease throughout.

    Returns
    -------
    PipelineResult
        The store, the output folder, the global CE table, every group opened
        lazily, the stages skipped and, for a simulation, the true global CE.
    """
    path, options = normalize(config.store, config.storage_options)
    config = config.model_copy(update={"store": path, "storage_options": options or {}})
    store.check_overwritable(store.inspect_target(path, options), overwrite=overwrite)
    check_reachable(path, options, client)
    entry_points(config)  # refuses a bad entry point by its YAML field before anything runs
    run = Run(config=config, client=client, outputs=output_location(config), progress=progress, overwrite=overwrite,
              verify=verify)  # fmt: skip
    with lock(path, "deepmr run", timeout=lock_timeout, break_stale=break_lock, storage_options=options):
        store.check_overwritable(store.inspect_target(path, options), overwrite=overwrite)  # again, under the lease
        seconds: dict[str, float] = {}
        skipped: list[str] = []
        for stage in STAGES:
            if not stage.when(config):
                continue
            tick = time.perf_counter()
            fingerprint = stage_fingerprint(stage, run)
            with progress_bars(stage.name if progress else None):  # effects, mr, meta: a bar per computation
                result, reused = _run_stage(stage, run, fingerprint)
            if stage.ledger:
                fingerprint = store.read_fingerprint(run.store, run.storage_options) or fingerprint
            run.results[stage.name], run.fingerprints[stage.name] = result, fingerprint
            seconds[stage.name] = time.perf_counter() - tick
            if reused:
                skipped.append(stage.name)
            log.log(logging.INFO if progress else logging.DEBUG, "%s: %s in %.1f s", stage.name,
                    "unchanged, skipped" if reused else "done", seconds[stage.name])  # fmt: skip
            run.outputs.write_bytes("timings.json", json.dumps(seconds, indent=1).encode())  # the report shows those so far
    truth = run.results.get("truth")
    return PipelineResult(
        store=config.store, outputs=run.outputs.local or run.outputs.location, global_table=run.results["outputs"],
        true_global_ce=None if truth is None else float(truth["global_true_ce"]), seconds=seconds, skipped=skipped,
        datasets={s.group: run.results[s.name] for s in STAGES if s.group and s.name in run.results},
        simulated=run.simulated, members=run.results["model"],
    )  # fmt: skip


def _run_stage(stage: Stage, run: Run, fingerprint: str) -> tuple[Any, bool]:
    """The stage's result and whether it was reused (its recorded fingerprint equals ``fingerprint``)."""
    if stage.ledger:
        return _verified_ism(stage, run)
    if stage.group is not None:
        if store.stage_fingerprint(run.store, stage.group, run.storage_options) == fingerprint:
            return store.open_group(run.store, stage.group, run.storage_options), True
        try:
            return store.write_group(run.store, stage.compute(run), stage.group, fingerprint=fingerprint,
                                     storage_options=run.storage_options), False  # fmt: skip
        except Exception:
            if "ism" in stage.after:  # a damaged chunk that the verification before could not see
                verify_ism(run.store, full=True, storage_options=run.storage_options).raise_if_damaged()
            raise
    if stage.load is not None:
        recorded = _ledger(run.outputs)
        if recorded.get(stage.name) == fingerprint and (result := stage.load(run)) is not None:
            return result, True
        result = stage.compute(run)
        _record(run.outputs, stage.name, fingerprint)
        return result, False
    return stage.compute(run), False


def _verified_ism(stage: Stage, run: Run) -> tuple[Any, bool]:
    """Run the ISM stage, verify its chunks (``run.verify``) and, if some are damaged, have exactly those recomputed."""
    result, reused = stage.compute(run)
    verification = verify_ism(run.store, full=run.verify == "full", storage_options=run.storage_options)
    if verification.ok:
        return result, reused
    log.warning("%s; recomputing those chunks", verification.summary())
    mark_incomplete(run.store, verification, run.storage_options)
    result, _ = stage.compute(run)
    verify_ism(run.store, full=run.verify == "full", storage_options=run.storage_options).raise_if_damaged()
    return result, False


def _ledger(outputs: Outputs) -> dict[str, str]:
    return json.loads(outputs.read_bytes(LEDGER)) if outputs.exists(LEDGER) else {}


def _record(outputs: Outputs, name: str, fingerprint: str) -> None:
    """Record a group-less stage's fingerprint, replacing the ledger whole (see :meth:`Outputs.write_bytes`)."""
    outputs.write_bytes(LEDGER, json.dumps({**_ledger(outputs), name: fingerprint}, indent=1).encode())
