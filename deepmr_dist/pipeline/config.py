"""The declarative configs: a pipeline (``deepmr run PIPELINE.yaml``) and a simulation study (``deepmr simulate``), every section validated.

A pipeline names the sequences, the model, the tasks and pairs, and the
settings of every stage. Unknown keys are errors; :func:`deepmr_dist.pipeline.config_types.load_config`
reports each bad field by its YAML path. Relative input paths (sequences,
model files) are taken from the directory of the YAML file; the store is
relative to the working directory, like every output.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from deepmr_dist.pipeline.config_types import ClusterSettings, InstrumentRule, MetaMethod, MRMethods, Section, Transform
from deepmr_dist.errors import InputError
from deepmr_dist.stages.instruments import RULES
from deepmr_dist.meta import META_METHODS
from deepmr_dist.models.transforms import TRANSFORMS
from deepmr_dist.simulation.generator import SCENARIOS, SimulationConfig, parse_scenario
from deepmr_dist.simulation.motifs import DEFAULT_MOTIFS
from deepmr_dist.simulation.training_settings import TrainingSettings

__all__ = ["AnalysisSettings", "MotifChoice", "PipelineConfig", "SimulatedSequences", "StudyConfig"]


def _is_entry_point(source: str, base: Path) -> bool:
    """``package.module:factory`` (not a file path that happens to hold a colon)."""
    module, colon, factory = source.partition(":")
    return bool(colon) and factory.isidentifier() and all(p.isidentifier() for p in module.split(".")) and not (base / source).exists()


def _resolve_option_paths(value: Any, base: Path) -> Any:
    """``value`` with every relative string naming an existing file or folder under ``base`` made ``base / string``.

    Entry-point options are free-form (a checkpoint path, a dict of task ->
    list of paths), so a string counts as a path exactly when it names
    something that exists next to the YAML; any other string is left alone.
    """
    if isinstance(value, dict):
        return {key: _resolve_option_paths(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve_option_paths(item, base) for item in value]
    if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute() and (base / value).exists():
        return str(base / value)
    return value


# --------------------------------------------------------------------------- simulation studies (deepmr simulate)

BASELINE = "wald_mean"
"""The paper's baseline method: the plain mean of per-locus Wald ratios."""
PAPER_RULE = "egger_paper"
"""The paper's MR rule: robust MR-Egger above 10 instruments, MR-Egger from 3 to 10."""


class MotifChoice(Section):
    """The three motifs: JASPAR matrix IDs (offline, pyjaspar) or PWM files (``path`` or ``path::name``)."""

    exposure: str = DEFAULT_MOTIFS["exposure"]
    outcome: str = DEFAULT_MOTIFS["outcome"]
    confounder: str = DEFAULT_MOTIFS["confounder"]


class AnalysisSettings(Section):
    """ISM chunking, effects, instruments, MR and meta-analysis of every round."""

    chunk_loci: int = Field(100, ge=1, description="loci per store chunk and per ISM task")
    ddof: Literal[0, 1] = Field(0, description="degrees of freedom of the SD over members (0 as the paper)")
    calibration: bool = Field(False, description="rescale effect SEs by the isotonic calibration on held-out loci")
    instrument_rule: InstrumentRule = Field("pooled_z", description="pooled_z (the paper's) or mutation_z")
    instrument_threshold: float = Field(1.0, gt=0, description="z threshold of the instrument rule")
    methods: MRMethods = Field(
        default_factory=lambda: [PAPER_RULE, BASELINE, "ivw"], description="MR methods; Table 1 needs egger_paper and wald_mean"
    )
    meta_method: MetaMethod = Field("dl", description="meta-analysis of local CEs: fe, dl, reml or pm")

    @field_validator("methods")
    @classmethod
    def _table1_methods(cls, methods: list[str]) -> list[str]:
        missing = [m for m in (PAPER_RULE, BASELINE) if m not in methods]
        if missing:
            raise ValueError(f"methods must include {missing} (the paper's rule and baseline, for Table 1)")
        return methods


