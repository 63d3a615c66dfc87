"""The run store's variables: name, group, dims, dtype, names, units and meaning, in one place.

Every stage that writes a variable takes its dims and dtype from here, and
:func:`validate` checks a Dataset against the registry, so the layout of a run
store is defined once (sgkit's variable-registry pattern). The store's write
path (:mod:`deepmr_dist.io.store`) copies each variable's and coordinate's
:func:`attributes` into the group it writes, so a store describes itself to
any reader (plain xarray, NetCDF tools).

Attributes follow the CF conventions' names: ``long_name`` (a short label),
``units`` and ``description`` (what the values mean). The rule for ``units``:

- a dimensionless quantity (a count, a p-value, a fraction, a test statistic,
  a multiplier) has ``units = "1"`` (:data:`UNITLESS`), as CF writes it;
  ``i2`` of the meta group is in ``"percent"``;
- a value that is not a quantity (a boolean flag, a base or reason code, a
  checksum, a name or id) has no ``units`` attribute;
- a prediction, effect or standard error is in the units of the model's output
  (:data:`OUTPUT`: after the head's transform, e.g. log counts or a
  probability; the store cannot know them, so this is a label, not a UDUNITS
  string); causal effects are outcome per exposure output (:data:`CE`);
- positions and interval bounds are in ``"bp"``; byte sizes in ``"bytes"``.

Because model-output units are not UDUNITS strings, a store does not claim CF
compliance: its ``Conventions`` attribute names the store layout instead (see
:func:`deepmr_dist.io.store.global_attrs`).
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

GROUP_TITLES: dict[str, str] = {
    ISM: "in-silico mutagenesis: every member's prediction for every locus and single-base mutation",
    CALIBRATION: "calibration of the effect standard errors on held-out labelled loci",
    EFFECTS: "mutation effects: mean and standard error over members of mutant minus reference prediction",
    MR: "local causal effects: Mendelian randomization per pair, locus and method",
    META: "global causal effects: meta-analysis of the local causal effects per pair and method",
    TRUTH: "true causal effects of the simulated round",
}
"""What each group holds, in one line (its ``title`` attribute)."""

UNITLESS = "1"
"""``units`` of a dimensionless quantity (CF's spelling)."""
OUTPUT = "model output"
"""``units`` of predictions, effects and their SEs: the model's output units, which the store cannot know."""
CE = "model output (outcome) / model output (exposure)"
"""``units`` of a causal effect: outcome output per unit of exposure output."""
BP = "bp"
"""``units`` of positions and interval bounds (base pairs)."""


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
    long_name : str
        A short label (CF's ``long_name``), e.g. for plot axes.
    units : str or None
        The values' units by the rule of the module docstring; ``None``: not a quantity.
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
    long_name: str
    units: str | None
    description: str
    field: str | None = None

    @property
    def attributes(self) -> dict[str, str]:
        """``long_name``, ``units`` (when it has any) and ``description``, as the store writes them."""
        return _attributes(self.long_name, self.units, self.description)


@dataclass(frozen=True)
class Coordinate:
    """One coordinate of the run store; a name means the same in every group that has it.

    Attributes are those of :class:`Variable` of the same names.
    """

    name: str
    long_name: str
    units: str | None
    description: str

    @property
    def attributes(self) -> dict[str, str]:
        """``long_name``, ``units`` (when it has any) and ``description``, as the store writes them."""
        return _attributes(self.long_name, self.units, self.description)


def _attributes(long_name: str, units: str | None, description: str) -> dict[str, str]:
    return {"long_name": long_name, **({"units": units} if units is not None else {}), "description": description}


TEXT = "str"
"""``Variable.dtype`` of text variables."""
FLOAT = "float"
"""``Variable.dtype`` of variables stored as float32 or float64 (the user's choice)."""

_LOCAL = ("pair", "locus", "method")
_GLOBAL = ("pair", "method")
_MUTATION = ("locus", "position", "allele", "task")

REGISTRY: tuple[Variable, ...] = (
    Variable("sequence", ISM, ("locus", "position"), "int8", "reference base code", None,
             "Reference base codes: A=0, C=1, G=2, T=3, N=4."),
    Variable("ref_pred", ISM, ("locus", "member", "task"), "float32", "reference prediction", OUTPUT,
             "Each member's prediction for the reference sequence."),
    Variable("mut_pred", ISM, ("locus", "member", "position", "allele", "task"), "float32", "mutant prediction", OUTPUT,
             "Each member's prediction for the sequence with `allele` at `position`; NaN at the reference allele "
             "(not a mutation)."),
    Variable("complete", ISM, ("locus",), "bool", "locus complete", None,
             "True once the locus's predictions are written; resume skips complete loci."),
    Variable("chunk_digest", ISM, ("locus",), "uint64", "checksum of the locus's predictions", None,
             "64-bit BLAKE2b of the locus's ref_pred and mut_pred values (float32 bytes, C order), written with its "
             "chunk before complete; 0: none recorded. `deepmr verify --full` recomputes it."),
    Variable("chunk_nbytes", ISM, ("locus",), "uint64", "stored size of the locus's chunk", "bytes",
             "Bytes of the encoded ref_pred and mut_pred chunks of the locus's chunk, as written; 0: none recorded. "
             "`deepmr verify` compares it with the stored sizes."),
    # calibration: the SE calibration fitted on held-out loci (deepmr_dist.stages.calibration)
    Variable("factor", CALIBRATION, ("task",), "float64", "effect_se calibration factor", UNITLESS,
             "Multiplier k of effect_se for the task, chosen so that the calibrated intervals of held-out labels hold them "
             "at the attrs level."),
    Variable("noise_variance", CALIBRATION, ("task",), "float64", "label noise variance", f"{OUTPUT}^2",
             "Mean over the held-out loci of the label noise variance used in the fit (aleatoric; it never enters effects)."),
    Variable("coverage_before", CALIBRATION, ("task", "level"), "float64", "coverage before calibration", UNITLESS,
             "Observed coverage of held-out labels at each nominal level, by the isotonic map of the ensemble as it is "
             "(k = 1), label noise included."),
    Variable("coverage_after", CALIBRATION, ("task", "level"), "float64", "coverage after calibration", UNITLESS,
             "Observed coverage of held-out labels at each nominal level after calibration (k = factor), label noise "
             "included."),
    Variable("effect", EFFECTS, _MUTATION, FLOAT, "mutation effect", OUTPUT,
             "Mean over members of mut_pred - ref_pred (computed in float64; stored as float32 unless asked otherwise)."),
    Variable("effect_se", EFFECTS, _MUTATION, FLOAT, "standard error of the mutation effect", OUTPUT,
             "SD over members of mut_pred - ref_pred = sqrt(var(mut) + var(ref) - 2 cov(mut, ref)); ddof in attrs."),
    # mr: local causal effects, one MR fit per (exposure -> outcome pair, locus, method), in the columns of
    # deepmr_dist.mr.result.COLUMNS
    Variable("n_instruments", MR, _LOCAL, "int64", "number of instruments", UNITLESS,
             "Instruments the method used at the locus (selected by the instrument rule, with valid effects and SEs)."),
    Variable("local_ce", MR, _LOCAL, "float64", "local causal effect", CE,
             "Local causal effect of the pair's exposure on its outcome at the locus (the MR estimate; the slope for"
             " the MR-Egger family); NaN where undefined, see reason."),
    Variable("local_se", MR, _LOCAL, "float64", "standard error of the local causal effect", CE,
             "Standard error of local_ce, as the method defines it (e.g. bootstrap SD for the medians and mbe; the "
             "SD of the Wald ratios for wald_mean)."),
    Variable("ci_lower", MR, _LOCAL, "float64", "lower confidence limit of the local causal effect", CE,
             "Lower confidence limit of local_ce at level 1 - alpha (alpha: attrs mr_alpha if given, else 0.05)."),
    Variable("ci_upper", MR, _LOCAL, "float64", "upper confidence limit of the local causal effect", CE,
             "Upper confidence limit of local_ce at level 1 - alpha."),
    Variable("pvalue", MR, _LOCAL, "float64", "p-value of the local causal effect", UNITLESS,
             "Two-sided p-value of local_ce = 0 (normal, or t with egger_t_dist / t_dist)."),
    Variable("intercept", MR, _LOCAL, "float64", "MR-Egger intercept", f"{OUTPUT} (outcome)",
             "MR-Egger intercept (directional pleiotropy); NaN for methods without one."),
    Variable("intercept_se", MR, _LOCAL, "float64", "standard error of the MR-Egger intercept", f"{OUTPUT} (outcome)",
             "Standard error of the MR-Egger intercept."),
    Variable("intercept_ci_lower", MR, _LOCAL, "float64", "lower confidence limit of the MR-Egger intercept",
             f"{OUTPUT} (outcome)",
             "Lower confidence limit of the MR-Egger intercept at level 1 - alpha; NaN for methods without one."),
    Variable("intercept_ci_upper", MR, _LOCAL, "float64", "upper confidence limit of the MR-Egger intercept",
             f"{OUTPUT} (outcome)", "Upper confidence limit of the MR-Egger intercept."),
    Variable("intercept_pvalue", MR, _LOCAL, "float64", "p-value of the MR-Egger intercept", UNITLESS,
             "Two-sided p-value of the MR-Egger intercept = 0 (the pleiotropy test)."),
    Variable("rse", MR, _LOCAL, "float64", "residual standard error", UNITLESS,
             "Residual standard error of the fit (the robust scale for MM fits); NaN for methods without one."),
    Variable("q", MR, _LOCAL, "float64", "heterogeneity statistic Q", UNITLESS,
             "Heterogeneity of the fit: Cochran's Q of IVW (n - 1 df), the residual Q of MR-Egger (n - 2 df); NaN "
             "for methods without one."),
    Variable("q_pvalue", MR, _LOCAL, "float64", "p-value of Q", UNITLESS, "Chi-squared p-value of q."),
    Variable("i2", MR, _LOCAL, "float64", "I^2 of the IVW fit", UNITLESS,
             "I^2 = max(0, (q - df) / q) of the IVW fit (a fraction, not percent); NaN for methods without one."),
    Variable("i2gx", MR, _LOCAL, "float64", "I^2_GX", UNITLESS,
             "I^2_GX of the oriented exposure associations (MR-Egger family; NaN otherwise)."),
    Variable("fstat", MR, _LOCAL, "float64", "mean F statistic of the instruments", UNITLESS,
             "Mean first-stage F statistic of the instruments used, mean(bx^2 / bxse^2)."),
    Variable("reason", MR, _LOCAL, TEXT, "why the local estimate is undefined", None,
             "'' where local_ce and local_se are defined, else a code of deepmr_dist.mr.REASONS."),
    Variable("note", MR, _LOCAL, TEXT, "caveat on the local estimate", None,
             "'' or a caveat on a defined estimate, a code of deepmr_dist.mr.NOTES (e.g. sampled_s_start)."),
    Variable("n_excluded", MR, _LOCAL, "int64", "number of selected instruments excluded as invalid", UNITLESS,
             "Instruments the rule selected at the locus but left out for missing, non-finite or non-positive effects "
             "or SEs (deepmr_dist.stages.instruments.usable); deepmr mr's count of invalid input rows."),
    # meta: global causal effects, one meta-analysis of the local ones per (pair, method)
    Variable("k", META, _GLOBAL, "int64", "number of loci meta-analysed", UNITLESS,
             "Loci meta-analysed: finite local_ce and a positive finite local_se."),
    Variable("n_loci_undefined", META, _GLOBAL, "int64", "number of loci without a local estimate", UNITLESS,
             "Loci left out because local_ce or local_se is undefined (k + n_loci_undefined = all loci)."),
    Variable("global_ce", META, _GLOBAL, "float64", "global causal effect", CE,
             "Global causal effect: meta-analysis of local_ce across loci (attrs meta_method: fe, dl, reml or pm)."),
    Variable("global_se", META, _GLOBAL, "float64", "standard error of the global causal effect", CE,
             "Standard error of global_ce (Hartung-Knapp adjusted when attrs hksj)."),
    Variable("ci_lower", META, _GLOBAL, "float64", "lower confidence limit of the global causal effect", CE,
             "Lower confidence limit of global_ce at level 1 - alpha (attrs alpha)."),
    Variable("ci_upper", META, _GLOBAL, "float64", "upper confidence limit of the global causal effect", CE,
             "Upper confidence limit of global_ce at level 1 - alpha."),
    Variable("pvalue", META, _GLOBAL, "float64", "p-value of the global causal effect", UNITLESS,
             "Two-sided p-value of global_ce = 0."),
    Variable("tau2", META, _GLOBAL, "float64", "between-locus variance tau^2", f"({CE})^2",
             "Between-locus variance of the local causal effects (0 for the fixed-effect model)."),
    Variable("i2", META, _GLOBAL, "float64", "I^2 heterogeneity", "percent",
             "I^2: share of the variability of local_ce due to heterogeneity, in percent (metafor's definition)."),
    Variable("h2", META, _GLOBAL, "float64", "H^2 heterogeneity", UNITLESS,
             "H^2: total over sampling variability of local_ce (metafor's definition)."),
    Variable("q", META, _GLOBAL, "float64", "Cochran's Q", UNITLESS, "Cochran's Q of the loci used (k - 1 df)."),
    Variable("q_pvalue", META, _GLOBAL, "float64", "p-value of Q", UNITLESS, "Chi-squared p-value of q."),
    Variable("pi_lower", META, _GLOBAL, "float64", "lower prediction limit for a new locus", CE,
             "Lower limit of the prediction interval for a new locus's causal effect (NaN for fe)."),
    Variable("pi_upper", META, _GLOBAL, "float64", "upper prediction limit for a new locus", CE,
             "Upper limit of the prediction interval for a new locus's causal effect (NaN for fe)."),
    Variable("reason", META, _GLOBAL, TEXT, "why the global estimate is undefined", None,
             "'' where global_ce is defined, else a code of deepmr_dist.meta.META_REASONS."),
    Variable("mean_i2gx", META, _GLOBAL, "float64", "mean I^2_GX over loci", UNITLESS,
             "Mean over loci of the local I^2_GX (MR-Egger family; NaN for other methods): the regression-dilution "
             "summary."),
    Variable("share_i2gx_below_0_9", META, _GLOBAL, "float64", "share of loci with I^2_GX below 0.9", UNITLESS,
             "Share of loci with I^2_GX below 0.9, where Bowden et al. (2016) recommend a SIMEX correction of MR-Egger."),
    # truth: simulation only, the true causal effects of the round (deepmr_dist.simulation.truth)
    Variable("true_ce", TRUTH, ("locus",), "float64", "true local causal effect", CE,
             "True local causal effect; NaN without an exposure instance."),
    Variable("n_mutations", TRUTH, ("locus",), "int64", "number of mutations behind true_ce", UNITLESS,
             "Substitutions inside the exposure instance behind true_ce."),
    Variable("exposure_ss", TRUTH, ("locus",), "float64", "sum of squared exposure changes", f"{OUTPUT} (exposure)^2",
             "sum(dx^2) of those substitutions' noise-free exposure changes."),
    Variable("functional", TRUTH, ("locus",), "bool", "exposure instance functional", None,
             "Whether the exposure instance is functional (counts in the global truth)."),
    Variable("global_true_ce", TRUTH, (), "float64", "true global causal effect", CE,
             "The round's true global CE: the mean of true_ce over functional loci."),
)  # fmt: skip
"""Every variable of the run store, by group (in each group, the order of its table columns)."""

COORDINATES: tuple[Coordinate, ...] = (
    Coordinate("locus", "locus id", None, "Name of the locus: its FASTA record, BED interval or simulated sequence."),
    Coordinate("position", "position in the window", BP, "0-based offset of the base in the locus's sequence window."),
    Coordinate("allele", "allele", None,
               "Base placed at the position (A, C, G, T); where it is the reference base there is no mutation."),
    Coordinate("member", "ensemble member", None,
               "Ensemble member, or frozen MC-dropout mask, that made the prediction."),
    Coordinate("task", "model task", None, "Model output (task) predicted."),
    Coordinate("chrom", "chromosome", None, "Chromosome of the locus's genome interval (BED input)."),
    Coordinate("start", "interval start", BP, "0-based start of the locus's genome interval (BED convention)."),
    Coordinate("end", "interval end", BP, "0-based end (exclusive) of the locus's genome interval (BED convention)."),
    Coordinate("ref", "reference allele", None, "Reference base at the position (A, C, G, T, or N for an unknown base)."),
    Coordinate("alt", "alternative allele", None, "Base of the mutation: the allele as a letter."),
    Coordinate("variant_chrom", "variant chromosome", None, "Chromosome of the mutation (BED loci)."),
    Coordinate("variant_position", "variant position", BP,
               "1-based genome position of the mutation, as VCF writes it (BED loci)."),
    Coordinate("pair", "exposure->outcome pair", None, "Pair of tasks analysed, written 'exposure->outcome'."),
    Coordinate("exposure", "exposure task", None, "The pair's exposure task."),
    Coordinate("outcome", "outcome task", None, "The pair's outcome task."),
    Coordinate("method", "MR method", None, "MR method of the local causal effects (deepmr_dist.mr.METHODS)."),
    Coordinate("level", "nominal coverage level", UNITLESS, "Nominal level at which coverage_before and coverage_after are recorded."),
    Coordinate("calibration_locus", "calibration locus id", None,
               "Held-out labelled locus the calibration was fitted on."),
)  # fmt: skip
"""Every coordinate of the run store's groups (dimension coordinates and those along them)."""

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


_COORDINATES: dict[str, Coordinate] = {c.name: c for c in COORDINATES}


def attributes(group: str, name: str) -> dict[str, str]:
    """``long_name``, ``units`` (where it has any) and ``description`` of variable or coordinate ``name`` of ``group``.

    Returns an empty dict for a name the registry does not know (a stage's own extra variable).
    """
    for var in REGISTRY:
        if var.group == group and var.name == name:
            return var.attributes
    coordinate = _COORDINATES.get(name)
    return coordinate.attributes if coordinate is not None else {}


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
