"""Exceptions raised for user-facing problems (bad input, incompatible stores), and the check of names.

The command line prints these as one line without a traceback; anything else
is a bug and keeps its traceback. :func:`check_names` is the one check of
user-given names against a registry of valid names (transforms, MR and
meta-analysis methods, instrument rules).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable


class DeepMRError(Exception):
    """Base class of every error a user can fix by changing their input."""


class InputError(DeepMRError, ValueError):
    """An input file, array or table is malformed; the message names it and the fault."""


class ModelOutputError(DeepMRError, ValueError):
    """A model returned predictions of the wrong shape or non-finite values."""


class StoreError(DeepMRError):
    """A run store is missing, incomplete, or was made by a different run."""


def check_names(names: Iterable[str], registry: Collection[str], what: str) -> None:
    """Raise unless every name is in ``registry`` (the one check of names against a registry of names).

    Parameters
    ----------
    names : iterable of str
        The names given.
    registry : collection of str
        The valid names, in the order the message lists them (a tuple, or the keys of a dict).
    what : str
        What a name names, for the message (``"transform"``, ``"MR method(s)"``).

    Raises
    ------
    InputError
        ``unknown {what} 'a', 'b'; valid: x, y, z``, naming every unknown name in order.
    """
    unknown = [name for name in names if name not in registry]
    if unknown:
        raise InputError(f"unknown {what} {', '.join(map(repr, unknown))}; valid: {', '.join(registry)}")


def check_name(name: str, registry: Collection[str], what: str) -> str:
    """``name`` if it is in ``registry``; else the :class:`InputError` of :func:`check_names`."""
    check_names((name,), registry, what)
    return name
