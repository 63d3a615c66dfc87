"""The run store's variables: name, group, dims, dtype and meaning, in one place.

Every stage that writes a variable takes its dims and dtype from here, and
:func:`validate` checks a Dataset against the registry, so the layout of a run
store is defined once (sgkit's variable-registry pattern).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import xarray as xr

from deepmr_dist.errors import StoreError

ISM = "ism"
CALIBRATION = "calibration"
EFFECTS = "effects"
MR = "mr"
META = "meta"
TRUTH = "truth"
GROUPS = (ISM, CALIBRATION, EFFECTS, MR, META, TRUTH)
"""Every group a run store can hold, in the order stages write them (calibration and truth are optional)."""


@dataclass(frozen=True)
class Variable:
    """One variable of the run store.

    Attributes
    ----------
    name : str
        Variable name inside its group (unique within the group; the mr and meta
        groups share some names, e.g. ``ci_lower``, ``q``, ``reason``).
    group : str
        Store group: one of :data:`GROUPS`.
    dims : tuple of str
        Dimension names, in order.
    dtype : str
        A numpy dtype name, or ``"str"`` for text (fixed-width unicode in memory,
        variable-length strings once written to Zarr).
    description : str
        What the values mean.
    field : str or None
        For the mr and meta groups: the field of the kernel's result
        (:class:`deepmr_dist.mr.MRResult`, :class:`deepmr_dist.meta.MetaResult`) the
        variable is copied from, which is also its column in every table (``None``:
        the stage computes it, and the table column is the variable's name).
    """

    name: str
    group: str
    dims: tuple[str, ...]
    dtype: str
    description: str
    field: str | None = None


TEXT = "str"
"""``Variable.dtype`` of text variables."""
FLOAT = "float"
"""``Variable.dtype`` of variables stored as float32 or float64 (the user's choice)."""

_LOCAL = ("pair", "locus", "method")
_GLOBAL = ("pair", "method")

REGISTRY: tuple[Variable, ...] = (
    Variable("sequence", ISM, ("locus", "position"), "int8", "Reference base codes: A=0, C=1, G=2, T=3, N=4."),
    Variable(
        "ref_pred",
        ISM,
        ("locus", "member", "task"),
        "float32",
        "Each member's prediction for the reference sequence.",
    ),
    Variable(
        "mut_pred",
        ISM,
        ("locus", "member", "position", "allele", "task"),
        "float32",
        "Each member's prediction for the sequence with `allele` at `position`; NaN at the reference allele "
        "(not a mutation).",
    ),
    Variable(
        "complete",
        ISM,
        ("locus",),
        "bool",
        "True once the locus's predictions are written; resume skips complete loci.",
    ),
    Variable(
        "chunk_digest",
        ISM,
        ("locus",),
        "uint64",
        "64-bit BLAKE2b of the locus's ref_pred and mut_pred values (float32 bytes, C order), written with its "
        "chunk before complete; 0: none recorded. `deepmr verify --full` recomputes it.",
    ),
    Variable(
        "chunk_nbytes",
        ISM,
        ("locus",),
        "uint64",
        "Bytes of the encoded ref_pred and mut_pred chunks of the locus's chunk, as written; 0: none recorded. "
        "`deepmr verify` compares it with the stored sizes.",
    ),
    Variable(
        "effect",
        EFFECTS,
        ("locus", "position", "allele", "task"),
        FLOAT,
        "Mean over members of mut_pred - ref_pred (computed in float64; stored as float32 unless asked otherwise).",
    ),
    Variable(
        "effect_se",
        EFFECTS,
        ("locus", "position", "allele", "task"),
        FLOAT,
        "SD over members of mut_pred - ref_pred = sqrt(var(mut) + var(ref) - 2 cov(mut, ref)); ddof in attrs.",
    ),
    # mr: local causal effects, one MR fit per (exposure -> outcome pair, locus, method), in the columns of
    # deepmr_dist.mr.result.COLUMNS
    Variable(
        "n_instruments",
        MR,
        _LOCAL,
        "int64",
        "Instruments the method used at the locus (selected by the instrument rule, with valid effects and SEs).",
    ),
    Variable(
        "local_ce",
        MR,
        _LOCAL,
        "float64",
        "Local causal effect of the pair's exposure on its outcome at the locus (the MR estimate; the slope for"
        " the MR-Egger family); NaN where undefined, see reason.",
    ),
    Variable(
        "local_se",
        MR,
        _LOCAL,
        "float64",
        "Standard error of local_ce, as the method defines it (e.g. bootstrap SD for the medians and mbe; the "
        "SD of the Wald ratios for wald_mean).",
    ),
    Variable(
        "ci_lower",
        MR,
        _LOCAL,
        "float64",
        "Lower confidence limit of local_ce at level 1 - alpha (alpha: attrs mr_alpha if given, else 0.05).",
    ),
    Variable("ci_upper", MR, _LOCAL, "float64", "Upper confidence limit of local_ce at level 1 - alpha."),
    Variable(
        "pvalue",
        MR,
        _LOCAL,
        "float64",
        "Two-sided p-value of local_ce = 0 (normal, or t with egger_t_dist / t_dist).",
    ),
    Variable(
        "intercept",
        MR,
        _LOCAL,
        "float64",
        "MR-Egger intercept (directional pleiotropy); NaN for methods without one.",
    ),
    Variable("intercept_se", MR, _LOCAL, "float64", "Standard error of the MR-Egger intercept."),
    Variable(
        "intercept_ci_lower",
        MR,
        _LOCAL,
        "float64",
        "Lower confidence limit of the MR-Egger intercept at level 1 - alpha; NaN for methods without one.",
    ),
    Variable("intercept_ci_upper", MR, _LOCAL, "float64", "Upper confidence limit of the MR-Egger intercept."),
    Variable(
        "intercept_pvalue",
        MR,
        _LOCAL,
        "float64",
        "Two-sided p-value of the MR-Egger intercept = 0 (the pleiotropy test).",
    ),
    Variable(
        "rse",
        MR,
        _LOCAL,
        "float64",
        "Residual standard error of the fit (the robust scale for MM fits); NaN for methods without one.",
    ),
    Variable(
        "q",
        MR,
        _LOCAL,
        "float64",
        "Heterogeneity of the fit: Cochran's Q of IVW (n - 1 df), the residual Q of MR-Egger (n - 2 df); NaN "
        "for methods without one.",
    ),
    Variable("q_pvalue", MR, _LOCAL, "float64", "Chi-squared p-value of q."),
    Variable(
        "i2",
        MR,
        _LOCAL,
        "float64",
        "I^2 = max(0, (q - df) / q) of the IVW fit (a fraction, not percent); NaN for methods without one.",
    ),
    Variable(
        "i2gx",
        MR,
        _LOCAL,
        "float64",
        "I^2_GX of the oriented exposure associations (MR-Egger family; NaN otherwise).",
    ),
    Variable(
        "fstat",
        MR,
        _LOCAL,
        "float64",
        "Mean first-stage F statistic of the instruments used, mean(bx^2 / bxse^2).",
    ),
    Variable(
        "reason",
        MR,
        _LOCAL,
        TEXT,
        "'' where local_ce and local_se are defined, else a code of deepmr_dist.mr.REASONS.",
    ),
    Variable(
        "note",
        MR,
        _LOCAL,
        TEXT,
        "'' or a caveat on a defined estimate, a code of deepmr_dist.mr.NOTES (e.g. sampled_s_start).",
    ),
    # meta: global causal effects, one meta-analysis of the local ones per (pair, method)
    Variable("k", META, _GLOBAL, "int64", "Loci meta-analysed: finite local_ce and a positive finite local_se."),
    Variable(
        "n_loci_undefined",
        META,
        _GLOBAL,
        "int64",
        "Loci left out because local_ce or local_se is undefined (k + n_loci_undefined = all loci).",
    ),
    Variable(
        "global_ce",
        META,
        _GLOBAL,
        "float64",
        "Global causal effect: meta-analysis of local_ce across loci (attrs meta_method: fe, dl, reml or pm).",
    ),
    Variable(
        "global_se",
        META,
        _GLOBAL,
        "float64",
        "Standard error of global_ce (Hartung-Knapp adjusted when attrs hksj).",
    ),
    Variable(
        "ci_lower",
        META,
        _GLOBAL,
        "float64",
        "Lower confidence limit of global_ce at level 1 - alpha (attrs alpha).",
    ),
    Variable("ci_upper", META, _GLOBAL, "float64", "Upper confidence limit of global_ce at level 1 - alpha."),
    Variable("pvalue", META, _GLOBAL, "float64", "Two-sided p-value of global_ce = 0."),
    Variable(
        "tau2",
        META,
        _GLOBAL,
        "float64",
        "Between-locus variance of the local causal effects (0 for the fixed-effect model).",
    ),
    Variable(
        "i2",
        META,
        _GLOBAL,
        "float64",
        "I^2: share of the variability of local_ce due to heterogeneity, in percent (metafor's definition).",
    ),
    Variable(
        "h2",
        META,
        _GLOBAL,
        "float64",
        "H^2: total over sampling variability of local_ce (metafor's definition).",
    ),
    Variable("q", META, _GLOBAL, "float64", "Cochran's Q of the loci used (k - 1 df)."),
    Variable("q_pvalue", META, _GLOBAL, "float64", "Chi-squared p-value of q."),
    Variable(
        "pi_lower",
        META,
        _GLOBAL,
        "float64",
        "Lower limit of the prediction interval for a new locus's causal effect (NaN for fe).",
    ),
    Variable(
        "pi_upper",
        META,
        _GLOBAL,
        "float64",
        "Upper limit of the prediction interval for a new locus's causal effect (NaN for fe).",
    ),
    Variable(
        "reason",
        META,
        _GLOBAL,
        TEXT,
        "'' where global_ce is defined, else a code of deepmr_dist.meta.META_REASONS.",
    ),
    Variable(
        "mean_i2gx",
        META,
        _GLOBAL,
        "float64",
        "Mean over loci of the local I^2_GX (MR-Egger family; NaN for other methods): the regression-dilution summary.",
    ),
    Variable(
        "share_i2gx_below_0_9",
        META,
        _GLOBAL,
        "float64",
        "Share of loci with I^2_GX below 0.9, where Bowden et al. (2016) recommend a SIMEX correction of MR-Egger.",
    ),
    # truth: simulation only, the true causal effects of the round (deepmr_dist.simulation.truth)
    Variable("true_ce", TRUTH, ("locus",), "float64", "True local causal effect; NaN without an exposure instance."),
    Variable("n_mutations", TRUTH, ("locus",), "int64", "Substitutions inside the exposure instance behind true_ce."),
    Variable("exposure_ss", TRUTH, ("locus",), "float64", "sum(dx^2) of those substitutions' noise-free exposure changes."),
    Variable("functional", TRUTH, ("locus",), "bool", "Whether the exposure instance is functional (counts in the global truth)."),
    Variable("global_true_ce", TRUTH, (), "float64", "The round's true global CE: the mean of true_ce over functional loci."),
)
"""Every variable of the run store, by group (in each group, the order of its table columns)."""

_RESULT_FIELDS: dict[str, dict[str, str]] = {
    MR: {"n_instruments": "n", "local_ce": "estimate", "local_se": "se", "ci_lower": "ci_lower", "ci_upper": "ci_upper",
         "pvalue": "pvalue", "intercept": "intercept", "intercept_se": "intercept_se",
         "intercept_ci_lower": "intercept_ci_lower", "intercept_ci_upper": "intercept_ci_upper",
         "intercept_pvalue": "intercept_pvalue", "rse": "rse", "q": "q", "q_pvalue": "q_pvalue", "i2": "i2",
         "i2gx": "i2gx", "fstat": "fstat", "reason": "reason", "note": "note"},
    META: {"global_ce": "estimate", "global_se": "se", "ci_lower": "ci_lower", "ci_upper": "ci_upper", "pvalue": "pvalue",
           "tau2": "tau2", "i2": "i2", "h2": "h2", "q": "q", "q_pvalue": "q_pvalue", "pi_lower": "pi_lower",
           "pi_upper": "pi_upper", "k": "k", "reason": "reason"},
}  # fmt: skip
"""mr and meta variables -> the kernel result field each is copied from (the one place these names are kept)."""

REGISTRY = tuple(replace(v, field=_RESULT_FIELDS.get(v.group, {}).get(v.name)) for v in REGISTRY)

VARIABLES: dict[str, Variable] = {
    v.name: v for v in REGISTRY if sum(w.name == v.name for w in REGISTRY) == 1
}
"""Variables by name, for every name no two groups share; shared names need :func:`variable`."""


def variable(group: str, name: str) -> Variable:
    """The registered variable ``name`` of store group ``group``.

    Raises
    ------
    KeyError
        If the group has no such variable.
    """
    for var in REGISTRY:
        if var.group == group and var.name == name:
            return var
    raise KeyError(f"group {group!r} has no registered variable {name!r}")


def variables_of(group: str) -> list[Variable]:
    """The registered variables of one store group."""
    return [v for v in REGISTRY if v.group == group]


def table_columns(group: str) -> dict[str, str]:
    """Variable name -> table column of every registered variable of ``group``, in table order.

    A variable copied from a kernel's result takes the result field's name
    (``local_ce`` -> ``estimate``, ``n_instruments`` -> ``n``); the others keep their own.
    Every table of the mr group (``deepmr mr``'s output, a run's ``local_ce`` table) has these
    columns in this order, after its id columns.
    """
    return {v.name: v.field or v.name for v in variables_of(group)}


TABLE_NA = "NA"
"""How every CSV/TSV table the project writes spells a missing number (NaN), as R's ``write.csv`` does."""


def _dtype_ok(dtype: np.dtype, expected: str) -> bool:
    if expected == TEXT:
        return dtype.kind in "UOT"  # fixed-width, object (read back from Zarr) or numpy StringDType
    if expected == FLOAT:
        return dtype in (np.dtype("float32"), np.dtype("float64"))
    return dtype == np.dtype(expected)


def validate(ds: xr.Dataset, group: str) -> xr.Dataset:
    """Check that ``ds`` has every registered variable of ``group`` with the right dims and dtype.

    Returns ``ds`` unchanged so it can be used in a pipeline of stage functions.
    Only metadata is read: a lazy Dataset stays lazy.

    Raises
    ------
    StoreError
        Naming the first variable that is missing or malformed.
    """
    for var in variables_of(group):
        if var.name not in ds:
            raise StoreError(f"group {group!r} lacks variable {var.name!r} ({var.description})")
        arr = ds[var.name]
        if arr.dims != var.dims:
            raise StoreError(f"{group}/{var.name} has dims {arr.dims}, expected {var.dims}")
        if not _dtype_ok(arr.dtype, var.dtype):
            raise StoreError(f"{group}/{var.name} has dtype {arr.dtype}, expected {var.dtype}")
    return ds
