"""The run store's variables: name, group, dims, dtype and meaning, in one place.

Every stage that writes a variable takes its dims and dtype from here, and
:func:`validate` checks a Dataset against the registry, so the layout of a run
store is defined once (sgkit's variable-registry pattern).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xarray as xr

from deepmr_dist.errors import StoreError

ISM = "ism"
EFFECTS = "effects"
MR = "mr"
META = "meta"
GROUPS = (ISM, EFFECTS, MR, META)


@dataclass(frozen=True)
class Variable:
    """One variable of the run store."""

    name: str
    group: str
    dims: tuple[str, ...]
    dtype: str
    description: str


VARIABLES: dict[str, Variable] = {
    v.name: v
    for v in (
        Variable("sequence", ISM, ("locus", "position"), "int8", "Reference base codes: A=0, C=1, G=2, T=3, N=4."),
        Variable("ref_pred", ISM, ("locus", "member", "task"), "float32", "Each member's prediction for the reference sequence."),
        Variable(
            "mut_pred",
            ISM,
            ("locus", "member", "position", "allele", "task"),
            "float32",
            "Each member's prediction for the sequence with `allele` at `position`; NaN at the reference allele (not a mutation).",
        ),
        Variable("complete", ISM, ("locus",), "bool", "True once the locus's predictions are written; resume skips complete loci."),
        Variable("effect", EFFECTS, ("locus", "position", "allele", "task"), "float64", "Mean over members of mut_pred - ref_pred."),
        Variable(
            "effect_se",
            EFFECTS,
            ("locus", "position", "allele", "task"),
            "float64",
            "SD over members of mut_pred - ref_pred = sqrt(var(mut) + var(ref) - 2 cov(mut, ref)); ddof in attrs.",
        ),
    )
}


def variables_of(group: str) -> list[Variable]:
    """The registered variables of one store group."""
    return [v for v in VARIABLES.values() if v.group == group]


def validate(ds: xr.Dataset, group: str) -> xr.Dataset:
    """Check that ``ds`` has every registered variable of ``group`` with the right dims and dtype.

    Returns ``ds`` unchanged so it can be used in a pipeline of stage functions.

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
        if arr.dtype != np.dtype(var.dtype):
            raise StoreError(f"{group}/{var.name} has dtype {arr.dtype}, expected {var.dtype}")
    return ds
