"""The paper's simulation study end to end, one round at a time.

A round (one scenario, one round index) is one pipeline (:func:`round_config`)
run by the pipeline's runner (:func:`deepmr_dist.pipeline.runner.run_pipeline`):
simulate the round's training, calibration and test sequences, train the
ensemble (one member per Dask task), ISM of the test loci, effects (optionally
with the isotonic SE calibration fitted on the held-out calibration sequences),
instruments and per-locus MR, the meta-analysis and the true causal effects;
then one summary row per method (:func:`summarize_round`).

A study runs every (scenario, round) of a :class:`StudyConfig`, several rounds
at a time on one Dask cluster, and is resumable round by round: a round whose
``summary.csv`` exists is read back, not recomputed (with ``rescore`` it is
rerun, and the runner recomputes only the stages whose settings changed). At the end it writes
``rounds.csv`` (every summary row), ``table1.csv`` and ``table1.md`` (the
paper's Table 1 beside ours) and the Fig 2 plots.

Output layout under the study directory::

    config.yaml                       the resolved config (every default written out)
    <scenario>/round-<r>/members/     member-<i>.pt state dicts + .json histories
    <scenario>/round-<r>/run.zarr     groups ism, effects, mr, meta, truth (+ calibration)
    <scenario>/round-<r>/local_ce.*, global_ce.*, pipeline.yaml, stages.json, timings.json   the round's pipeline outputs
    <scenario>/round-<r>/summary.csv  one row per MR method; written last
    rounds.csv, table1.csv, bias_coverage.csv, table1.md, figures/*.png
"""

from __future__ import annotations

import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.errors import InputError, StoreError
from deepmr_dist.pipeline.config import (
    BASELINE, ISM, MR, PAPER_RULE, Effects, Instruments, Meta, Model, PipelineConfig, Sequences, SimulatedSequences,
    StudyConfig,
)  # fmt: skip
from deepmr_dist.pipeline.config_types import dump_config
from deepmr_dist.pipeline.runner import PipelineResult, run_pipeline
from deepmr_dist.simulation.generator import SCENARIOS
from deepmr_dist.simulation.training import TrainingHistory
from deepmr_dist.simulation.truth import true_causal_effects

__all__ = ["describe_study", "member_seeds", "round_config", "round_directory", "run_round", "run_study", "summarize_round"]

log = logging.getLogger(__name__)

PAIR = ("exposure", "outcome")
PLAIN_MEAN_SUFFIX = ":plain_mean"
"""Method-name suffix of a method's global CE taken as the plain mean of its local estimates."""


# --------------------------------------------------------------------------- one round


def describe_study(config: StudyConfig, study_dir: str | Path | None = None) -> str:
    """The plan of a study, as ``deepmr run STUDY.yaml --dry-run`` prints it."""
    gen, n_rounds = config.generator, len(config.scenarios) * config.rounds
    names = ", ".join(SCENARIOS[s] for s in config.scenarios)
    passes = gen.n_test * (3 * gen.length + 1) * config.members
    return "\n".join([
        f"study {config.name!r} (seed {config.seed}): {len(config.scenarios)} scenarios ({names}) x "
        f"{config.rounds} rounds = {n_rounds} rounds, {config.concurrent_rounds} in flight at a time",
        f"per round: {gen.n_train:,} training, {gen.n_calibration:,} calibration and {gen.n_test:,} test sequences of "
        f"{gen.length} bp; {config.members} members trained ({config.training.epochs} epochs); ISM of the test loci: "
        f"{passes:,} forward passes",
        f"analysis: instruments {config.analysis.instrument_rule} >= {config.analysis.instrument_threshold}; MR "
        f"{', '.join(config.analysis.methods)}; meta-analysis {config.analysis.meta_method}",
        f"output: {Path(config.output if study_dir is None else study_dir)} (rounds.csv, table1.csv, "
        "bias_coverage.csv, table1.md, figures/)",
    ])  # fmt: skip


def round_directory(study_dir: str | Path, scenario: int, round_index: int) -> Path:
    """``<study_dir>/<scenario name>/round-<r>``."""
    return Path(study_dir) / SCENARIOS[scenario] / f"round-{round_index:03d}"


