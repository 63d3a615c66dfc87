"""Fitting ISM to its device: batch sizing (a pure function, on the CPU), host copies, and the GPU checks.

The tests marked ``gpu`` run only where CUDA is available (``pytest -m gpu``,
called by ``benchmarks/gpu_check.sh``): ISM on the GPU against brute force on
the CPU, the batch sized from free memory, each precision's error against
fp32, and ``deepmr predict`` on the GPU through the embedded cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import EXAMPLE_CNN_ACCUMULATION, EXAMPLE_ENSEMBLE, EXAMPLE_FASTA, assert_close_fp32, assert_close_ism, reference_one_hot
from ism_models import brute_force, needs_bpnet, random_seqs
from deepmr_dist.errors import DeepMRError, InputError
from deepmr_dist.ism.device import DEFAULT_MUTANT_BATCH, auto_mutant_batch, choose_mutant_batch, to_host
from deepmr_dist.ism.engine import make_ensemble_runners, saturation_mutagenesis
from deepmr_dist.ism.fusion.runner import FusedRunner
from deepmr_dist.ism.mutants import mutation_list
from deepmr_dist.models.ensemble import ModelSpec, load_members
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.stages.predict import ISMSettings, predict

CUDA = torch.device("cuda")


def on_gpu(test):
    """Mark ``test`` as a GPU check, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _x(seqs: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.from_numpy(np.stack([reference_one_hot(s) for s in seqs])).to(device)


def test_choose_mutant_batch__fraction_of_free_memory_in_multiples_within_bounds() -> None:
    # 0.5 * 10 GB / 100 kB = 50,000 mutants, rounded down to a multiple of 64
    assert choose_mutant_batch(10_000_000_000, 100_000) == 49_984
    assert choose_mutant_batch(10_000_000_000, 100_000, fraction=0.25, multiple=1000) == 25_000
    assert choose_mutant_batch(10**15, 1) == 1 << 16, "capped at the maximum"
    assert choose_mutant_batch(1_000_000, 100_000) == 64, "at least the minimum, even when it does not fit"
    assert choose_mutant_batch(-5, 100) == 64 and choose_mutant_batch(10**9, 0) == 1 << 16


def test_auto_mutant_batch_and_to_host__on_the_cpu() -> None:
    members = load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))
    x = _x(random_seqs(2, 100, 1))
    (runner,) = make_ensemble_runners(members, 100, fuse=True)
    _, cache = runner.reference(x)
    assert auto_mutant_batch(runner, OutputHead(), x, cache) == DEFAULT_MUTANT_BATCH
    ref, mut = saturation_mutagenesis([runner], OutputHead(), x, mutant_batch=None)
    host = to_host(mut)
    assert isinstance(host, np.ndarray) and host.dtype == np.float32
    np.testing.assert_array_equal(host, mut.numpy())


@dataclass
class GivenMemory:
    """A device with ``free_bytes`` free whose probe batch costs the bytes of the outputs it returns."""

    free_bytes: int
    probes: list[list[torch.Tensor]] = field(default_factory=list)

    def free(self) -> int:
        return self.free_bytes

    def peak(self, run: Callable[[], Any]) -> int:
        outputs = run()
        self.probes.append(outputs)
        return sum(t.numel() * t.element_size() for t in outputs)


def test_auto_mutant_batch__fits_the_probe_cost_into_the_given_free_memory_within_bounds() -> None:
    members = load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))
    x = _x(random_seqs(2, 100, 5))  # 600 mutants: a probe of 256
    (runner,) = make_ensemble_runners(members, 100, fuse=True)  # one runner of the 3 members
    _, cache = runner.reference(x)
    # a mutant's probe outputs: 3 members x 2 tasks of float32 = 24 bytes; 0.5 * 10^6 / 24 = 20,833 -> 20,800
    memory = GivenMemory(10**6)
    assert auto_mutant_batch(runner, OutputHead(), x, cache, memory) == 20_800
    (probe,) = memory.probes
    _, mut = saturation_mutagenesis([runner], OutputHead(), x, mutant_batch=97)
    locus, position, base = (t[:256] for t in mutation_list(x))
    for i, output in enumerate(probe):  # the first 256 mutants, predicted by each member
        assert_close_fp32(output.numpy(), mut[locus, i, position, base].numpy())
    assert auto_mutant_batch(runner, OutputHead(), x, cache, GivenMemory(1000)) == 64, "the minimum"
    assert auto_mutant_batch(runner, OutputHead(), x, cache, GivenMemory(10**12)) == 1 << 16, "the maximum"


