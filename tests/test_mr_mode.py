"""Mode-based estimate against a plain port of R's density(), the vignette and a plain bootstrap."""

from __future__ import annotations

import numpy as np
from scipy import stats

from deepmr_dist.mr import estimate
from deepmr_dist.mr._data import column_normals

from helpers_mr import simulate
from mr_reference_data import CHD, CHDSE, LDLC, LDLCSE


def _r_mad(x):
    return 1.4826 * np.median(np.abs(x - np.median(x)))


def _r_density_mode(x, w, bw, n=512):
    """R's density.default (gaussian, cut = 3, weights) and the grid maximiser, for one sample."""
    frm, to = x.min() - 3 * bw, x.max() + 3 * bw
    lo, up = frm - 4 * bw, to + 4 * bw
    y = np.zeros(2 * n)
    xdelta = (up - lo) / (n - 1)
    for xi, wi in zip(x, w, strict=True):
        xpos = (xi - lo) / xdelta
        ix = int(np.floor(xpos))
        fx = xpos - ix
        if 0 <= ix <= n - 2:
            y[ix] += wi * (1 - fx)
            y[ix + 1] += wi * fx
    kords = np.linspace(0.0, 2 * (up - lo), 2 * n)
    kords[n + 1 :] = -kords[n - 1 : 0 : -1]
    kords = stats.norm.pdf(kords, scale=bw)
    dens = np.maximum(np.fft.ifft(np.fft.fft(y) * np.conj(np.fft.fft(kords))).real[:n], 0.0)
    xords = np.linspace(lo, up, n)
    grid = np.linspace(frm, to, n)
    return grid[np.argmax(np.interp(grid, xords, dens))]


def _plain_mbe(bx, bxse, by, byse):
    b = by / bx
    se = np.sqrt(byse**2 / bx**2 + by**2 * bxse**2 / bx**4)
    w = se**-2 / np.sum(se**-2)
    bw = 0.9 * min(np.std(b, ddof=1), _r_mad(b)) / len(b) ** 0.2
    return b, se, w, bw


def _two_modes(rng, bx, byse):
    by = 0.4 * bx + rng.normal(0.0, 1.0, bx.shape) * byse
    by[:, :3] += 0.3  # a second mode
    return by


def _simulate(seed: int, n_loci: int = 12, max_k: int = 30, min_k: int = 3):
    return simulate(seed, n_loci, max_k, min_k, _two_modes)


def test_mbe__matches_plain_r_density_port():
    bx, bxse, by, byse, k = _simulate(41)
    r = estimate(bx, bxse, by, byse, methods=("mbe",), n_boot=10)["mbe"]
    for i in range(bx.shape[0]):
        b, _, w, bw = _plain_mbe(bx[i, : k[i]], bxse[i, : k[i]], by[i, : k[i]], byse[i, : k[i]])
        expected = _r_density_mode(b, w, bw)
        assert abs(r.estimate[i] - expected) <= 1e-10 * max(1.0, abs(expected))


def test_mbe__bootstrap_se_is_mad_of_plain_replicates():
    bx, bxse, by, byse, k = _simulate(42, n_loci=3, max_k=10)
    n_boot, seed = 25, 5
    r = estimate(bx, bxse, by, byse, methods=("mbe",), n_boot=n_boot, seed=seed)["mbe"]
    z = column_normals(seed, bx.shape[1], n_boot, 1)[0]
    for i in range(bx.shape[0]):
        m = k[i]
        b, se, w, _ = _plain_mbe(bx[i, :m], bxse[i, :m], by[i, :m], byse[i, :m])
        modes = []
        for j in range(n_boot):
            draw = b + se * z[j, :m]
            bw = 0.9 * min(np.std(draw, ddof=1), _r_mad(draw)) / m**0.2
            modes.append(_r_density_mode(draw, w, bw))
        assert abs(r.se[i] - _r_mad(np.array(modes))) <= 1e-9 * r.se[i]


def test_mbe__vignette_ldl_chd():
    r = estimate(LDLC, LDLCSE, CHD, CHDSE, methods=("mbe",), n_boot=2000, seed=1)["mbe"]
    # MendelianRandomization vignette: MBE 2.946 (1.005); the SE is a bootstrap with R's RNG
    assert round(float(r.estimate[0]), 3) == 2.946
    assert abs(r.se[0] - 1.005) < 0.08


def test_mbe__identical_ratios_have_zero_bandwidth():
    bx = [[0.1, 0.2, 0.3, 0.4]]
    by = [[0.05, 0.1, 0.15, 0.2]]  # every ratio is 0.5: sd = mad = 0
    r = estimate(bx, [[0.01] * 4], by, [[0.01] * 4], methods=("mbe",), n_boot=10)["mbe"]
    assert r.reason[0] == "zero_bandwidth" and np.isnan(r.estimate[0])