def member_seeds(seed: int, scenario: int, round_index: int, n_members: int) -> list[int]:
    """Distinct training seeds of a round's members, derived from the study seed."""
    state = np.random.SeedSequence([seed, scenario, round_index]).generate_state(n_members, dtype=np.uint32)
    seeds = [int(s) & 0x7FFFFFFF for s in state]
    if len(set(seeds)) != n_members:  # astronomically unlikely; never train two identical members silently
        raise InputError(f"member seeds of scenario {scenario}, round {round_index} collide; change the study seed")
    return seeds


def round_config(config: StudyConfig, scenario: int, round_index: int, round_dir: str | Path) -> PipelineConfig:
    """The pipeline of one round: its simulated loci, its trained ensemble and the study's analysis settings.

    The store is ``round_dir/run.zarr``; members, tables and the stage ledger
    go to ``round_dir`` (no report per round).
    """
    analysis, round_dir = config.analysis, Path(round_dir)
    return PipelineConfig(
        name=f"{config.name}/{SCENARIOS[scenario]}/round-{round_index:03d}",
        sequences=Sequences(simulation=SimulatedSequences(
            scenario=scenario, round=round_index, seed=config.seed, motifs=config.motifs, generator=config.generator,
        )),
        model=Model(
            train_simulation=True, members=config.members, training=config.training,
            seeds=member_seeds(config.seed, scenario, round_index, config.members),
        ),
        pairs=[PAIR],
        ism=ISM(chunk_loci=analysis.chunk_loci),
        effects=Effects(ddof=analysis.ddof, calibration=analysis.calibration),
        instruments=Instruments(rule=analysis.instrument_rule, threshold=analysis.instrument_threshold),
        mr=MR(methods=analysis.methods, seed=config.seed),
        meta=Meta(method=analysis.meta_method),
        cluster=config.cluster,
        store=str(round_dir / "run.zarr"),
        outputs=str(round_dir),
        report=False,
    )  # fmt: skip


def run_round(
    config: StudyConfig, scenario: int, round_index: int, round_dir: str | Path, *, client
) -> pd.DataFrame:
    """Run (or rerun) one round through the pipeline's runner and return its summary rows (:func:`summarize_round`).

    The round's run store (``round_dir/run.zarr``) holds the ``ism``,
    ``effects``, ``mr``, ``meta`` and ``truth`` groups (and ``calibration``);
    the members are in ``round_dir/members``. A rerun recomputes only the
    stages whose settings changed (a rescore: the analysis, never training or
    ISM); the seconds of a skipped stage are those of the run that made it.
    ``summary.csv`` is written last, atomically, and marks the round done.
    """
    round_dir = Path(round_dir)
    summary = round_dir / "summary.csv"
    before = pd.read_csv(summary).iloc[0] if summary.exists() else None
    result = run_pipeline(round_config(config, scenario, round_index, round_dir), client=client, progress=False, overwrite=True)
    tick = time.perf_counter()
    ds = result.simulated
    rows = summarize_round(result.datasets[schema.MR].load(), result.datasets[schema.META], true_causal_effects(ds))
    rows.insert(0, "round", int(ds.attrs["round"]))
    rows.insert(0, "scenario", int(ds.attrs["scenario"]))
    rows["scenario_name"] = SCENARIOS[int(ds.attrs["scenario"])]
    rows["alpha"] = ds.attrs["alpha"]
    rows["gamma"] = ds.attrs["gamma"]
    analysis = [name for name in result.seconds if name not in ("sequences", "model", "ism")]
    rows["analysis_s"] = sum(result.seconds[name] for name in analysis) + time.perf_counter() - tick
    val_mse = np.mean([TrainingHistory.read(path).best_val_mse for path in result.members.sources], axis=0)
    rows["val_mse_exposure"], rows["val_mse_outcome"] = float(val_mse[0]), float(val_mse[1])
    for column, stage in (("simulate_s", "sequences"), ("train_s", "model"), ("ism_s", "ism")):
        reused = before is not None and (stage in result.skipped or (stage == "ism" and _ism_was_done(result)))
        rows[column] = before[column] if reused else result.seconds[stage]
    rows["round_s"] = rows[["simulate_s", "train_s", "ism_s", "analysis_s"]].sum(axis=1)
    _write_atomically(rows, summary)
    return rows