class StudyConfig(Section):
    """A simulation study: which scenarios and rounds, and every setting of a round.

    The study design is the paper's (4 scenarios x 50 rounds, 10,000 training
    and 1,000 test sequences, 5 members) plus a held-out calibration set; the
    training defaults are those of :class:`TrainingSettings` (standardised
    targets and a one-cycle rate, see :mod:`~deepmr_dist.simulation.training`;
    the paper's optimiser exactly: ``one_cycle: false, standardize: false,
    epochs: 100, batch_size: 1000, learning_rate: 0.001``).
    """

    name: str = "paper-simulation"
    seed: int = Field(2022, ge=0, description="seed of the whole study; every round derives its streams from it")
    scenarios: list[int] = Field(default_factory=lambda: list(SCENARIOS), description="1-4 or names")
    rounds: int = Field(50, ge=1, description="rounds per scenario")
    members: int = Field(5, ge=2, description="ensemble members (>= 2 for an SE)")
    concurrent_rounds: int = Field(2, ge=1, description="rounds in flight at once (keeps every worker busy)")
    motifs: MotifChoice = Field(default_factory=MotifChoice)
    generator: SimulationConfig = Field(default_factory=SimulationConfig)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    analysis: AnalysisSettings = Field(default_factory=AnalysisSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    output: str = Field("runs/paper-simulation", description="study directory (relative to the working directory)")

    @field_validator("scenarios", mode="before")
    @classmethod
    def _scenario_numbers(cls, values: list[int | str]) -> list[int]:
        if not isinstance(values, list) or not values:
            raise ValueError("expected a non-empty list of scenarios (1-4 or unconfounded, random, sequence, both)")
        numbers = [parse_scenario(v) for v in values]
        if len(set(numbers)) != len(numbers):
            raise ValueError(f"scenarios repeat: {values}")
        return numbers

    def round_fingerprint(self) -> str:
        """SHA-256 of every setting that changes a round's result (not how many rounds, nor where they run)."""
        fixed = self.model_dump(mode="json", exclude={"name", "scenarios", "rounds", "concurrent_rounds", "cluster", "output"})
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- pipelines (deepmr run)


class SimulatedSequences(Section):
    """One round of the paper's simulation: its test loci are mutated, its training loci train the model."""

    scenario: int = Field(1, description="1-4 or unconfounded, random, sequence, both")
    round: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)
    motifs: MotifChoice = Field(default_factory=MotifChoice)
    generator: SimulationConfig = Field(default_factory=SimulationConfig)

    @field_validator("scenario", mode="before")
    @classmethod
    def _scenario(cls, value: int | str) -> int:
        return parse_scenario(value)


