"""The true causal effect of the exposure on the outcome, per locus and per round.

For each sequence with an embedded exposure instance, every alternative base
at every position of that instance is a mutant. Noise-free expected counts of
mutant and reference are computed with the confounders removed (eta = nu = 0,
z = 0), Anscombe-transformed, and the outcome changes dy are regressed on the
exposure changes dx without intercept: ``CE = sum(dx dy) / sum(dx^2)``.

The round's global true CE is the mean over loci whose exposure instance is
*functional*: ``sum(dx^2)`` at least :data:`FUNCTIONAL_FRACTION` of the median
over the round's loci. A sampled PWM instance can be so weak that it barely
binds (about 5 % of instances; ``sum(dx^2)`` mostly 1e-3 to 1 against a
median near 4,000, with few loci in between, so any threshold from 0.1 to 40
gives the same global CE within 1 %). Its ratio divides two near-zero changes that mutations acting on
the outcome motif's overlapping windows dominate, giving values such as -687
that swamp a plain mean (0.44 instead of 1.88 in a round with gamma = 10,
whose pooled ratio ``sum(sxy) / sum(sxx)`` is 1.887). Such a locus has no
exposure signal for MR either (no mutation passes an instrument filter). This
is a choice the paper leaves open ("the mean over sequences"); the local
values of every locus are kept, with the ``functional`` flag beside them.

Sequences are scored with the motif matrices, background and pseudocount
recorded in the simulated dataset, i.e. exactly as the generator scored them.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from deepmr_dist import schema
from deepmr_dist.errors import InputError
from deepmr_dist.simulation.binding import binding_probability
from deepmr_dist.simulation.counts import CountParameters, anscombe, expected_counts
from deepmr_dist.simulation.generator import dataset_motif_models, select_split

FUNCTIONAL_FRACTION = 1e-3
"""An exposure instance is functional when sum(dx^2) >= this fraction of the round's median."""


def exposure_mutants(codes: np.ndarray, starts: np.ndarray, motif_length: int) -> np.ndarray:
    """Every single-base substitution inside each sequence's exposure instance.

    Parameters
    ----------
    codes
        ``(n, L)`` reference base codes.
    starts
        ``(n,)`` start of each sequence's exposure instance.
    motif_length
        Length m of the exposure motif.

    Returns
    -------
    numpy.ndarray
        ``(n, m, 3, L)`` mutant codes: offset j of the instance set to the k-th
        alternative base ``(ref + k + 1) mod 4``.
    """
    n, length = codes.shape
    positions = starts[:, None] + np.arange(motif_length)
    if np.any(starts < 0) or np.any(positions >= length):
        raise InputError("exposure instance starts must lie inside the sequences")
    rows = np.arange(n)[:, None]
    alternatives = (codes[rows, positions][:, :, None] + np.arange(1, 4)) % 4
    mutants = np.repeat(np.repeat(codes[:, None, None, :], motif_length, axis=1), 3, axis=2)
    mutants[rows[:, :, None], np.arange(motif_length)[None, :, None], np.arange(3)[None, None, :],
            positions[:, :, None]] = alternatives
    return mutants


_ABSENT = {"f": np.nan, "i": 0, "b": False}
"""What a truth variable holds, by dtype kind, for a locus without an exposure instance."""


def true_causal_effects_of(ds: xr.Dataset, loci: np.ndarray, *, split: str | None = "test") -> xr.Dataset:
    """:func:`true_causal_effects` for exactly ``loci``, in their order: the ``truth`` group of a run.

    A locus without an exposure instance has ``true_ce`` and ``exposure_ss`` NaN, ``n_mutations``
    0 and ``functional`` False, so every variable keeps the registry's dtype (reindexing alone
    would turn the int and bool ones into float64 NaN).
    """
    absent = {v.name: _ABSENT[np.dtype(v.dtype).kind] for v in schema.variables_of(schema.TRUTH) if "locus" in v.dims}
    return true_causal_effects(ds, split=split).reindex(locus=loci, fill_value=absent)


def true_causal_effects(ds: xr.Dataset, *, split: str | None = "test") -> xr.Dataset:
    """True local causal effect of every locus with an exposure instance, and their mean.

    Parameters
    ----------
    ds
        One round from :func:`~deepmr_dist.simulation.generator.simulate_round`.
    split
        Which loci to use (``"test"``, the paper's choice); ``None`` uses all loci.

    Returns
    -------
    xarray.Dataset
        ``true_ce`` (locus), keyed by the round's locus ids, NaN where no
        substitution changes the exposure; ``n_mutations`` (locus);
        ``exposure_ss`` (locus) = sum(dx^2), near 0 where the instance is
        redundant (another window already binds), which makes that locus's
        ratio ill-conditioned; ``functional`` (locus), whether ``exposure_ss``
        reaches :data:`FUNCTIONAL_FRACTION` of the median; scalar
        ``global_true_ce``, the mean of the local values of functional loci. Attrs carry
        the round's alpha, gamma, scenario, round and seed.
    """
    required = {"sequence", "motif_start", "motif_probability", "motif_length"} | ({"split"} if split else set())
    missing = required - set(ds.variables)
    if missing:
        raise InputError(f"dataset lacks {sorted(missing)}; pass a round made by simulate_round")
    if split is not None:
        ds = select_split(ds, split)
    has_exposure = ds["motif_start"].sel(motif="exposure").values >= 0
    loci = ds["locus"].values[has_exposure]
    models = dataset_motif_models(ds)
    codes = ds["sequence"].values[has_exposure]
    starts = ds["motif_start"].sel(motif="exposure").values[has_exposure].astype(np.int64)
    length = models["exposure"].length
    mutants = exposure_mutants(codes, starts, length).reshape(-1, codes.shape[1])
    params = CountParameters(alpha=ds.attrs["alpha"], gamma=ds.attrs["gamma"]).unconfounded()

    def transformed(sequences: np.ndarray) -> np.ndarray:
        q_exposure = binding_probability(sequences, models["exposure"].energy)
        q_outcome = binding_probability(sequences, models["outcome"].energy)
        return anscombe(expected_counts(q_exposure, q_outcome, 0.0, 0.0, params))

    reference = transformed(codes)
    mutant = transformed(mutants).reshape(len(loci), 3 * length, 2)
    change = mutant - reference[:, None, :]
    dx, dy = change[..., 0], change[..., 1]
    sxx = np.sum(dx * dx, axis=1)
    sxy = np.sum(dx * dy, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        local = np.where(sxx > 0, sxy / sxx, np.nan)
    functional = np.isfinite(local) & (sxx >= FUNCTIONAL_FRACTION * np.median(sxx)) if len(loci) else np.zeros(0, bool)
    global_ce = float(local[functional].mean()) if functional.any() else float("nan")
    return xr.Dataset(
        {
            "true_ce": ("locus", local),
            "n_mutations": ("locus", np.full(len(loci), 3 * length)),
            "exposure_ss": ("locus", sxx),
            "functional": ("locus", functional),
            "global_true_ce": ((), global_ce),
        },
        coords={"locus": loci},
        attrs={key: ds.attrs[key] for key in ("scenario", "round", "seed", "alpha", "gamma") if key in ds.attrs},
    )