def test_ism_settings__auto_mutant_batch_is_none_and_bad_batches_are_refused() -> None:
    assert ISMSettings(mutant_batch="auto").mutant_batch is None
    assert ISMSettings(mutant_batch="auto") == ISMSettings(mutant_batch=None) != ISMSettings()
    for bad in (0, -1, "big", 2.5):
        with pytest.raises(DeepMRError, match="mutant batch must be >= 1"):
            ISMSettings(mutant_batch=bad)


def test_predict__auto_mutant_batch_equals_an_explicit_batch_to_float32_round_off(tmp_path, client, example_loci) -> None:
    loci = example_loci.isel(locus=slice(0, 8))
    spec = ModelSpec((EXAMPLE_ENSEMBLE,))
    stores = {}
    for batch in ("auto", 97):  # auto: DEFAULT_MUTANT_BATCH on CPU workers: a chunk's 1,200 mutants in one batch
        settings = ISMSettings(chunk_loci=4, mutant_batch=batch, incremental=False)
        stores[batch] = predict(loci, spec, str(tmp_path / f"{batch}.zarr"), client=client, progress=False,
                                settings=settings).load()  # fmt: skip
    assert stores["auto"]["complete"].values.all()
    assert_close_ism(stores["auto"], stores[97])


def test_mutant_batch_auto__is_accepted_by_the_cli_and_the_yaml_and_counts_below_one_are_refused(tmp_path, capsys):
    from deepmr_dist.cli import main
    from deepmr_dist.pipeline.config import PipelineConfig
    from deepmr_dist.pipeline.config_types import parse_config

    data = {"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "store": str(tmp_path / "s.zarr")}
    assert parse_config({**data, "ism": {"mutant_batch": "auto"}}, PipelineConfig, "p.yaml").ism.mutant_batch == "auto"
    with pytest.raises(InputError, match="mutant_batch"):
        parse_config({**data, "ism": {"mutant_batch": 0}}, PipelineConfig, "p.yaml")
    store = tmp_path / "auto.zarr"
    args = ["predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", str(store),
            "--n-workers", "1", "--quiet", "--mutant-batch"]  # fmt: skip
    with pytest.raises(SystemExit):  # argparse's usage error, exit 2
        main([*args, "many"])
    assert "argument --mutant-batch: expected a count or 'auto', got 'many'" in capsys.readouterr().err
    assert main([*args, "auto"]) == 0
    assert xr.open_zarr(store, group="ism", consolidated=False)["complete"].values.all()


# --------------------------------------------------------------------------- on a GPU


def _gpu_case(build, head: OutputHead, length: int, accumulation: int, mutant_batch: int | None) -> None:
    """Fused ISM on CUDA (fp32: TF32 off) equals brute force on the CPU."""
    members = build()
    seqs = random_seqs(2, length, 2, with_n=True)
    on_gpu = [m.to(CUDA) for m in build()]
    runners = make_ensemble_runners(on_gpu, length, head=head)
    assert isinstance(runners[0], FusedRunner)
    x = _x(seqs, CUDA)
    ref, mut = saturation_mutagenesis(runners, head, x, mutant_batch=mutant_batch)
    assert mut.device == x.device
    ref_b, mut_b = brute_force(members, head, seqs)
    assert_close_fp32(to_host(ref), ref_b, accumulation=accumulation)
    assert_close_fp32(to_host(mut), mut_b, accumulation=accumulation)


@on_gpu
@pytest.mark.parametrize("mutant_batch", [None, 97])
def test_gpu__fused_simulation_ensemble_matches_brute_force(mutant_batch: int | None) -> None:
    _gpu_case(lambda: load_members(ModelSpec((EXAMPLE_ENSEMBLE,))), OutputHead(), 100, EXAMPLE_CNN_ACCUMULATION,
              mutant_batch)  # fmt: skip


@needs_bpnet
@on_gpu
@pytest.mark.parametrize("index", [1, 2], ids=["counts", "profile"])
def test_gpu__fused_bpnet_matches_brute_force(index: int) -> None:
    from deepmr_dist.models.bpnet import bpnet_ensemble

    sizes = {"tasks": ("Oct4", "Sox2"), "n_filters": 8, "n_layers": 3, "trimming": 10, "profile_window": 20}
    _gpu_case(lambda: bpnet_ensemble(3, 3, **sizes), OutputHead(output_index=index), 60,
              4 * 21 + 3 * 8 * 3 + 8 * 75 + 80, None)  # fmt: skip


@on_gpu
@pytest.mark.parametrize(("precision", "bound"), [("tf32", 1e-2), ("bf16", 5e-2), ("fp16", 1e-2)])
def test_gpu__each_precision_stays_within_its_error_against_fp32(precision: str, bound: float) -> None:
    """Mantissas of 10 (tf32, fp16) and 7 (bf16) bits: about 1e-3 and 4e-3 of the scale per layer."""
    members = [m.to(CUDA) for m in load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))]
    x = _x(random_seqs(4, 100, 3), CUDA)
    runners = make_ensemble_runners(members, 100)
    _, mut32 = saturation_mutagenesis(runners, OutputHead(), x)
    _, mut = saturation_mutagenesis(runners, OutputHead(), x, precision=precision)
    scale = mut32.nan_to_num().abs().max().item()
    error = (mut - mut32).nan_to_num().abs().max().item()
    assert 0 < error < bound * scale, (precision, error, scale)


