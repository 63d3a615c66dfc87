"""Names of the transforms an output head applies to raw model outputs (torch-free, for config validation).

:class:`deepmr_dist.models.heads.OutputHead` applies them.
"""

TRANSFORMS: tuple[str, ...] = ("none", "sigmoid", "log1p")
"""``none``, ``sigmoid`` (logits to probabilities) and ``log1p`` (counts to log scale)."""
