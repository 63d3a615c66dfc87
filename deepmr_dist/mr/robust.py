"""Robust IVW and robust MR-Egger: MM-estimation as ``robustbase::lmrob``.

The package calls ``lmrob(by ~ bx - 1, weights = byse^-2)`` (robust IVW) and
``lmrob(by ~ bx, weights = byse^-2)`` on oriented data (robust MR-Egger) with the
``lmrob.control()`` defaults: method "MM", bisquare psi, S-estimate with
``tuning.chi = 1.54764`` and ``bb = 0.5``, M-step with ``tuning.psi = 4.685061``,
covariance ``.vcov.avar1``. ``lmrob`` applies weights by scaling rows with
``sqrt(w)``, so the fits here run on ``X = x / byse``, ``y = by / byse``.

Definitions (bisquare, ``t = (u / c)^2``, ``v = max(1 - t, 0)``)::

    rho(u) = 1 - v^3            (normalised, rho(inf) = 1)
    psi(u) = u v^2              (robustbase's Mpsi)
    S-estimate:  (1 / (n - p)) sum rho_c1(r_i / s) = bb,  sum psi_c1(r_i / s) x_i = 0,
                 at the minimum of s over beta
    MM-estimate: sum psi_c2(r_i / s) x_i = 0 with s fixed at the S-scale

How this follows robustbase 0.95-0 (``src/lmrob.c``, ``R/lmrob.MM.R``):

* Iterations and stopping rules are robustbase's own
  (:mod:`deepmr_dist.mr._mm_per_locus`): every elemental candidate gets one
  ``refine_fast_s`` step from the MAD of its own residuals (``k.fast.s = 1``);
  the best one by M-scale is refined with ``refine.tol = 1e-7`` and
  ``k.max = 500``, the M-step iterates ``rwls`` with ``rel.tol = 1e-7`` and
  ``max.it = 50``, and ``.vcov.avar1`` uses the S residuals robustbase keeps
  (those before its last refinement step). A fit therefore lands on the iterate
  ``lmrob`` returns, not only on the fixed point it approximates; at small n the
  two differ by up to about 1e-4 relative in the standard error.
* The S-start: robustbase draws ``nResample = 500`` random elemental subsets
  and fully refines the best two. Where ``C(n, p) * n <= ELEMENTAL_BUDGET``
  (every pair up to n = 20 for Egger, every instrument up to n = 63 for IVW)
  this module offers every elemental subset instead. That is the limit of
  robustbase's search when its draws cover every subset, as 500 draws do for
  small n: the best subset is then drawn at least twice, fills both of its
  "best two" slots, and is the only one refined. There the result does not
  depend on a seed, and it equals ``lmrob``'s to round-off (checked against the
  committed R fixtures in ``tests/r/``).
* Larger loci get a deterministic, not a random, search: the median ratio (plus
  the median intercept, and intercept 0, for Egger), least squares, and
  ``ELEMENTAL_RANDOM_BUDGET // n`` elemental subsets from a fixed pseudo-random
  sequence (none above n = 50). ``lmrob`` itself depends on its seed there (by
  about 1e-8 to 1e-6 relative when its candidates share one basin, by more when
  clusters of instruments compete), so no deterministic search can reproduce
  it; :attr:`MMFit.sampled` marks these loci and the estimators report them
  with the note ``sampled_s_start``. With every subset offered
  (``elemental_budget``) the fits equal ``lmrob``'s with enough draws to be
  seed-independent, which shows that the search is the only difference.
* Loci are fitted one at a time inside compiled loops (the S- and M-iterations
  and the candidate comparison); the steps that are cheapest as numpy over a
  chunk of loci (medians, least squares, the covariance) stay numpy. There is
  no Python loop over loci.

Implementation notes. Every step of an S- or M-fit needs residuals, bisquare
weights and weighted sums over the instruments of a locus: one fused loop
(:mod:`deepmr_dist.mr._bisquare`, numba) instead of about ten numpy passes. The
iterations and the fast-S candidate comparison run one locus at a time in
:mod:`deepmr_dist.mr._mm_per_locus` (numba): a locus's instruments stay in cache
across its iterations and there is no per-iteration Python work, which had been
half the time of the same logic written as numpy over all loci of a chunk.
Starting values (median ratio, median intercept, MAD, least squares) and the
``.vcov.avar1`` covariance are numpy over all loci of a chunk, with fused loops
for the per-instrument parts. Per-instrument arrays live in a per-thread
:class:`_Workspace` allocated once and reused by every chunk (fresh temporaries
of this size cost page faults). ``sum psi'(u) x x'`` follows from the sums with
weights ``v`` and ``v^2`` (``psi'(u) = 5 v^2 - 4 v``); the joint Newton step on
``(beta, s)`` eliminates ``s`` and solves a ``p x p`` system in closed form.
Only the design (``x``, ``y``) of a chunk is built from the inputs, inside its
worker.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable

import numpy as np

from deepmr_dist.errors import InputError
from deepmr_dist.mr import _mm_per_locus as mm_per_locus
from deepmr_dist.mr._bisquare import (
    abs_resid,
    avar1_sums,
    design_sums,
    egger_design,
    intercepts,
    n_sums,
    ratios,
)
from deepmr_dist.mr._data import (
    MRData,
    chi2_sf,
    chunk_bounds,
    median_inplace,
    run_chunks,
)
from deepmr_dist.mr.egger import i2_gx
from deepmr_dist.mr.inference import store_egger, store_wald
from deepmr_dist.mr.ivw import random_effects_mask
from deepmr_dist.mr.result import MRResult, ResultBuilder

C_CHI = 1.54764
"""``lmrob.control()$tuning.chi`` for the bisquare S-estimator."""
C_PSI = 4.685061
"""``lmrob.control()$tuning.psi`` for the bisquare M-step (95% efficiency)."""
BB = 0.5
"""``lmrob.control()$bb``: the S-estimator's breakdown point."""
EXACT_TOL = 1e-10
"""robustbase's EPS_SCALE: residuals below it count as exactly fitted."""
SINGULAR_TOL = 1e-7
"""robustbase's solve.tol, used for rank deficiency of the design."""
REFINE_TOL = 1e-7
"""``lmrob.control()$refine.tol``: the S refinement stops at this relative step (Euclidean norm)."""
REL_TOL = 1e-7
"""``lmrob.control()$rel.tol``: the M-step stops at this relative step (L1 norm)."""
SCALE_TOL = 1e-10
"""``lmrob.control()$scale.tol``: relative tolerance of the M-scale."""
K_MAX = 500
"""S refinement steps at most (the package passes ``k.max = 500``)."""
MAXIT_SCALE = 500
"""Iterations of the M-scale at most (the package passes ``maxit.scale = 500``)."""
MAX_IT = 50
"""``lmrob.control()$max.it``: the M-step takes at most ``MAX_IT - 1`` steps, as robustbase counts."""
NEWTON_SWITCH = 1e-2
"""Sampled loci: relative IRWLS step below which Newton steps take over."""
TOL = 1e-10
"""Sampled loci: relative IRWLS step size at which a fit counts as converged."""
TOL_NEWTON = 1e-8
"""Sampled loci: relative Newton step size at which a fit counts as converged (the step just
taken leaves an error of order its square, far below :data:`TOL`)."""
MAX_ITER = 500
"""Sampled loci: iteration limit of each stage."""
ELEMENTAL_BUDGET = 4000
"""Exhaustive elemental search while (number of subsets) x (instruments) stays below this."""
ELEMENTAL_RANDOM_BUDGET = 500
"""Otherwise ``ELEMENTAL_RANDOM_BUDGET // n`` fixed pseudo-random elemental subsets ..."""
ELEMENTAL_MIN = 10
"""... or none when that is fewer than this (large loci rely on the LS and median starts)."""
CHUNK_ELEMENTS = 200_000
"""Target loci x instruments per chunk (the workspace of one thread is about 7 times
this many doubles, 11 MB; smaller chunks cost more numpy calls per locus)."""


