"""Names of the transforms an output head applies to raw model outputs (torch-free, for config validation).

:class:`deepmr_dist.models.heads.OutputHead` applies them; :func:`check_transform`
is the one check of their names.
"""

from __future__ import annotations

from deepmr_dist.errors import check_name

__all__ = ["TRANSFORMS", "check_transform"]

TRANSFORMS: tuple[str, ...] = ("none", "sigmoid", "log1p")
"""``none``, ``sigmoid`` (logits to probabilities) and ``log1p`` (counts to log scale)."""


def check_transform(transform: str) -> str:
    """``transform`` if it is one of :data:`TRANSFORMS`, else an ``InputError`` listing them (the one check)."""
    return check_name(transform, TRANSFORMS, "transform")
