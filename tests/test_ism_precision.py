"""ISM precision: the names, the CPU's refusals, the TF32 flags, bf16 autocast on the CPU, the fingerprint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_ENSEMBLE, assert_close_fp32, reference_one_hot
from ism_models import random_seqs
from deepmr_dist.errors import InputError
from deepmr_dist.ism.engine import make_ensemble_runners, saturation_mutagenesis
from deepmr_dist.ism.precision import check_precision, precision_context
from deepmr_dist.models.ensemble import ModelSpec, load_members
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.pipeline.config import ISM
from deepmr_dist.stages.predict import ISMSettings, run_fingerprint

CPU = torch.device("cpu")


def test_check_precision__unknown_names_and_gpu_only_precisions_on_the_cpu_are_input_errors() -> None:
    for ok in ("fp32", "bf16"):
        check_precision(ok, CPU)
    for name in ("tf32", "fp16"):
        check_precision(name)  # the name alone is valid
        check_precision(name, torch.device("cuda"))
        with pytest.raises(InputError, match=f"precision '{name}' needs a CUDA GPU, but ISM runs on cpu; on cpu use one of fp32, bf16"):
            check_precision(name, CPU)
    with pytest.raises(InputError, match="unknown precision 'fp64'; valid: fp32, tf32, bf16, fp16"):
        check_precision("fp64")


@pytest.mark.filterwarnings("ignore:CUDA is not available:UserWarning")  # autocast on a machine without CUDA
@pytest.mark.parametrize(("precision", "tf32"), [("fp32", False), ("tf32", True), ("bf16", False), ("fp16", False)])
def test_precision_context__sets_tf32_flags_on_cuda_and_restores_them(precision: str, tf32: bool) -> None:
    """Only the flags are exercised here without a GPU (no kernel runs): they are process-wide Python settings."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = (matmul.allow_tf32, cudnn.allow_tf32)
    try:
        matmul.allow_tf32, cudnn.allow_tf32 = (not tf32, not tf32)
        with pytest.raises(RuntimeError, match="inside"):
            with precision_context(precision, torch.device("cuda")):
                assert (matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
                if torch.cuda.is_available():
                    assert torch.is_autocast_enabled("cuda") == (precision in ("bf16", "fp16"))
                raise RuntimeError("inside")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (not tf32, not tf32)
        with precision_context(precision if precision in ("fp32", "bf16") else "fp32", CPU):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (not tf32, not tf32), "the CPU leaves the flags alone"
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_saturation_mutagenesis__bf16_on_the_cpu_runs_in_autocast_within_bf16_error() -> None:
    """bf16 keeps 8 significant bits (unit round-off 2^-9 = 2e-3): inputs to every convolution and dense
    layer are rounded to it, so predictions move by about 1e-3 of their scale per layer, far above
    float32 round-off (1e-7) and below 5e-2 for the example CNN's 6 layers."""
    members = load_members(ModelSpec((EXAMPLE_ENSEMBLE,)))
    x = torch.from_numpy(np.stack([reference_one_hot(s) for s in random_seqs(3, 100, 1)]))
    runners = make_ensemble_runners(members, 100, fuse=True)
    ref32, mut32 = saturation_mutagenesis(runners, OutputHead(), x)
    ref16, mut16 = saturation_mutagenesis(runners, OutputHead(), x, precision="bf16")
    assert ref16.dtype == mut16.dtype == torch.float32
    assert torch.equal(mut16.isnan(), mut32.isnan())
    scale = mut32.nan_to_num().abs().max().item()
    error = (mut16 - mut32).nan_to_num().abs().max().item()
    assert 1e-4 * scale < error < 5e-2 * scale, (error, scale)
    assert_close_fp32(saturation_mutagenesis(runners, OutputHead(), x, precision="fp32")[1].numpy(), mut32.numpy())
    with pytest.raises(InputError, match="needs a CUDA GPU"):
        saturation_mutagenesis(runners, OutputHead(), x, precision="fp16")


def test_ism_settings_and_config__precision_is_checked_and_changes_the_run_fingerprint(example_loci) -> None:
    assert ISMSettings().precision == "fp32" and ISM().precision == "fp32"
    with pytest.raises(InputError, match="unknown precision 'half'"):
        ISMSettings(precision="half")
    with pytest.raises(ValueError, match="precision"):
        ISM(precision="half")
    assert ISM(precision="bf16").precision == "bf16"
    loci = example_loci.isel(locus=slice(0, 2))
    assert run_fingerprint("m", loci, ISMSettings()) != run_fingerprint("m", loci, ISMSettings(precision="bf16"))