@dataclasses.dataclass(frozen=True)
class MMFit:
    """MM-regression fits for a batch of loci (transformed, sqrt-weighted scale).

    Attributes
    ----------
    coef : numpy.ndarray
        ``(n_loci, p)`` MM coefficients.
    coef_s : numpy.ndarray
        ``(n_loci, p)`` coefficients of the initial S-estimate.
    cov : numpy.ndarray
        ``(n_loci, p, p)`` ``.vcov.avar1`` covariance (before the package's rse flooring).
    scale : numpy.ndarray
        ``(n_loci,)`` S-estimate of scale (``summary(fit)$sigma``).
    rss : numpy.ndarray
        ``(n_loci,)`` sum of squared residuals at ``coef`` (NaN where not fitted).
    converged, exact, singular : numpy.ndarray
        ``(n_loci,)`` bool flags: iterations converged; exact fit (scale 0);
        rank-deficient design (no fit attempted).
    sampled : numpy.ndarray
        ``(n_loci,)`` bool: the S-start searched a deterministic sample of
        candidates, not every elemental subset, so ``lmrob`` (whose random search
        depends on its seed there) may land elsewhere.
    """

    coef: np.ndarray
    coef_s: np.ndarray
    cov: np.ndarray
    scale: np.ndarray
    rss: np.ndarray
    converged: np.ndarray
    exact: np.ndarray
    singular: np.ndarray
    sampled: np.ndarray

    @classmethod
    def blank(cls, n_loci: int, p: int) -> MMFit:
        """A fit of ``n_loci`` loci with nothing fitted: NaN numbers, False flags."""
        return cls(
            coef=np.full((n_loci, p), np.nan), coef_s=np.full((n_loci, p), np.nan),
            cov=np.full((n_loci, p, p), np.nan), scale=np.full(n_loci, np.nan), rss=np.full(n_loci, np.nan),
            converged=np.zeros(n_loci, dtype=bool), exact=np.zeros(n_loci, dtype=bool),
            singular=np.zeros(n_loci, dtype=bool), sampled=np.zeros(n_loci, dtype=bool),
        )  # fmt: skip


