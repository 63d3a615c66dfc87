"""Why is the simulation's global MR-Egger estimate biased low? A diagnosis over a finished study.

For every round of a ``deepmr simulate`` study this script takes the instruments the analysis used
(the model's effects, filtered by the study's instrument rule) and runs the same MR estimators on

* the model's effects and standard errors (what the study reports), and
* the noise-free effects of the same mutations: the generator's expected counts of every mutant and
  its reference, Anscombe-transformed, with the round's own parameters and confounders (so the
  pleiotropy a sequence confounder causes is kept), with the model's standard errors.

Per scenario and method it prints the median over rounds of the global estimate's relative bias
against the true global CE (over loci with a functional exposure instance: the plain mean, the 10 %
trimmed mean and the DerSimonian-Laird mean of the local estimates), the median local error
relative to the true global CE, and the mean I^2_GX. If the noise-free estimates are unbiased while
the model's are not, the bias comes from the model (its shrinkage and the noise in its effects:
regression dilution); if the noise-free ones are biased too, it is the estimator or the estimand.

    python benchmarks/dilution_diagnosis.py STUDY_DIR [--methods egger,ivw,...] [--out FILE.csv]
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from deepmr_dist.stages.instruments import instrument_mask
from deepmr_dist.meta import meta_analysis
from deepmr_dist.mr import estimate
from deepmr_dist.mr.egger import i2_gx
from deepmr_dist.mr._data import prepare
from deepmr_dist.simulation.binding import binding_probability
from deepmr_dist.simulation.counts import CountParameters, anscombe, expected_counts
from deepmr_dist.simulation.generator import dataset_motif_models, select_split, simulate_round
from deepmr_dist.pipeline.config import StudyConfig
from deepmr_dist.pipeline.study import round_directory
from deepmr_dist.simulation.motifs import MotifSet
from deepmr_dist.simulation.truth import true_causal_effects

DEFAULT_METHODS = ("egger", "egger_paper", "ivw", "ivw_delta", "egger_simex", "mr_raps")


def noise_free_effects(ds: xr.Dataset, loci: np.ndarray) -> np.ndarray:
    """``(locus, position, allele, task)`` noise-free transformed effect of every substitution (NaN at the reference).

    Parameters
    ----------
    ds
        The round from :func:`simulate_round`.
    loci
        Locus ids, in the order of the store.
    """
    test = select_split(ds, "test").sel(locus=loci)
    models = dataset_motif_models(ds)
    scenario = int(ds.attrs["scenario"])
    params = CountParameters(alpha=ds.attrs["alpha"], gamma=ds.attrs["gamma"], eta=ds.attrs["eta"],
                             nu=ds.attrs["nu"], tau=ds.attrs["tau"])  # fmt: skip
    codes = test["sequence"].values.astype(np.int8)
    z = test["z"].values.astype(np.float64)
    n, length = codes.shape

    def transformed(sequences: np.ndarray, zz: np.ndarray) -> np.ndarray:
        q = {role: binding_probability(sequences, models[role].energy) for role in ("exposure", "outcome")}
        q_conf = binding_probability(sequences, models["confounder"].energy) if scenario in (3, 4) else 0.0
        return anscombe(expected_counts(q["exposure"], q["outcome"], q_conf, zz, params))

    reference = transformed(codes, z)
    out = np.full((n, length, 4, 2), np.nan)
    for allele in range(4):
        for position in range(length):
            mutants = codes.copy()
            mutants[:, position] = allele
            change = transformed(mutants, z) - reference
            same = codes[:, position] == allele
            change[same] = np.nan
            out[:, position, allele] = change
    return out


def _global(estimates: np.ndarray, ses: np.ndarray, functional: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Over functional loci with a finite estimate: the plain mean, the 10 % trimmed mean, the
    DerSimonian-Laird mean, and the median of (local estimate - local truth)."""
    keep = functional & np.isfinite(estimates) & np.isfinite(ses) & (ses > 0)
    if not keep.any():
        return dict.fromkeys(("plain_mean", "trimmed_mean", "dl_mean", "median_local_error"), float("nan"))
    dl = meta_analysis(estimates[keep][None, :], ses[keep][None, :], method="dl")
    return {
        "plain_mean": float(np.mean(estimates[keep])),
        "trimmed_mean": float(stats.trim_mean(estimates[keep], 0.1)),
        "dl_mean": float(dl.estimate[0]),
        "median_local_error": float(np.median(estimates[keep] - truth[keep])),
    }


