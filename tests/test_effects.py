"""Stage 2, mutation effects: values against an independent numpy computation, and
out-of-core execution on a worker whose memory limit is far below the data size."""

from __future__ import annotations

import re

import dask
import numpy as np
import pytest
import xarray as xr
from distributed import Client, LocalCluster

from deepmr_dist.io import store
from deepmr_dist.stages.effects import compute_effects
from deepmr_dist.errors import DeepMRError, StoreError
from deepmr_dist.io.sequence import N_CODE, sequences_dataset


def _identity(codes: np.ndarray) -> np.ndarray:
    """(locus, position, allele): True where the allele is the reference base (never at N)."""
    return codes[:, :, None] == np.arange(4)[None, None, :]


def _write_raw_ism(path: str, codes: np.ndarray, ref: np.ndarray, mut: np.ndarray, chunk_loci: int) -> None:
    """A run store whose ``ism`` group holds exactly these arrays (written chunk by chunk, as predict does)."""
    n_members, n_tasks = ref.shape[1], ref.shape[2]
    loci = sequences_dataset(codes, [f"locus{i}" for i in range(codes.shape[0])])
    template = store.ism_template(loci, [f"member{i}" for i in range(n_members)], [f"task{t}" for t in range(n_tasks)], chunk_loci)
    store.create_store(path, template, fingerprint="test", attrs={}, chunk_loci=chunk_loci)
    for start, stop in store.chunk_bounds(codes.shape[0], chunk_loci):
        store.write_ism_chunk(path, start, ref[start:stop], mut[start:stop])


