"""Per-locus Mendelian randomization kernels, vectorised over loci.

Each estimator follows the R package MendelianRandomization (v0.10 defaults) and
runs on a whole batch of loci at once: inputs are ``(n_loci, max_k)`` arrays
padded with NaN, outputs are :class:`MRResult` records of ``(n_loci,)`` arrays.
Where an estimator is undefined for a locus the numbers are NaN and ``reason``
holds a code from :data:`REASONS`; a batch never fails because of one locus.

>>> from deepmr_dist.mr import estimate
>>> res = estimate(bx, bxse, by, byse, methods=("ivw", "egger"))  # doctest: +SKIP
>>> res["egger"].to_frame("egger")  # doctest: +SKIP

Modules: :mod:`.ivw`, :mod:`.egger`, :mod:`.robust` (MM / lmrob), :mod:`.median`,
:mod:`.mode` (mbe), :mod:`.baseline` (mean Wald ratio), :mod:`.inference`
(confidence limits and p-values), :mod:`.scaling` (unit rescaling at extreme magnitudes),
:mod:`.result`, :mod:`.api`.
"""

from deepmr_dist.mr.api import BOOTSTRAP_METHODS, METHODS, check_methods, estimate
from deepmr_dist.mr.result import NOTES, REASONS, MRResult

__all__ = ["BOOTSTRAP_METHODS", "METHODS", "NOTES", "REASONS", "MRResult", "check_methods", "estimate"]