# ----------------------------------------------------------------------------- small linear algebra (p = 1 or 2)
#
# Weighted sums come as flat rows ``(m, q + p)``: the upper triangle of
# ``sum w x x'`` (``q = p (p + 1) / 2`` entries, row-major), then ``sum w x y``.

_SYM = {1: np.array([[0]]), 2: np.array([[0, 1], [1, 2]])}
"""Flat upper-triangle index -> full symmetric matrix index."""


def _solve(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched solve of 1x1 or 2x2 systems ``a x = b`` in closed form; NaN rows where singular."""
    if b.shape[1] == 1:
        return b / a[:, 0, :]
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    out = np.empty(b.shape)
    out[:, 0] = (a[:, 1, 1] * b[:, 0] - a[:, 0, 1] * b[:, 1]) / det
    out[:, 1] = (a[:, 0, 0] * b[:, 1] - a[:, 1, 0] * b[:, 0]) / det
    return out


def _inv(a: np.ndarray) -> np.ndarray:
    """Batched inverse of 1x1 or 2x2 matrices (NaN where singular)."""
    if a.shape[1] == 1:
        return 1.0 / a
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    out = np.empty_like(a)
    out[:, 0, 0] = a[:, 1, 1] / det
    out[:, 1, 1] = a[:, 0, 0] / det
    out[:, 0, 1] = -a[:, 0, 1] / det
    out[:, 1, 0] = -a[:, 1, 0] / det
    return out


def _mv(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Batched matrix-vector products ``a b`` of ``(m, p, p)`` and ``(m, p)``."""
    return np.matmul(a, b[:, :, None])[:, :, 0]


def _posdefify(v: np.ndarray) -> np.ndarray:
    """``.vcov.avar1``'s "posdefify": zero negative eigenvalues, restore the diagonal."""
    out = v.copy()
    finite = np.isfinite(v).all(axis=(1, 2))
    if not finite.any():
        return out
    vals, vecs = np.linalg.eigh(np.where(finite[:, None, None], v, np.eye(v.shape[1])))
    neg = finite & (vals < 0).any(axis=1)
    if not neg.any():
        return out
    lam = np.maximum(vals[neg], 0.0)
    q = vecs[neg]
    fixed = np.einsum("mij,mj,mkj->mik", q, lam, q)
    o_diag = np.diagonal(v[neg], axis1=1, axis2=2)
    d = np.sqrt(np.maximum(o_diag, 0.0) / np.diagonal(fixed, axis1=1, axis2=2))
    out[neg] = d[:, :, None] * fixed * d[:, None, :]
    return out


# ----------------------------------------------------------------------------- one chunk of loci


class _Workspace:
    """Per-instrument arrays of one worker thread, reused by every chunk it fits.

    Parameters
    ----------
    rows : int
        Largest chunk (loci).
    p : int
        Design columns.
    k : int
        Instruments (padded width).
    """

    def __init__(self, rows: int, p: int, k: int) -> None:
        self.xy = np.empty((rows, p + 1, k))
        self.xy_sub = np.empty((rows, p + 1, k))
        self.scratch = np.empty((rows, k))


class _Chunk:
    """One chunk of loci (rows) in the sqrt-weighted scale.

    ``xy`` stacks the ``p`` design columns and the response, ``(m, p + 1, K)``.
    Unused entries hold 0: they add nothing to weighted sums and have zero residual
    (``rho = 0``); counts use ``n``. ``a`` is an ``(m, K)`` scratch view shared
    with every other chunk of the same workspace.
    """

    def __init__(self, xy: np.ndarray, valid: np.ndarray, n: np.ndarray, ws: _Workspace, compact: bool = False) -> None:
        self.xy, self.valid, self.ws, self.compact = xy, valid, ws, compact
        self.invalid = ~valid
        self.n = n
        self.nf = n.astype(np.float64)
        self.m, self.p = xy.shape[0], xy.shape[1] - 1
        self.q = self.p * (self.p + 1) // 2
        self.nz = n_sums(self.p)
        self.sym = _SYM[self.p]
        self.x = xy[:, : self.p]
        self.y = xy[:, self.p]
        self.target = BB * (self.nf - self.p)
        self.a = ws.scratch[: self.m]

    def subset(self, rows: np.ndarray) -> _Chunk:
        """The chunk restricted to ``rows``, copied into the workspace's compaction arrays.

        Subsets are always taken from the full chunk (a subset of a subset would
        overwrite its own source).
        """
        assert not self.compact, "subsets are taken from the full chunk"
        m = rows.size
        xy = np.take(self.xy, rows, axis=0, out=self.ws.xy_sub[:m], mode="clip")
        return _Chunk(xy, self.valid[rows], self.n[rows], self.ws, compact=True)


def _elemental_plan(n: np.ndarray, p: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Elemental subsets per row: ``(count per row, exhaustive per row)``.

    A row with ``C(n, p) <= budget / n`` gets all its elemental subsets
    (enumerated in colex order, so the first ``C(n, p)`` entries are exactly the
    subsets of ranks below n); larger rows get ``ELEMENTAL_RANDOM_BUDGET // n``
    subsets from a fixed pseudo-random sequence of rank fractions, or none when
    that is below :data:`ELEMENTAL_MIN`. The plan depends only on each row's own n.
    """
    n = np.asarray(n, dtype=np.int64)
    full = np.array([math.comb(int(k), p) for k in n], dtype=np.int64)
    exhaustive = full <= budget // np.maximum(n, 1)
    budget = ELEMENTAL_RANDOM_BUDGET // np.maximum(n, 1)
    count = np.where(exhaustive, full, np.where(budget >= ELEMENTAL_MIN, budget, 0))
    return count, exhaustive


def _colex(c: int, p: int) -> tuple[int, ...]:
    """The c-th p-subset of {0, 1, ...} in colex order."""
    if p == 1:
        return (c,)
    j = 1
    while math.comb(j + 1, 2) <= c:
        j += 1
    return (c - math.comb(j, 2), j)


def _elemental_ranks(c: int, n: np.ndarray, exhaustive: np.ndarray, p: int) -> np.ndarray:
    """Ranks (m, p) of candidate ``c`` for every row (exhaustive rows: colex; others: fixed sequence)."""
    ranks = np.empty((n.shape[0], p), dtype=np.int64)
    ranks[:] = _colex(c, p) if exhaustive.any() else 0
    if (~exhaustive).any():
        u = _SEQUENCE[c % _SEQUENCE.shape[0]]
        nn = np.maximum(n[~exhaustive], p)
        first = np.minimum((u[0] * nn).astype(np.int64), nn - 1)
        if p == 1:
            ranks[~exhaustive, 0] = first
        else:
            second = np.minimum((u[1] * (nn - 1)).astype(np.int64), nn - 2)
            second = second + (second >= first)
            ranks[~exhaustive, 0] = np.minimum(first, second)
            ranks[~exhaustive, 1] = np.maximum(first, second)
    return ranks


_SEQUENCE = np.random.default_rng(20240917).random((4096, 2))
"""Fixed pseudo-random rank fractions for non-exhaustive elemental subsets."""


def _base_candidates(ch: _Chunk, xx: np.ndarray, xy: np.ndarray) -> list[np.ndarray]:
    """Median-based and least-squares starting coefficients (median-based first).

    ``xx``, ``xy`` are the unweighted sums ``sum x x'`` and ``sum x y``.
    """
    least_squares = _solve(xx, xy)
    slope = np.nan_to_num(median_inplace(ch.a, ratios(ch.xy, ch.valid, ch.a)))
    if ch.p == 1:
        return [slope[:, None], least_squares]
    intercepts(ch.xy, ch.valid, slope, ch.a)
    icpt = np.nan_to_num(median_inplace(ch.a, ch.n))
    return [np.stack([icpt, slope], axis=1), np.stack([np.zeros_like(slope), slope], axis=1), least_squares]


def _s_start(
    ch: _Chunk, ok: np.ndarray, xx: np.ndarray, xy: np.ndarray, budget: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Best S candidate per row (smallest M-scale): beta, scale, exact-fit flag, sampled-search flag.

    Rows whose elemental subsets fit the ``budget`` are offered every subset,
    nothing else (robustbase's search in the limit of many draws); the others
    are offered the median and least-squares starts and a fixed sample of
    subsets. A candidate gets one ``refine_fast_s`` step from the MAD of its
    own residuals (sampled rows, once they have a best candidate: from the best
    scale so far) and is compared with the best so far
    (:func:`deepmr_dist.mr._mm_per_locus.offer_candidates`).
    """
    m, p = ch.m, ch.p
    best_beta = np.zeros((m, p))
    best_s = np.full(m, np.inf)
    exact = np.zeros(m, dtype=bool)
    count, exhaustive = _elemental_plan(ch.n, p, budget)
    sampled = ok & ~exhaustive

    def offer(rows: np.ndarray, beta: np.ndarray, mad: np.ndarray | None = None) -> None:
        """Offer candidates ``beta`` of chunk ``rows`` (``mad``: their residuals' MAD where known)."""
        mm_per_locus.offer_candidates(
            ch.xy, ch.valid, rows, beta, mad, sampled, ch.n, ch.target, best_beta, best_s, exact,
            c=C_CHI, exact_tol=EXACT_TOL, tol=SCALE_TOL, max_iter=MAXIT_SCALE,
        )  # fmt: skip

    if sampled.any():
        rows = np.flatnonzero(sampled)
        for j, beta in enumerate(_base_candidates(ch, xx, xy)):
            if j == 0:  # the first one's MAD by numpy's partition, over the whole chunk
                abs_resid(ch.xy, ch.valid, np.where(np.isfinite(beta), beta, 0.0), ch.a)
                offer(rows, beta[rows], mm_per_locus.MAD_CONSTANT * median_inplace(ch.a, ch.n)[rows])
            else:
                offer(rows, beta[rows])
    if count.max(initial=0) > 0:
        order = np.argsort(ch.invalid, axis=1, kind="stable")  # used entries first, in order
        cols = np.arange(p)[None, :, None]
        for c in range(int(count.max())):
            sel = np.flatnonzero((count > c) & ok & ~exact)
            if sel.size == 0:
                continue
            ranks = _elemental_ranks(c, ch.n[sel], exhaustive[sel], p)
            pos = np.take_along_axis(order[sel], ranks, axis=1)  # (ms, p) instrument positions
            xs = ch.x[sel[:, None, None], cols, pos[:, None, :]]  # (ms, p, p): xs[:, i, j] = x_i at pos j
            ys = ch.y[sel[:, None], pos]
            beta = _solve(np.transpose(xs, (0, 2, 1)), ys)
            usable = np.isfinite(beta).all(axis=1)
            if p == 2:
                det = xs[:, 0, 0] * xs[:, 1, 1] - xs[:, 0, 1] * xs[:, 1, 0]
                usable &= np.abs(det) > SINGULAR_TOL * np.abs(xs).max(axis=(1, 2)) ** 2
            if usable.any():
                offer(sel[usable], beta[usable])
    return best_beta, best_s, exact, sampled


def _vcov_avar1(ch: _Chunk, beta: np.ndarray, beta_s: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """robustbase's ``.vcov.avar1`` per row (negative eigenvalues posdefified) and the RSS at ``beta``.

    ``beta_s`` gives the S residuals ``r0`` (robustbase's ``init.S$residuals``).
    """
    p, n, sym, q, nz = ch.p, ch.nf, ch.sym, ch.q, ch.nz
    sums = avar1_sums(ch.xy, beta, beta_s, s, C_PSI, C_CHI)
    sums_d = sums[:, :nz]  # weights psi'(r / s)
    x_psi2_x = sums[:, nz : nz + q][:, sym]
    xww = sums[:, nz + q : nz + q + p]  # sum x psi(r / s) chi(r0 / s)
    rss = sums[:, -3] * s * s
    mean_dchi = 6.0 * sums[:, -2] / n  # mean(chi'(r0/s) r0/s) with chi' = (6/c^2) u v^2
    mean_chi2 = sums[:, -1] / n
    xwx = sums_d[:, sym]
    # sum x psi'(r/s) r/s = (sum psi' x y - sum psi' x x' beta) / s
    num = (sums_d[:, q:] - _mv(xwx, beta)) / s[:, None]
    a_mat = _inv(xwx) * s[:, None, None]
    a = _mv(a_mat, num) / mean_dchi[:, None]
    axww = _mv(a_mat, xww)
    u1 = np.matmul(np.matmul(a_mat, x_psi2_x), a_mat) * n[:, None, None]
    u2 = a[:, :, None] * axww[:, None, :]
    u3 = axww[:, :, None] * a[:, None, :]
    u4 = (mean_chi2 - BB * BB)[:, None, None] * a[:, :, None] * a[:, None, :]
    cov = (u1 - u2 - u3 + u4) / n[:, None, None]
    if p == 1:
        return np.where(cov < 0, np.nan, cov), rss
    return _posdefify(cov), rss


def _fixed_point(
    ch: _Chunk, live: np.ndarray, beta: np.ndarray, s: np.ndarray, m_step: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """S- (``m_step`` False) or M-iterations of the ``live`` rows to their fixed point: beta, s, converged.

    For rows with a sampled S-start (:func:`deepmr_dist.mr._mm_per_locus.iterate`);
    the M-iterations try Newton from the first step (they start at the S-estimate,
    close to the M-estimate).
    """
    return mm_per_locus.iterate(
        ch.xy, beta, s, live, ch.target, c=C_PSI if m_step else C_CHI, m_step=m_step, start_newton=m_step,
        switch=NEWTON_SWITCH, tol=TOL, tol_newton=TOL_NEWTON, max_iter=MAX_ITER,
    )  # fmt: skip


def _s_estimate(ch: _Chunk, ok: np.ndarray, xx: np.ndarray, xy: np.ndarray, budget: int) -> tuple[np.ndarray, ...]:
    """S-estimate per row: beta, the beta of its residuals, scale, exact, converged and sampled flags.

    Rows offered every elemental subset are refined as robustbase does (its S
    residuals are those before its last step); sampled rows go to the fixed point.
    """
    beta0, s0, exact, sampled = _s_start(ch, ok, xx, xy, budget)
    go = ok & ~exact & np.isfinite(s0) & (s0 > 0)
    start = np.where(go, s0, 1.0)
    beta, scale, beta_resid, conv = mm_per_locus.refine_s(
        ch.xy, beta0, start, go & ~sampled, ch.target, c=C_CHI, tol=REFINE_TOL, max_iter=K_MAX
    )
    if (go & sampled).any():
        fp_beta, fp_scale, fp_conv = _fixed_point(ch, go & sampled, beta0, start, m_step=False)
        beta, beta_resid = np.where(sampled[:, None], fp_beta, beta), np.where(sampled[:, None], fp_beta, beta_resid)
        scale, conv = np.where(sampled, fp_scale, scale), np.where(sampled, fp_conv, conv)
    beta = np.where(exact[:, None], beta0, beta)
    scale = np.where(exact, 0.0, np.where(ok, scale, np.nan))
    return beta, beta_resid, scale, exact, conv | exact, sampled


def _fit_chunk(ch: _Chunk, budget: int) -> MMFit:
    """MM fit of one chunk (elemental search ``budget`` as :func:`lmrob_mm`)."""
    m, p = ch.m, ch.p
    out = MMFit.blank(m, p)

    # unweighted sums: rank check of the (sqrt-weighted) design, as lmrob's
    # .lm.fit(tol = solve.tol), and the least-squares start
    sums = design_sums(ch.xy)
    xx, xy = sums[:, ch.sym], sums[:, ch.q :]
    if p == 1:
        singular = ~(xx[:, 0, 0] > 0)
    else:
        resid = xx[:, 1, 1] - xx[:, 0, 1] ** 2 / xx[:, 0, 0]
        singular = ~(xx[:, 0, 0] > 0) | ~(resid > SINGULAR_TOL**2 * xx[:, 1, 1])
    ok = ~singular & (ch.n > p)

    beta_s, beta_r0, s, exact, s_conv, sampled = _s_estimate(ch, ok, xx, xy, budget)
    live = ok & ~exact
    s_ok = live & s_conv & np.isfinite(s) & (s > 0)
    s_fixed = np.where(s_ok, s, 1.0)
    beta, m_conv = mm_per_locus.rwls(ch.xy, beta_s, s_fixed, s_ok & ~sampled, c=C_PSI, tol=REL_TOL, max_it=MAX_IT)
    if (s_ok & sampled).any():
        fp_beta, _, fp_conv = _fixed_point(ch, s_ok & sampled, beta_s, s_fixed, m_step=True)
        beta, m_conv = np.where(sampled[:, None], fp_beta, beta), np.where(sampled, fp_conv, m_conv)
    fitted = s_ok & m_conv
    if fitted.any():
        rows = np.flatnonzero(fitted)
        sub = ch if rows.size == m else ch.subset(rows)
        out.cov[rows], out.rss[rows] = _vcov_avar1(sub, beta[rows], beta_r0[rows], s[rows])
    out.coef[fitted] = beta[fitted]
    out.coef_s[fitted] = beta_s[fitted]
    out.scale[fitted] = s[fitted]
    out.coef[exact] = beta_s[exact]
    out.coef_s[exact] = beta_s[exact]
    out.scale[exact] = 0.0
    out.cov[exact] = 0.0
    out.converged[:] = (fitted | exact) & ok
    out.exact[:] = exact & ok
    out.singular[:] = singular
    out.sampled[:] = sampled & ok
    return out


def _fit(
    fill: Callable[[int, int, np.ndarray], None],
    valid: np.ndarray,
    n: np.ndarray,
    p: int,
    threads: int,
    budget: int = ELEMENTAL_BUDGET,
) -> MMFit:
    """MM fits of all loci, chunk by chunk; ``fill(lo, hi, xy)`` writes the design of loci ``lo:hi``.

    ``xy`` is ``(hi - lo, p + 1, K)``: the ``p`` design columns, then the response,
    with 0 at unused entries. Floating-point warnings are silenced inside the
    workers: undefined rows come out as NaN and are flagged by the callers.
    """
    n_loci, k = valid.shape
    # at least one chunk per thread; larger chunks mean fewer numpy calls per locus
    bounds = chunk_bounds(n_loci, min(CHUNK_ELEMENTS // max(k, 1), -(-n_loci // threads)))
    rows = max((hi - lo for lo, hi in bounds), default=0)
    fit = MMFit.blank(n_loci, p)
    local = threading.local()

    def work(b: tuple[int, int]) -> None:
        lo, hi = b
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = _Workspace(rows, p, k)
        with np.errstate(all="ignore"):
            xy = ws.xy[: hi - lo]
            fill(lo, hi, xy)
            part = _fit_chunk(_Chunk(xy, valid[lo:hi], n[lo:hi], ws), budget)
        for field in dataclasses.fields(MMFit):
            getattr(fit, field.name)[lo:hi] = getattr(part, field.name)

    run_chunks(work, bounds, threads)
    return fit


def lmrob_mm(
    xt: np.ndarray,
    y: np.ndarray,
    valid: np.ndarray,
    n: np.ndarray,
    *,
    threads: int = 1,
    elemental_budget: int = ELEMENTAL_BUDGET,
) -> MMFit:
    """MM regression of ``y`` on ``x`` per locus, as ``lmrob(y ~ x - 1)`` with default control.

    Parameters
    ----------
    xt : numpy.ndarray
        ``(n_loci, p, max_k)`` design, transposed (already multiplied by
        ``sqrt(weights)``), ``p`` = 1 or 2; unused entries are ignored.
    y : numpy.ndarray
        ``(n_loci, max_k)`` response (times ``sqrt(weights)``).
    valid : numpy.ndarray
        ``(n_loci, max_k)`` bool mask of used instruments.
    n : numpy.ndarray
        ``(n_loci,)`` used instruments per locus.
    threads : int
        Worker threads over chunks of loci (numpy releases the GIL).
    elemental_budget : int
        Loci with ``C(n, p) * n`` at most this are offered every elemental subset
        in the S-start (see the module docstring); larger loci a fixed sample.

    Returns
    -------
    MMFit

    Raises
    ------
    InputError
        If the shapes do not match or ``p`` is not 1 or 2.
    """
    xt = np.asarray(xt, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    n = np.asarray(n, dtype=np.int64)
    if xt.ndim != 3 or xt.shape[1] not in (1, 2) or y.shape != valid.shape or xt.shape[::2] != y.shape:
        raise InputError(
            f"lmrob_mm needs xt of shape (n_loci, p, max_k) with p = 1 or 2 and y, valid of shape "
            f"(n_loci, max_k); got xt {xt.shape}, y {y.shape}, valid {valid.shape}"
        )
    if n.shape != y.shape[:1]:
        raise InputError(f"n must have shape ({y.shape[0]},), got {n.shape}")
    p = xt.shape[1]

    def fill(lo: int, hi: int, xy: np.ndarray) -> None:
        xy.fill(0.0)
        np.copyto(xy[:, :p], xt[lo:hi], where=valid[lo:hi, None, :])
        np.copyto(xy[:, p], y[lo:hi], where=valid[lo:hi])

    return _fit(fill, valid, n, p, threads, elemental_budget)


# ----------------------------------------------------------------------------- package-level estimators


def robust_ivw(
    data: MRData, *, model: str = "default", alpha: float = 0.05, t_dist: bool = False, threads: int = 1
) -> MRResult:
    """Robust IVW (``mr_ivw(robust = TRUE)``) per locus.

    Standard error: ``coef_se / min(1, sigma)`` for the random-effects model and
    ``coef_se / sigma`` for the fixed-effect model (``model = "default"``: fixed
    below four instruments); a single instrument gives the ratio estimate
    ``by / bx`` with se ``byse / |bx|``. ``q = (n - 1) sigma^2`` as the package.

    Parameters
    ----------
    data : MRData
    model : {"default", "fixed", "random"}
    alpha : float
    t_dist : bool
        t distribution with n - 1 degrees of freedom.
    threads : int
        Worker threads for the MM fits.

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())

    def fill(lo: int, hi: int, xy: np.ndarray) -> None:
        # x = bx / byse, y = by / byse (unused entries: bx = by = 0)
        inv = np.divide(1.0, data.byse[lo:hi], out=xy[:, 1])
        np.multiply(data.bx[lo:hi], inv, out=xy[:, 0])
        np.multiply(data.by[lo:hi], inv, out=xy[:, 1])

    fit = _fit(fill, data.valid, data.n, 1, threads)
    est = fit.coef[:, 0]
    coef_se = np.sqrt(fit.cov[:, 0, 0])
    sigma = fit.scale
    random = random_effects_mask(model, data.n)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(random, coef_se / np.minimum(sigma, 1.0), coef_se / sigma)
    single = data.n == 1
    if single.any():
        with np.errstate(invalid="ignore", divide="ignore"):
            bx1 = np.where(data.valid[single], data.bx[single], 0.0).sum(axis=1)
            by1 = np.where(data.valid[single], data.by[single], 0.0).sum(axis=1)
            se1 = np.where(data.valid[single], data.byse[single], 0.0).sum(axis=1) / np.abs(bx1)
            est[single] = by1 / bx1
        se[single] = se1
        sigma = np.where(single, 1.0, sigma)
    store_wald(out, est, se, alpha, t_dist, data.n - 1)
    out["rse"] = sigma
    q = np.where(data.n >= 2, (data.n - 1) * sigma**2, np.nan)
    out["q"] = q
    out["q_pvalue"] = chi2_sf(q, data.n - 1)
    multi = data.n >= 2
    out.flag(data.n < 1, "too_few_instruments")
    out.flag(data.all_bx_zero(), "all_bx_zero")
    out.flag(multi & fit.singular, "singular_fit")
    out.flag(multi & fit.exact, "exact_fit")
    out.flag(multi & ~fit.converged, "no_convergence")
    out.annotate(multi & fit.sampled, "sampled_s_start")
    return out.build()


def robust_egger(data: MRData, *, alpha: float = 0.05, t_dist: bool = False, threads: int = 1) -> MRResult:
    """Robust MR-Egger (``mr_egger(robust = TRUE)``) per locus.

    MM fit of the oriented ``by ~ 1 + bx`` with weights ``byse^-2``; standard
    errors ``coef_se / min(1, sigma)``; inference as MR-Egger (``egger.bounds``);
    ``q`` is the weighted residual sum of squares (n - 2 df). Needs three instruments.

    Parameters
    ----------
    data : MRData
    alpha : float
    t_dist : bool
    threads : int

    Returns
    -------
    MRResult
    """
    out = ResultBuilder(data.n, data.fstat())

    def fill(lo: int, hi: int, xy: np.ndarray) -> None:
        # oriented (|bx|, sign(bx) by) times sqrt(w) = 1 / byse, with an intercept column
        egger_design(data.bx[lo:hi], data.by[lo:hi], data.byse[lo:hi], data.valid[lo:hi], xy)

    # rows with fewer than three instruments are not fitted (n <= p) and flagged below
    fit = _fit(fill, data.valid, data.n, 2, threads)
    sigma = fit.scale
    with np.errstate(invalid="ignore", divide="ignore"):
        floor = np.minimum(sigma, 1.0)
        se_b = np.sqrt(fit.cov[:, 1, 1]) / floor
        se_a = np.sqrt(fit.cov[:, 0, 0]) / floor
    df = data.n - 2
    store_egger(out, fit.coef[:, 1], se_b, fit.coef[:, 0], se_a, sigma, df, alpha, t_dist)
    out["q"] = fit.rss
    out["q_pvalue"] = chi2_sf(fit.rss, df)
    out["i2gx"] = i2_gx(data)
    out.flag(data.n < 3, "too_few_instruments")
    out.flag(data.all_bx_zero(), "all_bx_zero")
    out.flag(fit.singular, "singular_fit")
    out.flag(fit.exact, "exact_fit")
    out.flag(~fit.converged, "no_convergence")
    out.annotate(fit.sampled, "sampled_s_start")
    return out.build()
