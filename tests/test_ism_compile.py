"""torch.compile of the networks ISM runs in full: the same predictions as eager to float32 round-off.

Also the option's path: ``ISMSettings(compile=...)``, the YAML's ``ism.compile``,
``deepmr predict --compile`` and the store's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

import deepmr_dist
from conftest import EXAMPLE_FASTA, assert_close_fp32, assert_close_ism
from ism_models import one_hot, set_batchnorm_stats
from deepmr_dist.cli import build_parser, main
from deepmr_dist.ism.engine import FullRecompute, make_ensemble_runners, saturation_mutagenesis
from deepmr_dist.ism.fusion.runner import FusedRunner
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.heads import OutputHead
from deepmr_dist.pipeline.config import ISM
from deepmr_dist.stages.predict import ISMSettings, run_fingerprint

MODEL = "deepmr_dist.models.examples:simulation_ensemble"


def _members(n: int) -> list[torch.nn.Module]:
    torch.manual_seed(5)
    return [set_batchnorm_stats(SimulationCNN(length=100)) for _ in range(n)]


@pytest.mark.parametrize("fuse", [False, True], ids=["member-loop", "fused"])
def test_compile__full_recompute_matches_eager_to_float32_round_off(fuse: bool) -> None:
    members = _members(2)
    x = one_hot(2, 100, n_columns=(7,))  # 601 mutants: batches of 256, 256 and 89
    eager = make_ensemble_runners(members, 100, incremental=False, fuse=fuse)
    compiled = make_ensemble_runners(members, 100, incremental=False, fuse=fuse, compile=True)
    assert [type(r) for r in compiled] == ([FusedRunner] if fuse else [FullRecompute, FullRecompute])
    ref_want, mut_want = saturation_mutagenesis(eager, OutputHead(), x, mutant_batch=256)
    graphs = counters["stats"]["unique_graphs"]
    ref_got, mut_got = saturation_mutagenesis(compiled, OutputHead(), x, mutant_batch=256)
    assert counters["stats"]["unique_graphs"] > graphs, "nothing was compiled"
    assert_close_fp32(ref_got.numpy(), ref_want.numpy(), err_msg="ref_pred")
    assert_close_fp32(mut_got.numpy(), mut_want.numpy(), err_msg="mut_pred")


def test_compile__leaves_the_incremental_runner_eager() -> None:
    runners = make_ensemble_runners(_members(2), 100, fuse=False, compile=True)
    assert all(isinstance(r, IncrementalRunner) for r in runners)


def test_compile_option__off_by_default_parsed_by_the_cli_and_in_the_fingerprint_only_when_on(example_loci) -> None:
    assert ISMSettings().compile is False and ISM().compile is False and ISM(compile=True).compile is True
    parser = build_parser("predict")
    argv = ["predict", "--model", "m.pt", "--fasta", "loci.fa", "--store", "run.zarr"]
    assert parser.parse_args(argv).compile is False and parser.parse_args([*argv, "--compile"]).compile is True
    loci = example_loci.isel(locus=slice(0, 2))
    assert run_fingerprint("m", loci, ISMSettings(compile=True)) != run_fingerprint("m", loci, ISMSettings())
    # Off, the fingerprint is the one of stores made before the option existed: settings without the key.
    before = {k: v for k, v in asdict(ISMSettings()).items() if k != "compile"}
    digest = hashlib.sha256(b"m")
    digest.update(np.ascontiguousarray(loci["sequence"].values).tobytes())
    digest.update("\n".join(map(str, loci.locus.values)).encode())
    digest.update(json.dumps(before, sort_keys=True, default=str).encode())
    assert run_fingerprint("m", loci, ISMSettings()) == digest.hexdigest()


@pytest.mark.slow
def test_cli_predict__compile_on_a_worker_matches_eager_and_is_recorded_in_the_store(tmp_path) -> None:
    stores = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        stores[name] = str(tmp_path / f"{name}.zarr")
        argv = ["predict", "--model", MODEL, "--fasta", str(EXAMPLE_FASTA), "--store", stores[name], "--n-workers", "1",
                "--chunk-loci", "16", "--full-recompute", "--quiet", *extra]  # fmt: skip
        assert main(argv) == 0
    eager, compiled = (deepmr_dist.open_run(stores[k])["ism"] for k in ("eager", "compiled"))
    assert compiled.attrs["settings"]["compile"] is True and eager.attrs["settings"]["compile"] is False
    assert_close_ism(compiled, eager)