def diagnose_round(config: StudyConfig, scenario: int, round_index: int, study_dir: Path, methods: tuple[str, ...]) -> list[dict]:
    """One row per method and data source (model / noise-free) of one round."""
    store = round_directory(study_dir, scenario, round_index) / "run.zarr"
    ds = simulate_round(scenario, round_index, seed=config.seed, motifs=MotifSet.resolve(**config.motifs.model_dump()), config=config.generator)
    truth = true_causal_effects(ds)
    effects = xr.open_zarr(store, group="effects", consolidated=False)
    loci = effects["locus"].values
    eff = effects["effect"].transpose("locus", "position", "allele", "task").values.astype(np.float64)
    ses = effects["effect_se"].transpose("locus", "position", "allele", "task").values.astype(np.float64)
    tasks = [str(t) for t in effects["task"].values]
    ix, iy = tasks.index("exposure"), tasks.index("outcome")
    free = noise_free_effects(ds, loci)
    n_loci = len(loci)
    flat = lambda a: a.reshape(n_loci, -1)  # noqa: E731
    mask = instrument_mask(flat(eff[..., ix]), flat(ses[..., ix]), config.analysis.instrument_rule,
                           config.analysis.instrument_threshold, np.nan, np.nan)  # fmt: skip
    functional = truth["functional"].reindex(locus=loci, fill_value=False).values.astype(bool)
    local_truth = truth["true_ce"].reindex(locus=loci).values
    true_global = float(truth["global_true_ce"])
    rows = []
    for source, (bx_all, by_all) in {"model": (eff[..., ix], eff[..., iy]), "noise_free": (free[..., 0], free[..., 1])}.items():
        select = lambda a: np.where(mask, flat(a), np.nan)  # noqa: E731
        bx, by = select(bx_all), select(by_all)
        bxse, byse = select(ses[..., ix]), select(ses[..., iy])
        results = estimate(bx, bxse, by, byse, methods=methods, n_simex=200)
        i2 = i2_gx(prepare(bx, bxse, by, byse))
        for method, res in results.items():
            rows.append({
                "scenario": scenario, "round": round_index, "source": source, "method": method,
                "true_global_ce": true_global, **_global(res.estimate, res.se, functional, local_truth),
                "mean_i2gx": float(np.nanmean(i2[functional])) if functional.any() else float("nan"),
                "n_loci": int(np.isfinite(res.estimate[functional]).sum()),
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from deepmr_dist.pipeline.config_types import load_config

    config = load_config(args.study_dir / "config.yaml", StudyConfig)
    methods = tuple(m for m in args.methods.split(",") if m)
    rows = []
    for scenario in config.scenarios:
        for r in range(config.rounds):
            if (round_directory(args.study_dir, scenario, r) / "summary.csv").exists():
                rows.extend(diagnose_round(config, scenario, r, args.study_dir, methods))
    table = pd.DataFrame(rows)
    if args.out:
        table.to_csv(args.out, index=False)
    for name in ("plain_mean", "trimmed_mean", "dl_mean"):
        table[name.replace("_mean", "_rel")] = table[name] / table["true_global_ce"] - 1
    table["median_local_rel"] = table["median_local_error"] / table["true_global_ce"]
    columns = ["plain_rel", "trimmed_rel", "dl_rel", "median_local_rel", "mean_i2gx"]
    summary = table.groupby(["scenario", "method", "source"])[columns].median().unstack("source")
    print(f"# {platform.processor() or platform.machine()}; rounds: {table.groupby('scenario')['round'].nunique().to_dict()}")
    print("relative bias of the global estimate (median over rounds), by data source:")
    with pd.option_context("display.width", 250, "display.max_columns", 20, "display.float_format", "{:+.3f}".format):
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