class Sequences(Section):
    """Exactly one source of loci."""

    fasta: str | None = Field(None, description="FASTA of equal-length loci")
    bed: str | None = Field(None, description="BED regions, centred to `width` bp in `genome`")
    genome: str | None = None
    width: int | None = Field(None, ge=1)
    onehot: str | None = Field(None, description=".npy one-hot array (n_loci, 4, length)")
    simulation: SimulatedSequences | None = None
    iupac: Literal["n", "error"] = Field(
        "n", description="IUPAC codes (R, Y, K, M, S, W, B, D, H, V) in fasta or genome: read as N (counted in a warning) or refused"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Sequences:
        given = [name for name in ("fasta", "bed", "onehot", "simulation") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of fasta, bed (+ genome, width), onehot or simulation; got {given or 'none'}")
        if self.bed is not None and (self.genome is None or self.width is None):
            raise ValueError("bed needs genome and width")
        return self


class Model(Section):
    """The ensemble: files or an entry point, or the simulation's ensemble trained by the pipeline."""

    sources: list[str] = Field(default_factory=list, description="TorchScript / state-dict files or package.module:factory")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the entry point's factory; a relative path naming a file next to the YAML is taken from there",
    )
    train_simulation: bool = Field(False, description="train the paper's CNN on the simulation's training loci")
    members: int = Field(3, ge=2, description="members to train (train_simulation)")
    seeds: list[int] | None = Field(
        None, description="training seed of each member (default: 1000 x sequences.simulation.seed + member index)"
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    mc_dropout: int = Field(0, ge=0, description="N frozen dropout masks of one model instead of an ensemble")
    mc_seed: int = 0
    storage_options: dict[str, Any] | None = Field(
        None,
        exclude=True,  # may hold credentials: never written out, never part of a fingerprint
        description="fsspec options of sources given as URLs (s3://bucket/m0.pt); default: the store's storage_options "
        "(none for a local store)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Model:
        if self.train_simulation == bool(self.sources):
            raise ValueError("give either sources or train_simulation: true")
        if self.seeds is not None:
            if not self.train_simulation:
                raise ValueError("seeds are the training seeds of train_simulation members")
            if len(self.seeds) != self.members or len(set(self.seeds)) != len(self.seeds):
                raise ValueError(f"seeds must give {self.members} distinct seeds, one per member; got {self.seeds}")
        return self


class Tasks(Section):
    """How task predictions are read from the model output (see :class:`~deepmr_dist.models.heads.OutputHead`)."""

    names: list[str] | None = Field(None, description="names of ALL model outputs, in output order")
    keep: Literal["pairs"] | list[str | int] | None = Field(
        None,
        description='outputs to keep, by name or index (default all); "pairs": only the tasks that `pairs` names, '
        "in output order (a 919-task model with one pair stores 2 tasks)",
    )
    output_index: int | None = Field(None, description="element of a tuple output")
    profile_axis: int | None = Field(None, description="axis summed over (a profile output)")
    transform: Transform = Field("none", description=f"one of {', '.join(TRANSFORMS)}")


class ISM(Section):
    chunk_loci: int = Field(64, ge=1, description="loci per store chunk and per task")
    mutant_batch: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        2048, description="mutants per forward pass, or auto: sized on each worker from its GPU's free memory"
    )
    incremental: bool = True
    precision: Literal["fp32", "tf32", "bf16", "fp16"] = Field(
        "fp32", description="ISM arithmetic: fp32, tf32 (CUDA), bf16 (CUDA or CPU autocast) or fp16 (CUDA)"
    )
    compile: bool = Field(
        False, description="torch.compile the networks run in full (full recompute, or models not run incrementally)"
    )


class Effects(Section):
    ddof: Literal[0, 1] = 0
    dtype: Literal["float32", "float64"] = Field("float32", description="stored precision (computed in float64)")
    calibration: bool = Field(False, description="isotonic SE calibration on held-out labelled loci (simulation only)")


class Instruments(Section):
    rule: InstrumentRule = Field("pooled_z", description=f"one of {', '.join(RULES)}")
    threshold: float = Field(1.0, gt=0)


class MR(Section):
    methods: MRMethods = Field(default_factory=lambda: ["egger_paper", "ivw", "wald_mean"])
    n_boot: int = Field(1000, ge=10, description="bootstrap draws of the median and mode estimators")
    seed: int = 0


class Meta(Section):
    method: MetaMethod = Field("dl", description=f"one of {', '.join(META_METHODS)}")
    hksj: bool = False


class Spacing(Section):
    """Motif-spacing stratification (the paper's S1 Fig); needs loci from a BED (intervals)."""

    motifs_bed: str = Field(description="BED of motif instances, the TF in the name column")
    motif_names: dict[str, str] | None = Field(None, description="task -> TF name in the BED (default: the task name)")
    edges: list[float] = Field(default_factory=lambda: [0.0, 35.0, 70.0, 150.0, float("inf")], description="bin edges, bp")


class PipelineConfig(Section):
    """Everything ``deepmr run`` needs; see ``pipelines/*.yaml`` for examples."""

    name: str = "deepmr-run"
    sequences: Sequences
    model: Model
    tasks: Tasks = Field(default_factory=Tasks)
    pairs: Literal["all"] | list[tuple[str, str]] = Field(
        "all", description='"all" ordered pairs of the kept tasks, or [[exposure, outcome], ...]'
    )
    ism: ISM = Field(default_factory=ISM)
    effects: Effects = Field(default_factory=Effects)
    instruments: Instruments = Field(default_factory=Instruments)
    mr: MR = Field(default_factory=MR)
    meta: Meta = Field(default_factory=Meta)
    spacing: Spacing | None = None
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    store: str = Field("runs/run.zarr", description="run store: a directory or an fsspec URL")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options of the store and outputs (e.g. s3fs's endpoint_url); credentials from the environment"
    )
    outputs: str | None = Field(
        None,
        description="folder or fsspec URL of the tables, trained members and report "
        "(default: the store's path without .zarr, on the same filesystem: s3://b/run.zarr -> s3://b/run)",
    )
    report: bool = Field(True, description="write report.html beside the tables")

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.model.train_simulation and self.sequences.simulation is None:
            raise ValueError("model.train_simulation needs sequences.simulation")
        if self.effects.calibration and self.sequences.simulation is None:
            raise ValueError("effects.calibration needs held-out labelled loci: use sequences.simulation")
        if self.tasks.keep == "pairs" and self.pairs == "all":
            raise ValueError('tasks.keep: pairs keeps the tasks that pairs name; give pairs as [[exposure, outcome], ...]')
        if isinstance(self.tasks.keep, list) and self.tasks.names is not None:
            unknown = [t for t in self.tasks.keep if isinstance(t, str) and t not in self.tasks.names]
            unknown += [t for t in self.tasks.keep if isinstance(t, int) and not 0 <= t < len(self.tasks.names)]
            if unknown:
                raise ValueError(f"tasks.keep names unknown task(s) {unknown}; tasks.names has {self.tasks.names}")
        if self.spacing is not None and self.sequences.bed is None:
            raise ValueError("spacing needs loci with genomic intervals: use sequences.bed")
        if self.pairs != "all":
            for exposure, outcome in self.pairs:
                if exposure == outcome:
                    raise ValueError(f"pair ({exposure}, {outcome}) has the same task on both sides")
        return self

    def resolve_paths(self, base: Path) -> PipelineConfig:
        """A copy whose relative input paths (sequences, model files) are taken from ``base``."""

        def resolve(value: str | None) -> str | None:
            if value is None or "://" in value or Path(value).is_absolute():
                return value
            return str(base / value)

        seq = self.sequences.model_copy(update={k: resolve(getattr(self.sequences, k)) for k in ("fasta", "bed", "genome", "onehot")})
        spacing = None if self.spacing is None else self.spacing.model_copy(update={"motifs_bed": resolve(self.spacing.motifs_bed)})
        sources = [s if _is_entry_point(s, base) else resolve(s) for s in self.model.sources]
        options = _resolve_option_paths(self.model.options, base)
        resolved = self.model_copy(update={
            "sequences": seq,
            "model": self.model.model_copy(update={"sources": sources, "options": options}),
            "spacing": spacing,
        })
        resolved.check_inputs_exist()
        return resolved

    def check_inputs_exist(self) -> None:
        """Raise :class:`InputError` naming the field of the first local input file that does not exist."""
        fields = [(f"sequences.{k}", getattr(self.sequences, k)) for k in ("fasta", "bed", "genome", "onehot")]
        if self.spacing is not None:
            fields.append(("spacing.motifs_bed", self.spacing.motifs_bed))
        fields += [(f"model.sources[{i}]", s) for i, s in enumerate(self.model.sources) if not _is_entry_point(s, Path("."))]
        for name, value in fields:
            if value is not None and "://" not in value and not Path(value).exists():
                raise InputError(f"{name}: file not found: {value}")