def _raw(seed: int, n_loci=6, n_members=4, length=9, n_tasks=2, identical_members=False):
    """Sequences (with one N), ref_pred and correlated mut_pred (NaN at reference alleles), float32."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 4, (n_loci, length)).astype(np.int8)
    codes[1, 3] = N_CODE
    ref = rng.normal(size=(n_loci, n_members, n_tasks)).astype(np.float32)
    noise = rng.normal(scale=0.3, size=(n_loci, n_members, length, 4, n_tasks))
    mut = (ref[:, :, None, None, :] + noise).astype(np.float32)
    if identical_members:
        ref[:] = ref[:, :1]
        mut[:] = mut[:, :1]
    mut[np.broadcast_to(_identity(codes)[:, None, :, :, None], mut.shape)] = np.nan
    return codes, ref, mut


def _numpy_effects(ref: np.ndarray, mut: np.ndarray, ddof: int) -> tuple[np.ndarray, np.ndarray]:
    """mean(mut - ref) and sqrt(var(mut) + var(ref) - 2 cov(mut, ref)) across members, one element at a time."""
    n_loci, _, length, n_alleles, n_tasks = mut.shape
    effect = np.full((n_loci, length, n_alleles, n_tasks), np.nan)
    se = np.full_like(effect, np.nan)
    for i, p, a, t in np.ndindex(effect.shape):
        m = mut[i, :, p, a, t].astype(np.float64)
        r = ref[i, :, t].astype(np.float64)
        if np.isnan(m).any():
            continue
        effect[i, p, a, t] = np.mean(m - r)
        var = np.var(m, ddof=ddof) + np.var(r, ddof=ddof) - 2 * np.cov(m, r, ddof=ddof)[0, 1]
        se[i, p, a, t] = np.sqrt(max(var, 0.0))
    return effect, se


# ----------------------------------------------------------------------------- 6. values


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("ddof", [0, 1])
def test_compute_effects__written_store_equals_numpy_mean_and_covariance_se(tmp_path, ddof, dtype):
    codes, ref, mut = _raw(seed=11)
    path = str(tmp_path / "run.zarr")
    _write_raw_ism(path, codes, ref, mut, chunk_loci=4)  # chunks 0:4 and the partial 4:6
    effects = compute_effects(store.open_run(path)["ism"], ddof=ddof, dtype=dtype)
    effects = store.write_group(path, effects, "effects")

    expected_effect, expected_se = _numpy_effects(ref, mut, ddof)
    assert effects["effect"].dims == ("locus", "position", "allele", "task")
    assert effects["effect"].dtype == effects["effect_se"].dtype == np.dtype(dtype)
    assert effects.attrs["ddof"] == ddof
    reopened = store.open_run(path)["effects"]  # persisted, readable lazily
    assert reopened["effect"].data.chunks[0] == (6,)  # whole ism chunks up to EFFECTS_BLOCK_BYTES: one block here
    # float64 to its own round-off; float32 is the float64 result rounded once (half an ulp, 2**-24 relative)
    rtol = (1e-13, 1e-9) if dtype == "float64" else (2.0**-24 * 1.01, 2.0**-24 * 1.01)
    np.testing.assert_allclose(reopened["effect"].values, expected_effect, rtol=rtol[0], atol=1e-15)
    np.testing.assert_allclose(reopened["effect_se"].values, expected_se, rtol=rtol[1], atol=1e-12)
    nan_where = np.broadcast_to(_identity(codes)[..., None], expected_effect.shape)
    for name in ("effect", "effect_se"):
        np.testing.assert_array_equal(np.isnan(reopened[name].values), nan_where, err_msg=name)
    assert np.isfinite(reopened["effect"].values[1, 3]).all()  # N: every allele is a mutation


@pytest.mark.parametrize("ddof", [0, 1])
def test_compute_effects__identical_members_give_se_exactly_zero(ddof):
    codes, ref, mut = _raw(seed=12, n_members=3, identical_members=True)
    ism = xr.Dataset(
        {
            "ref_pred": (("locus", "member", "task"), ref),
            "mut_pred": (("locus", "member", "position", "allele", "task"), mut),
        }
    )
    effects = compute_effects(ism, ddof=ddof, dtype="float64")
    identity = np.broadcast_to(_identity(codes)[..., None], effects["effect_se"].shape)
    se = effects["effect_se"].values
    np.testing.assert_array_equal(se[~identity], 0.0)
    assert np.isnan(se[identity]).all()
    expected = mut[:, 0].astype(np.float64) - ref[:, 0, None, None, :].astype(np.float64)
    np.testing.assert_allclose(effects["effect"].values, expected, rtol=1e-15, atol=0)


def test_compute_effects__is_lazy_in_blocks_of_whole_locus_chunks_and_checks_ddof(tmp_path, monkeypatch):
    from deepmr_dist.stages import effects as stage

    codes, ref, mut = _raw(seed=13)
    path = str(tmp_path / "run.zarr")
    _write_raw_ism(path, codes, ref, mut, chunk_loci=2)
    ism = store.open_run(path)["ism"]
    assert compute_effects(ism)["effect_se"].chunks[0] == (6,)  # all three chunks fit in one block
    monkeypatch.setattr(stage, "EFFECTS_BLOCK_BYTES", 1)  # one chunk per block
    effects = compute_effects(ism)
    assert effects["effect_se"].chunks[0] == effects["ref"].chunks[0] == (2, 2, 2)
    with pytest.raises(DeepMRError, match="ddof"):
        compute_effects(ism, ddof=2)
    with pytest.raises(DeepMRError, match="1 member"):
        compute_effects(ism.isel(member=[0]), ddof=1)


def test_compute_effects__incomplete_store_is_refused(tmp_path):
    codes, ref, mut = _raw(seed=14)
    path = str(tmp_path / "run.zarr")
    loci = sequences_dataset(codes, [f"locus{i}" for i in range(codes.shape[0])])
    template = store.ism_template(loci, ["m0", "m1", "m2", "m3"], ["t0", "t1"], 4)
    store.create_store(path, template, fingerprint="test", attrs={}, chunk_loci=4)
    store.write_ism_chunk(path, 0, ref[:4], mut[:4])
    with pytest.raises(StoreError, match="'locus4'.*deepmr predict"):
        compute_effects(store.open_run(path)["ism"])


# ----------------------------------------------------------------------------- 7. out of core

N_MEMBERS, LENGTH, N_TASKS, CHUNK = 4, 100, 2, 512
MEMORY_LIMIT = 400 * 2**20
SIGNS = np.array([[1, 1, -1, -1], [1, -1, 1, -1], [1, -1, -1, 1], [-1, 1, 1, -1], [-1, 1, -1, 1], [-1, -1, 1, 1]], dtype=np.float32)


def _big_chunk(index: int, codes: np.ndarray):
    """One locus chunk of compressible predictions whose effects are known exactly.

    Values are multiples of 1/64. For each mutation, d_i = mut_i - ref_i = e + s * sign_i with two
    signs + and two -, so the effect is exactly e and the SD over the 4 members (ddof 0) exactly s.
    """
    rng = np.random.default_rng([7, index])
    n = codes.shape[0]
    shape = (n, LENGTH, 4, N_TASKS)
    e = rng.integers(-32, 32, shape).astype(np.float32) / 64
    s = rng.integers(0, 16, shape).astype(np.float32) / 64
    signs = SIGNS[rng.integers(0, len(SIGNS), shape)]  # (..., member)
    ref = rng.integers(-64, 64, (n, N_MEMBERS, N_TASKS)).astype(np.float32) / 64
    d = np.moveaxis(e[..., None] + s[..., None] * signs, -1, 1)  # (locus, member, position, allele, task)
    mut = ref[:, :, None, None, :] + d
    identity = np.broadcast_to(_identity(codes)[:, None, :, :, None], mut.shape)
    mut[identity] = np.nan
    e[_identity(codes)], s[_identity(codes)] = np.nan, np.nan
    return ref, mut, e, s


def _sequences(n_loci: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, 4, (n_loci, LENGTH)).astype(np.int8)


@pytest.mark.parametrize(
    "n_chunks",
    [
        pytest.param(48, id="mut_pred-315MB"),  # float64 intermediates 2.5 GB > 400 MiB
        pytest.param(160, id="mut_pred-1GB", marks=pytest.mark.slow),
    ],
)
def test_effects__written_out_of_core_on_a_worker_with_400MiB(tmp_path, n_chunks):
    from distributed.diagnostics import MemorySampler

    n_loci = n_chunks * CHUNK
    codes = _sequences(n_loci)
    path = str(tmp_path / "run.zarr")
    loci = sequences_dataset(codes, [f"locus{i}" for i in range(n_loci)])
    members, tasks = [f"member{i}" for i in range(N_MEMBERS)], [f"task{t}" for t in range(N_TASKS)]
    store.create_store(path, store.ism_template(loci, members, tasks, CHUNK), fingerprint="t", attrs={}, chunk_loci=CHUNK)
    for index, (start, stop) in enumerate(store.chunk_bounds(n_loci, CHUNK)):
        ref, mut, _, _ = _big_chunk(index, codes[start:stop])
        store.write_ism_chunk(path, start, ref, mut)
    mut_bytes = n_loci * N_MEMBERS * LENGTH * 4 * N_TASKS * 4
    # The float64 copy of mut_pred alone is 2.4x (fast) or 5x (slow) the worker's memory limit.
    assert 2 * mut_bytes > (2.4 if n_chunks < 100 else 5) * MEMORY_LIMIT * 0.5

    # The embedded cluster's scheduling (every ready task sent at once): memory stays bounded with it.
    with dask.config.set({"distributed.scheduler.worker-saturation": float("inf")}), LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit=MEMORY_LIMIT, host="127.0.0.1", dashboard_address=None
    ) as cluster, Client(cluster) as client:
        def peak_rss() -> int:  # nested: shipped by value, workers need not import this module
            """Peak resident memory since exec (VmHWM; ru_maxrss would count the forking parent's)."""
            with open("/proc/self/status") as status:
                return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024

        ids_before = client.run(lambda dask_worker: (dask_worker.id, __import__("os").getpid()))
        peak_before = max(client.run(peak_rss).values())
        sampler = MemorySampler()
        with sampler.sample("effects", measure="process", interval=0.1):
            store.write_group(path, compute_effects(store.open_run(path)["ism"]), "effects")
        ids_after = client.run(lambda dask_worker: (dask_worker.id, __import__("os").getpid()))
        peak = client.run(peak_rss)
        sampled = float(sampler.to_pandas()["effects"].max())

    print(f"mut_pred {mut_bytes / 2**20:.0f} MiB; worker peak RSS {max(peak.values()) / 2**20:.0f} MiB (before: {peak_before / 2**20:.0f} MiB), sampled {sampled / 2**20:.0f} MiB")
    assert ids_after == ids_before  # same worker, never restarted
    (peak_rss,) = peak.values()
    assert peak_rss < MEMORY_LIMIT, f"worker peak RSS {peak_rss / 2**20:.0f} MiB (sampled {sampled / 2**20:.0f} MiB)"
    assert sampled < MEMORY_LIMIT

    effects = store.open_run(path)["effects"]
    for index in (0, n_chunks // 2, n_chunks - 1):
        start, stop = store.chunk_bounds(n_loci, CHUNK)[index]
        ref, mut, e, s = _big_chunk(index, codes[start:stop])
        got = effects.isel(locus=slice(start, stop)).compute()
        np.testing.assert_array_equal(got["effect"].values, e)
        np.testing.assert_array_equal(got["effect_se"].values, s)
        few = slice(0, 3)
        expected_effect, expected_se = _numpy_effects(ref[few], mut[few], ddof=0)
        np.testing.assert_allclose(got["effect"].values[few], expected_effect, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(got["effect_se"].values[few], expected_se, rtol=1e-9, atol=1e-12)


def test_compute_effects__carries_ref_alt_and_1_based_genome_positions_lazily():
    codes = np.array([[0, 1, 2, 4], [3, 3, 0, 1]], dtype=np.int8)  # ACGN, TTAC
    rng = np.random.default_rng(3)
    ism = xr.Dataset(
        {
            "sequence": (("locus", "position"), codes),
            "ref_pred": (("locus", "member", "task"), rng.normal(size=(2, 3, 1)).astype(np.float32)),
            "mut_pred": (("locus", "member", "position", "allele", "task"), rng.normal(size=(2, 3, 4, 4, 1)).astype(np.float32)),
        },
        coords={"locus": ["a", "b"], "position": np.arange(4), "allele": list("ACGT"), "task": ["t"],
                "chrom": ("locus", ["chr1", "chrX"]), "start": ("locus", [999, 0])},
    ).chunk({"locus": 1})  # fmt: skip
    effects = compute_effects(ism)
    assert effects["variant_position"].chunks is not None  # lazy, chunked along locus
    np.testing.assert_array_equal(effects["variant_position"].values, [[1000, 1001, 1002, 1003], [1, 2, 3, 4]])
    assert ["".join(row) for row in effects["ref"].values] == ["ACGN", "TTAC"]
    assert list(effects["alt"].values) == list("ACGT") and list(effects["variant_chrom"].values) == ["chr1", "chrX"]
    plain = compute_effects(ism.drop_vars(["chrom", "start"]))
    assert "variant_position" not in plain.coords and "ref" in plain.coords


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_effect_moments__kernel_is_bit_identical_to_numpy_mean_and_sd_of_the_differences(ddof, dtype):
    from deepmr_dist.ism.effect_sizes import effect_moments

    rng = np.random.default_rng(7)
    mut = rng.normal(size=(3, 5, 6, 4, 2)).astype(np.float32) * 10
    ref = rng.normal(size=(3, 5, 2)).astype(np.float32) * 10
    mut[0, :, 1, 2, 0] = np.nan  # a reference allele: NaN for every member
    mut[1, 3, 4, 0, 1] = np.inf
    mut[2, :, 0, 0, 0] = ref[2, :, 0]  # no effect in any member: effect 0, SE exactly 0
    factor = np.array([1.0, 1.7])
    diff = mut.astype(np.float64) - ref.astype(np.float64)[:, :, None, None, :]
    mean = diff.mean(axis=1)
    with np.errstate(invalid="ignore"):  # inf - inf at the infinite prediction: NaN, as in the kernel
        sd = np.sqrt((((diff - mean[:, None]) ** 2).sum(axis=1) / (5 - ddof)).clip(min=0)) * factor
    out = effect_moments(mut, ref, ddof=ddof, factor=factor, dtype=dtype)
    assert out.dtype == dtype and out.shape == (2, 3, 6, 4, 2)
    assert out[0].tobytes() == mean.astype(dtype).tobytes() and out[1].tobytes() == sd.astype(dtype).tobytes()
    assert out[1][2, 0, 0, 0] == 0.0 and np.isnan(out[0][0, 1, 2, 0]) and np.isnan(out[1][1, 4, 0, 1])


def test_effects_blocks__whole_ism_chunks_of_about_effects_block_bytes():
    import dask.array as da

    from deepmr_dist.stages import effects as stage

    chunk_bytes = 64 * 5 * 200 * 4 * 4 * 4  # bench_scale's mut_pred chunk: 4.1 MB
    mut = da.zeros((1000, 5, 200, 4, 4), dtype=np.float32, chunks=(64, -1, -1, -1, -1))
    assert stage._block_loci(mut) == 64 * (stage.EFFECTS_BLOCK_BYTES // chunk_bytes) == 256
    huge = da.zeros((100, 5, 1000, 4, 919), dtype=np.float32, chunks=(16, -1, -1, -1, -1))  # a DeepSEA chunk: 1.2 GB
    assert stage._block_loci(huge) == 16  # never below one chunk
