"""The paper's simulation study end to end, one round at a time.

A round (one scenario, one round index) is:

1. simulate training, calibration and test sequences (:func:`simulate_round`);
2. train the ensemble, one member per Dask task (:func:`train_ensemble`);
3. ISM of the test loci into the round's run store (:func:`deepmr_dist.stages.predict.predict`);
4. effects, optionally with the isotonic SE calibration fitted on the
   round's held-out calibration sequences (:mod:`deepmr_dist.stages.calibration`);
5. instruments, per-locus MR (``mr`` group) and the meta-analysis (``meta`` group);
6. the true causal effects (``truth`` group) and one summary row per method.

A study runs every (scenario, round) of a :class:`StudyConfig`, several rounds
at a time on one Dask cluster, and is resumable round by round: a round whose
``summary.csv`` exists is read back, not recomputed. At the end it writes
``rounds.csv`` (every summary row), ``table1.csv`` and ``table1.md`` (the
paper's Table 1 beside ours) and the Fig 2 plots.

Output layout under the study directory::

    config.yaml                       the resolved config (every default written out)
    <scenario>/round-<r>/members/     member-<i>.pt state dicts + .json histories
    <scenario>/round-<r>/run.zarr     groups ism, effects, mr, meta, truth (+ calibration)
    <scenario>/round-<r>/summary.csv  one row per MR method; written last
    rounds.csv, table1.csv, bias_coverage.csv, table1.md, figures/*.png
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.io import store
from deepmr_dist.stages.causal_effects import global_ce, local_ce
from deepmr_dist.pipeline.config import BASELINE, PAPER_RULE, RESCORABLE, MotifChoice, StudyConfig
from deepmr_dist.pipeline.config_types import dump_config, load_config
from deepmr_dist.stages.effects import write_effects
from deepmr_dist.errors import InputError, StoreError
from deepmr_dist.models.ensemble import ModelSpec
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.stages.predict import ISMSettings, predict
from deepmr_dist.io.sequence import sequences_dataset
from deepmr_dist.simulation.generator import SCENARIOS, one_hot, select_split, simulate_round
from deepmr_dist.simulation.motifs import MotifSet, resolve_motif
from deepmr_dist.simulation.training import train_ensemble
from deepmr_dist.simulation.truth import true_causal_effects

__all__ = [
    "MotifChoice",
    "StudyConfig",
    "analyse_round",
    "fit_round_calibration",
    "motif_set",
    "rescore_round",
    "round_directory",
    "run_round",
    "run_study",
    "summarize_round",
]

TASKS = ("exposure", "outcome")
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


def run_round(
    config: StudyConfig,
    scenario: int,
    round_index: int,
    round_dir: str | Path,
    *,
    client,
    motifs: MotifSet | None = None,
) -> pd.DataFrame:
    """Run one round and return its summary rows (see :func:`summarize_round`).

    The round's run store (``round_dir/run.zarr``) holds the ``ism``,
    ``effects``, ``mr``, ``meta`` and ``truth`` groups; the members are in
    ``round_dir/members``. ``summary.csv`` is written last, atomically, and
    marks the round done.
    """
    round_dir = Path(round_dir)
    motifs = motif_set(config.motifs) if motifs is None else motifs
    timings: dict[str, float] = {}
    started = time.perf_counter()
    ds = simulate_round(scenario, round_index, seed=config.seed, motifs=motifs, config=config.generator)
    truth = true_causal_effects(ds)
    timings["simulate_s"] = time.perf_counter() - started

    tick = time.perf_counter()
    train = select_split(ds, "train", "variant")
    members = train_ensemble(
        one_hot(train["sequence"].values),
        train["label"].values,
        config.members,
        member_seeds(config.seed, scenario, round_index, config.members),
        client=client,
        out_dir=round_dir / "members",
        settings=config.training,
    )
    timings["train_s"] = time.perf_counter() - tick

    tick = time.perf_counter()
    test = select_split(ds, "test")
    loci = sequences_dataset(test["sequence"].values.astype(np.int8), test["locus"].values)
    spec = ModelSpec(tuple(str(m.path) for m in members))
    settings = ISMSettings(head=OutputHead(task_names=TASKS), chunk_loci=config.analysis.chunk_loci)
    path = str(round_dir / "run.zarr")
    predict(loci, spec, path, client=client, settings=settings, overwrite=True, progress=False)
    timings["ism_s"] = time.perf_counter() - tick

    val_mse = np.mean([m.history.best_val_mse for m in members], axis=0)  # per task, Anscombe units
    rows = analyse_round(config, ds, truth, spec, path)
    rows["val_mse_exposure"], rows["val_mse_outcome"] = float(val_mse[0]), float(val_mse[1])
    timings["round_s"] = time.perf_counter() - started
    for name, seconds in timings.items():
        rows[name] = seconds
    _write_atomically(rows, round_dir / "summary.csv")
    return rows


def analyse_round(config: StudyConfig, ds: xr.Dataset, truth: xr.Dataset, spec: ModelSpec, path: str) -> pd.DataFrame:
    """Effects, MR, meta-analysis and truth of a round whose ISM store is complete; its summary rows.

    Writes the ``effects``, ``mr``, ``meta`` and ``truth`` groups (and
    ``calibration`` when configured) of the store at ``path``; the rows carry
    the round's identity, parameters and ``analysis_s``.
    """
    tick = time.perf_counter()
    calibration = fit_round_calibration(ds, spec, ddof=config.analysis.ddof) if config.analysis.calibration else None
    if calibration is not None:
        from deepmr_dist.stages.calibration import write_calibration

        write_calibration(path, calibration, group=schema.CALIBRATION)
    effects = write_effects(path, ddof=config.analysis.ddof, calibration=calibration)
    local = local_ce(
        effects,
        [PAIR],
        config.analysis.methods,
        rule=config.analysis.instrument_rule,
        threshold=config.analysis.instrument_threshold,
        ddof=config.analysis.ddof,
        seed=config.seed,
    )
    local = store.write_group(path, local, schema.MR)
    global_ = store.write_group(path, global_ce(local, meta_method=config.analysis.meta_method), schema.META)
    store.write_group(path, truth.reindex(locus=effects["locus"].values), schema.TRUTH)  # NaN: no exposure instance
    rows = summarize_round(local.load(), global_, truth, baseline=BASELINE)
    rows.insert(0, "round", int(ds.attrs["round"]))
    rows.insert(0, "scenario", int(ds.attrs["scenario"]))
    rows["scenario_name"] = SCENARIOS[int(ds.attrs["scenario"])]
    rows["alpha"] = ds.attrs["alpha"]
    rows["gamma"] = ds.attrs["gamma"]
    rows["analysis_s"] = time.perf_counter() - tick
    return rows


def rescore_round(
    config: StudyConfig, scenario: int, round_index: int, round_dir: str | Path, *, motifs: MotifSet | None = None
) -> pd.DataFrame:
    """Redo a finished round's analysis under ``config.analysis`` from its stored members and ISM predictions.

    Nothing is retrained or re-mutated; the training and ISM columns of the
    old summary are kept. The round is regenerated from the seed only for its
    parameters and truth (milliseconds).
    """
    round_dir = Path(round_dir)
    old = pd.read_csv(round_dir / "summary.csv")
    motifs = motif_set(config.motifs) if motifs is None else motifs
    ds = simulate_round(scenario, round_index, seed=config.seed, motifs=motifs, config=config.generator)
    spec = ModelSpec(tuple(str(round_dir / "members" / f"member-{i}.pt") for i in range(config.members)))
    rows = analyse_round(config, ds, true_causal_effects(ds), spec, str(round_dir / "run.zarr"))
    kept = ["val_mse_exposure", "val_mse_outcome", "simulate_s", "train_s", "ism_s"]
    for name in kept:
        rows[name] = old[name].iloc[0]
    rows["round_s"] = rows[["simulate_s", "train_s", "ism_s", "analysis_s"]].sum(axis=1)
    _write_atomically(rows, round_dir / "summary.csv")
    return rows


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
        Redo the analysis of every finished round under ``config.analysis``
        (instruments, MR methods, meta-analysis, ddof, calibration) from its
        stored members and ISM predictions (:func:`rescore_round`); the other
        settings must equal those the rounds were made with.

    Returns
    -------
    pandas.DataFrame
        Every round's summary rows (``rounds.csv``).

    Raises
    ------
    StoreError
        If ``study_dir`` holds rounds made with other round settings (with
        ``rescore``: other settings than the rescorable analysis ones).
    """
    from tqdm.auto import tqdm

    from deepmr_dist.simulation.figures import save_figures
    from deepmr_dist.simulation.metrics import method_table, method_table_markdown, table1, table1_markdown

    study_dir = Path(config.output if study_dir is None else study_dir)
    _claim_directory(study_dir, config, rescore=rescore)
    motifs = motif_set(config.motifs)
    jobs = [(s, r) for s in config.scenarios for r in range(config.rounds)]
    finished = [job for job in jobs if (round_directory(study_dir, *job) / "summary.csv").exists()]
    if rescore:
        done = {job: rescore_round(config, *job, round_directory(study_dir, *job), motifs=motifs) for job in finished}
    else:
        done = {job: pd.read_csv(round_directory(study_dir, *job) / "summary.csv") for job in finished}
    todo = [job for job in jobs if job not in done]
    with tqdm(total=len(jobs), initial=len(done), unit="round", desc="study", disable=not progress, file=sys.stderr) as bar:
        with ThreadPoolExecutor(max_workers=config.concurrent_rounds) as pool:
            futures = {
                pool.submit(run_round, config, s, r, round_directory(study_dir, s, r), client=client, motifs=motifs): (s, r)
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

    A rescore needs only the settings behind the members and ISM stores to match.
    """
    marker = study_dir / "round_settings.sha256"
    if marker.exists():
        if rescore:
            made_with = load_config(study_dir / "config.yaml", StudyConfig)
            same = made_with.prediction_fingerprint() == config.prediction_fingerprint()
        else:
            same = marker.read_text().strip() == config.round_fingerprint()
        if not same:
            allowed = f" other than analysis.{{{', '.join(sorted(RESCORABLE))}}}" if rescore else ""
            raise StoreError(
                f"{study_dir} holds rounds made with other settings{allowed} (see {study_dir / 'config.yaml'}); "
                "use another output directory or remove it"
            )
    study_dir.mkdir(parents=True, exist_ok=True)
    (study_dir / "config.yaml").write_text(dump_config(config))
    marker.write_text(config.round_fingerprint() + "\n")


def motif_set(choice: MotifChoice) -> MotifSet:
    """The three motifs a :class:`MotifChoice` names (JASPAR IDs or PWM files)."""
    return MotifSet(**{role: resolve_motif(getattr(choice, role)) for role in ("exposure", "outcome", "confounder")})


def fit_round_calibration(ds: xr.Dataset, spec: ModelSpec, *, ddof: int = 0):
    """The isotonic SE calibration of ``spec``'s ensemble, fitted on the round's held-out calibration split.

    The label noise is the exact variance of the Anscombe transform of a
    Poisson count at each locus's expected count (see
    :func:`deepmr_dist.stages.calibration.poisson_anscombe_variance`).
    """
    import torch

    from deepmr_dist.stages.calibration import fit_calibration, poisson_anscombe_variance
    from deepmr_dist.models.ensemble import load_members

    held_out = select_split(ds, "calibration")
    if held_out.sizes["locus"] == 0:
        raise InputError("analysis.calibration needs held-out sequences: set generator.n_calibration > 0")
    x = torch.from_numpy(one_hot(held_out["sequence"].values))
    with torch.inference_mode():
        predictions = np.stack([member(x).numpy() for member in load_members(spec)])
    coords = {"locus": held_out["locus"].values, "task": list(TASKS)}
    labels = xr.DataArray(held_out["label"].values, dims=("locus", "task"), coords=coords)
    members = xr.DataArray(predictions, dims=("member", "locus", "task"), coords=coords)
    noise = xr.DataArray(
        poisson_anscombe_variance(held_out["expected_count"].values), dims=("locus", "task"), coords=coords
    )
    return fit_calibration(
        labels, members, noise_variance=noise, ddof=ddof,
        source=f"scenario {ds.attrs['scenario']} round {ds.attrs['round']}: {held_out.sizes['locus']} calibration loci",
    )


def _write_atomically(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    frame.to_csv(partial, index=False)
    os.replace(partial, path)
