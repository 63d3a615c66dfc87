"""Store attributes that NetCDF can hold: every attr the store writes goes through :func:`encode_attrs`, every read through :func:`decode_attrs`.

NetCDF attributes may be text or numbers only; Zarr's may be any JSON. So that
``xr.open_zarr(...).to_netcdf()`` works on every group, a value that is not a
string, an int (within int64) or a float (a dict, a list, a tuple, ``None``, a
bool) is written as its JSON text, and the attribute :data:`JSON_ATTRS` lists
the names so encoded (space-separated). Listing them, rather than guessing
from the text, keeps a plain string that happens to be valid JSON (``"1"``,
``"null"``) a string. Stores written before this (dicts and lists as JSON
values in ``zarr.json``, no list) read back unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepmr_dist.errors import StoreError

JSON_ATTRS = "deepmr_json_attrs"
"""Attribute naming, space-separated, the attributes whose values are JSON text."""

_INT64 = np.iinfo(np.int64)


def _scalar(value: Any) -> str | int | float | None:
    """``value`` as a NetCDF-safe str, int or float, or None if it needs JSON."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, str):
        return str(value)  # numpy's str_ too
    if isinstance(value, (int, np.integer)) and _INT64.min <= value <= _INT64.max:
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return None


def _jsonable(value: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays as Python values, anything else as its text."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def encode_attrs(attrs: Mapping[str, Any]) -> dict[str, str | int | float]:
    """``attrs`` with every value NetCDF cannot hold as JSON text, and :data:`JSON_ATTRS` naming those.

    Idempotent: attributes already encoded (named in ``attrs``'s own
    :data:`JSON_ATTRS`) stay as they are.
    """
    already = set(str(attrs.get(JSON_ATTRS, "")).split())
    out: dict[str, str | int | float] = {}
    encoded: list[str] = []
    for key, value in attrs.items():
        if key == JSON_ATTRS:
            continue
        scalar = _scalar(value)
        if scalar is None:
            out[key] = json.dumps(value, default=_jsonable)
            encoded.append(key)
        else:
            out[key] = scalar
            if key in already and isinstance(scalar, str):
                encoded.append(key)
    if encoded:
        out[JSON_ATTRS] = " ".join(encoded)
    return out


def decode_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes as they were before :func:`encode_attrs`: the JSON texts it names parsed back.

    Attributes of stores written before the encoding (JSON values, no
    :data:`JSON_ATTRS`) are returned as they are, so decoding is idempotent too.

    Raises
    ------
    StoreError
        If an attribute named in :data:`JSON_ATTRS` is absent or not JSON (a damaged store).
    """
    out = {key: value for key, value in attrs.items() if key != JSON_ATTRS}
    for key in str(attrs.get(JSON_ATTRS, "")).split():
        try:
            out[key] = json.loads(out[key])
        except (KeyError, TypeError, ValueError):
            raise StoreError(f"attribute {key!r} is listed in {JSON_ATTRS!r} but holds no JSON text") from None
    return out
