"""Exceptions raised for user-facing problems (bad input, incompatible stores).

The command line prints these as one line without a traceback; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class DeepMRError(Exception):
    """Base class of every error a user can fix by changing their input."""


class InputError(DeepMRError, ValueError):
    """An input file, array or table is malformed; the message names it and the fault."""


class ModelOutputError(DeepMRError, ValueError):
    """A model returned predictions of the wrong shape or non-finite values."""


class StoreError(DeepMRError):
    """A run store is missing, incomplete, or was made by a different run."""