def _ism_was_done(result: PipelineResult) -> bool:
    """Whether the ISM stage found every chunk already computed (it keeps its own ledger, so it is never "skipped")."""
    return result.datasets[schema.ISM].attrs.get("chunks_computed", None) == 0


def summarize_round(local: xr.Dataset, global_: xr.Dataset, truth: xr.Dataset, *, baseline: str = BASELINE) -> pd.DataFrame:
    """One row per MR method: the round's global estimate, its spread and coverage.

    Parameters
    ----------
    local, global_
        Outputs of :func:`~deepmr_dist.stages.causal_effects.local_ce` and
        :func:`~deepmr_dist.stages.causal_effects.global_ce` for one pair.
    truth
        :func:`~deepmr_dist.simulation.truth.true_causal_effects` of the round.
    baseline
        The method treated as the paper's baseline: its global estimate is the
        plain mean of the per-locus estimates, its spread (``tau``) their SD,
        and its CI the mean +- 1.96 SD / sqrt(k); every other method takes the
        meta-analysis (estimate, sqrt(tau2), random-effects CI), and a second
        row ``METHOD`` + :data:`PLAIN_MEAN_SUFFIX` summarised as the baseline is:
        the true global CE is the plain mean of the local true CEs, which the
        random-effects mean (weights ``1 / (se^2 + tau^2)``) estimates only when
        the local SEs do not depend on the local effects.

    Returns
    -------
    pandas.DataFrame
        Columns ``method, estimate, se, tau, ci_lower, ci_upper, k, true_ce,
        local_coverage, n_true_loci, n_evaluated_loci`` (loci with a finite CI
        and a true CE, matched by locus id; loci whose exposure instance is
        not functional, see :mod:`~deepmr_dist.simulation.truth`, have none).
    """
    from deepmr_dist.simulation.metrics import local_coverage_counts

    local = local.isel(pair=0)
    true_local = truth["true_ce"].where(truth["functional"]).to_series()  # as the global truth: functional loci
    rows = []
    for method in local["method"].values:
        per_locus = local.sel({"method": method})
        frame = pd.DataFrame(
            {
                "locus": per_locus["locus"].values,
                "ci_lower": per_locus["ci_lower"].values,
                "ci_upper": per_locus["ci_upper"].values,
            }
        )
        coverage = local_coverage_counts(frame, true_local)
        plain = _plain_mean(per_locus["local_ce"].values)
        if method == baseline:
            summaries = {str(method): plain}
        else:
            g = global_.isel(pair=0).sel({"method": method})
            meta = {
                "estimate": float(g["global_ce"]),
                "se": float(g["global_se"]),
                "tau": float(np.sqrt(g["tau2"])),
                "ci_lower": float(g["ci_lower"]),
                "ci_upper": float(g["ci_upper"]),
                "k": int(g["k"]),
            }
            summaries = {str(method): meta, f"{method}{PLAIN_MEAN_SUFFIX}": plain}
        for name, row in summaries.items():
            rows.append(
                {
                    "method": name,
                    **row,
                    "true_ce": float(truth["global_true_ce"]),
                    "local_coverage": coverage.coverage,
                    "n_true_loci": int(np.isfinite(true_local.to_numpy()).sum()),
                    "n_evaluated_loci": coverage.n_evaluated,
                }
            )
    return pd.DataFrame(rows)


def _plain_mean(estimates: np.ndarray) -> dict[str, float | int]:
    """The unweighted mean of the finite local estimates, its SD (``tau``) and the CI mean +- 1.96 SD / sqrt(k)."""
    estimates = estimates[np.isfinite(estimates)]
    k = estimates.size
    mean = float(estimates.mean()) if k else np.nan
    sd = float(estimates.std(ddof=1)) if k > 1 else np.nan
    se = sd / np.sqrt(k) if k > 1 else np.nan
    return {"estimate": mean, "se": se, "tau": sd, "ci_lower": mean - 1.96 * se, "ci_upper": mean + 1.96 * se, "k": k}


# --------------------------------------------------------------------------- the study