@on_gpu
def test_gpu__auto_batch_fits_free_memory_and_to_host_uses_pinned_memory() -> None:
    members = [m.to(CUDA) for m in load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))]
    x = _x(random_seqs(2, 100, 4), CUDA)
    (runner,) = make_ensemble_runners(members, 100)
    _, cache = runner.reference(x)
    batch = auto_mutant_batch(runner, OutputHead(), x, cache)
    assert 64 <= batch <= 1 << 16 and batch % 64 == 0
    tensor = torch.arange(12.0, device=CUDA).reshape(3, 4)
    np.testing.assert_array_equal(to_host(tensor), np.arange(12.0, dtype=np.float32).reshape(3, 4))


@on_gpu
def test_gpu__deepmr_predict_on_cuda_through_the_embedded_cluster(tmp_path, example_loci) -> None:
    """The store written by GPU workers equals the CPU engine's predictions to float32 round-off."""
    from deepmr_dist.cli import main
    from deepmr_dist.io import store
    from deepmr_dist.io.sequence import codes_to_onehot

    path = str(tmp_path / "gpu.zarr")
    assert main(["predict", "--model", EXAMPLE_ENSEMBLE, "--fasta", str(EXAMPLE_FASTA), "--store", path, "-q"]) == 0
    ism = store.open_run(path)["ism"]
    members = load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))
    x = codes_to_onehot(torch.from_numpy(ism["sequence"].values))
    ref, mut = saturation_mutagenesis(make_ensemble_runners(members, 100), OutputHead(), x)
    expected = ism.copy(data={**{k: v.values for k, v in ism.data_vars.items()}, "ref_pred": ref.numpy(),
                              "mut_pred": mut.numpy()})  # fmt: skip
    assert_close_ism(ism.load(), expected)
