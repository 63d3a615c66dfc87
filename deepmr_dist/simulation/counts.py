"""Expected read counts of the exposure and outcome assays, and the label transform.

``c_exp = 1 + alpha q_exp + eta q_conf + tau z`` and
``c_out = 1 + alpha gamma q_exp q_out + nu q_conf + tau z`` (the paper's
Methods). The true causal effect of the exposure on the outcome is carried by
gamma; eta, nu (sequence-dependent) and tau (sequence-independent) confound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CountParameters:
    """Coefficients of the expected-count model.

    Attributes
    ----------
    alpha
        Exposure signal per unit binding (per round, ~ N(100, 3)).
    gamma
        Causal effect scale of exposure binding on the outcome (per round).
    eta, nu
        Effect of confounder binding on exposure and on outcome.
    tau
        Effect of the sequence-independent confounder z on both.
    """

    alpha: float
    gamma: float
    eta: float = 20.0
    nu: float = 30.0
    tau: float = 25.0

    def unconfounded(self) -> CountParameters:
        """The same model with every confounding term switched off (the truth's oracle)."""
        return CountParameters(alpha=self.alpha, gamma=self.gamma, eta=0.0, nu=0.0, tau=0.0)


def expected_counts(
    q_exposure: np.ndarray,
    q_outcome: np.ndarray,
    q_confounder: np.ndarray | float,
    z: np.ndarray | float,
    params: CountParameters,
) -> np.ndarray:
    """Noise-free expected counts.

    Parameters
    ----------
    q_exposure, q_outcome, q_confounder
        Binding probabilities ``(n,)`` (``q_confounder`` 0 when no confounder TF).
    z
        Sequence-independent confounder, 0 or 1 per sequence.
    params
        Model coefficients.

    Returns
    -------
    numpy.ndarray
        ``(n, 2)`` float64 expected counts, columns exposure and outcome.
    """
    confounding = params.tau * np.asarray(z, dtype=np.float64)
    exposure = 1.0 + params.alpha * q_exposure + params.eta * q_confounder + confounding
    outcome = 1.0 + params.alpha * params.gamma * q_exposure * q_outcome + params.nu * q_confounder + confounding
    return np.stack(np.broadcast_arrays(exposure, outcome), axis=-1).astype(np.float64)


def anscombe(counts: np.ndarray) -> np.ndarray:
    """Variance-stabilizing Anscombe transform ``2 sqrt(y + 3/8)`` of Poisson counts."""
    return 2.0 * np.sqrt(np.asarray(counts, dtype=np.float64) + 0.375)