def run_study(
    config: StudyConfig, study_dir: str | Path | None = None, *, client, progress: bool = True, rescore: bool = False
) -> pd.DataFrame:
    """Run (or resume) every round of ``config`` and write the study's tables and figures.

    Parameters
    ----------
    config
        The study.
    study_dir
        Output directory; default ``config.output``.
    client
        Dask client of the cluster that trains members and runs ISM.
    progress
        A progress bar over rounds on stderr, and one line per finished round.
    rescore
        Rerun every finished round too, under ``config``: the runner recomputes
        only the stages whose settings changed, so a change of
        ``config.analysis`` (instruments, MR methods, meta-analysis, ddof,
        calibration) reuses the stored members and ISM predictions.

    Returns
    -------
    pandas.DataFrame
        Every round's summary rows (``rounds.csv``).

    Raises
    ------
    StoreError
        If ``study_dir`` holds rounds made with other round settings (unless ``rescore``).
    """
    from tqdm.auto import tqdm

    from deepmr_dist.simulation.figures import save_figures
    from deepmr_dist.simulation.metrics import method_table, method_table_markdown, table1, table1_markdown

    study_dir = Path(config.output if study_dir is None else study_dir)
    _claim_directory(study_dir, config, rescore=rescore)
    jobs = [(s, r) for s in config.scenarios for r in range(config.rounds)]
    finished = [job for job in jobs if (round_directory(study_dir, *job) / "summary.csv").exists()]
    done = {} if rescore else {job: pd.read_csv(round_directory(study_dir, *job) / "summary.csv") for job in finished}
    todo = [job for job in jobs if job not in done]
    if rescore and finished:
        log.info("rescoring %d finished round(s): only stages whose settings changed are recomputed", len(finished))
    with tqdm(total=len(jobs), initial=len(done), unit="round", desc="study", disable=not progress, file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=config.concurrent_rounds) as pool:
            futures = {
                pool.submit(run_round, config, s, r, round_directory(study_dir, s, r), client=client): (s, r)
                for s, r in todo
            }
            try:
                for future in as_completed(futures):
                    job = futures[future]
                    done[job] = future.result()
                    bar.update(1)
                    if progress:
                        bar.write(_round_line(done[job]), file=sys.stderr)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    rounds = pd.concat([done[job] for job in jobs], ignore_index=True)
    _write_atomically(rounds, study_dir / "rounds.csv")
    table = table1(rounds)
    _write_atomically(table.reset_index(), study_dir / "table1.csv")
    by_method = method_table(rounds)
    _write_atomically(by_method.reset_index(), study_dir / "bias_coverage.csv")
    (study_dir / "table1.md").write_text(table1_markdown(table) + "\n" + method_table_markdown(by_method))
    save_figures(rounds, study_dir / "figures")
    return rounds


def _round_line(rows: pd.DataFrame) -> str:
    paper = rows.set_index("method").loc[PAPER_RULE]
    return (
        f"{rows['scenario_name'].iloc[0]} round {int(rows['round'].iloc[0])}: true CE {paper['true_ce']:.3f}, "
        f"egger_paper {paper['estimate']:.3f} (tau {paper['tau']:.3f}, {int(paper['k'])} loci), "
        f"local coverage {paper['local_coverage']:.2f}, {rows['round_s'].iloc[0]:.0f} s"
    )


def _claim_directory(study_dir: Path, config: StudyConfig, *, rescore: bool = False) -> None:
    """Write ``config.yaml``, or check that the rounds already there were made with the same settings.

    With ``rescore`` every finished round is rerun under ``config``, so other settings are allowed.
    """
    marker = study_dir / "round_settings.sha256"
    if marker.exists() and not rescore and marker.read_text().strip() != config.round_fingerprint():
        raise StoreError(
            f"{study_dir} holds rounds made with other settings (see {study_dir / 'config.yaml'}); "
            "use --rescore to rerun them under the new settings, another output directory, or remove it"
        )
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "config.yaml").write_text(dump_config(config))
    marker.write_text(config.round_fingerprint() + "\n")


def _write_atomically(frame: pd.DataFrame, path: Path) -> None:
    """``frame`` as CSV at ``path``, a missing value spelled :data:`deepmr_dist.schema.TABLE_NA` as in every table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    frame.to_csv(partial, index=False, na_rep=schema.TABLE_NA)
    os.replace(partial, path)
