"""How one simulation member is trained: the settings alone, without torch, so that configs validate without it.

:mod:`deepmr_dist.simulation.training` trains with them; its module docstring gives the reasons for
the defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from deepmr_dist.errors import InputError

CYCLE_RISE = 0.3
"""Share of a one-cycle's steps spent rising to the peak (torch's ``OneCycleLR`` ``pct_start``)."""
_CYCLE_START_DIVISOR = 25.0  # a cycle starts at peak / 25 (OneCycleLR div_factor) ...
_CYCLE_END_DIVISOR = 25.0 * 1e4  # ... and ends at peak / 2.5e5 (div_factor * final_div_factor)


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation settings of one member.

    The defaults deviate from the paper as the module docstring explains;
    :meth:`paper` returns the paper's settings.

    Attributes
    ----------
    epochs
        Most epochs to run.
    batch_size
        Sequences per Adam step.
    learning_rate
        Adam's learning rate: the constant rate, or the peak of the one-cycle
        schedule with ``one_cycle``.
    validation_fraction
        Share of the sequences held out for the validation loss.
    patience
        Epochs without a lower validation loss before training stops. With
        ``one_cycle``, the epochs of the rising phase (the first 30 %) do not
        count: the validation loss is expected to rise with the rate there.
    one_cycle
        Run the one-cycle learning-rate schedule over ``epochs`` (see
        :meth:`learning_rate_at`); ``False`` keeps ``learning_rate`` constant.
    standardize
        Train on per-task standardised targets and fold the scaling into the
        last layer afterwards (the saved weights predict labels either way).
    """

    epochs: int = 30
    batch_size: int = 200
    learning_rate: float = 0.05
    validation_fraction: float = 0.15
    patience: int = 10
    one_cycle: bool = True
    standardize: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.learning_rate <= 0:
            raise InputError(f"invalid training settings {self}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise InputError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")

    @classmethod
    def paper(cls) -> TrainingSettings:
        """The paper's settings: raw targets, batch 1000, constant Adam rate 0.001, up to 100 epochs."""
        return cls(epochs=100, batch_size=1000, learning_rate=1e-3, one_cycle=False, standardize=False)

    def learning_rate_at(self, step: int, steps_per_epoch: int) -> float:
        """Adam's learning rate for 0-based optimiser step ``step``.

        With ``one_cycle``, the rate rises on a half cosine from
        ``learning_rate / 25`` to ``learning_rate`` over the first 30 % of the
        ``epochs * steps_per_epoch`` steps and falls on a half cosine to
        ``learning_rate / 2.5e5`` at the last step (torch's ``OneCycleLR``
        defaults, without its momentum cycling).
        """
        if not self.one_cycle:
            return self.learning_rate
        total = self.epochs * steps_per_epoch
        rise = max(1, round(CYCLE_RISE * total))
        if step < rise:
            start, end, fraction = self.learning_rate / _CYCLE_START_DIVISOR, self.learning_rate, step / rise
        else:
            start, end = self.learning_rate, self.learning_rate / _CYCLE_END_DIVISOR
            fraction = (step - rise) / max(1, total - 1 - rise)
        return end + (start - end) * (1.0 + math.cos(math.pi * fraction)) / 2.0
