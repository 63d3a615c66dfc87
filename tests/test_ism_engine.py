"""The ISM engine against brute force: explicitly built mutant sequences predicted one by one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_close_fp32, reference_one_hot
from ism_models import brute_force, random_seqs
from deepmr_dist.errors import InputError
from deepmr_dist.ism.engine import FullRecompute, saturation_mutagenesis
from deepmr_dist.ism.mutants import apply_mutations, mutation_list
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.models.ensemble import ModelSpec, freeze_dropout, load_members
from deepmr_dist.models.heads import OutputHead


def engine(members: list[nn.Module], head: OutputHead, seqs: list[str], **kw) -> tuple[np.ndarray, np.ndarray]:
    x = torch.from_numpy(np.stack([reference_one_hot(s) for s in seqs]))
    ref, mut = saturation_mutagenesis([FullRecompute(m) for m in members], head, x, **kw)
    return ref.numpy(), mut.numpy()


def _check(members, head, seqs, **kw):
    ref_e, mut_e = engine(members, head, seqs, **kw)
    ref_b, mut_b = brute_force(members, head, seqs)
    np.testing.assert_allclose(ref_e, ref_b, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isnan(mut_e), np.isnan(mut_b))
    np.testing.assert_allclose(mut_e, mut_b, rtol=1e-5, atol=1e-5)
    return ref_e, mut_e


class SmallConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 8, 5, padding=2)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x)).max(dim=-1).values)


class ProfileModel(nn.Module):
    """Returns (profile (batch, 2, L), counts (batch, 2)) like BPNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 2, 7, padding=3)
        self.lin = nn.Linear(4 * 30, 2)

    def forward(self, x):
        return torch.nn.functional.softplus(self.conv(x)), self.lin(x.flatten(1))


def test_ism__small_conv_matches_brute_force():
    torch.manual_seed(0)
    _check([SmallConv().eval()], OutputHead(), random_seqs(3, 25, 1))


def test_ism__batchnorm_dropout_in_eval_mode_match_brute_force():
    torch.manual_seed(1)
    model = SimulationCNN(length=40, dropout=0.3)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm1d)):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    _check([model.eval()], OutputHead(), random_seqs(2, 40, 2))


def test_ism__ensemble_of_three_with_n_positions_and_small_batches():
    members = load_members(ModelSpec(("deepmr_dist.models.examples:simulation_ensemble",)))
    seqs = random_seqs(3, 100, 3, with_n=True)
    _, mut = _check(members, OutputHead(), seqs, mutant_batch=97)
    # identity edits are NaN; at N positions all four bases are mutants
    assert not np.isnan(mut[0, :, 0]).any()
    assert np.isnan(mut[1]).sum() == 3 * 100 * 2  # members x positions x tasks
    assert mut.shape == (3, 3, 100, 4, 2)


def test_ism__tuple_and_profile_outputs_through_heads():
    torch.manual_seed(2)
    model = ProfileModel().eval()
    seqs = random_seqs(2, 30, 4)
    _check([model], OutputHead(output_index=0, profile_axis=-1, transform="log1p"), seqs)
    _check([model], OutputHead(output_index=1, tasks=(1,)), seqs)


def test_ism__mc_dropout_masks_are_frozen_and_match_brute_force():
    torch.manual_seed(3)
    spec = ModelSpec(("deepmr_dist.models.examples:simulation_cnn_with_dropout",), mc_dropout=3, mc_seed=5)
    members = load_members(spec)
    seqs = random_seqs(2, 100, 5)
    ref, _ = _check(members, OutputHead(), seqs)
    assert not np.allclose(ref[:, 0], ref[:, 1]), "different masks must give different members"
    # A mutant equal to its reference gives no difference under a frozen mask. Within one batch two
    # identical rows may still differ by GEMM round-off (MKL's SGEMM rounds rows of a 2-, 3- or 5-row
    # batch differently: 7e-9 here), so in-batch rows agree to float32 round-off (1e-6); a mask drawn per
    # row would change them by 4e-3 to 4e-2, as the members' masks do. The same row alone, twice (same
    # shapes, same kernels), is bit-identical.
    x = torch.from_numpy(np.stack([reference_one_hot(seqs[0])] * 2 + [reference_one_hot(seqs[1])]))
    with torch.inference_mode():
        for member in members:
            out = member(x).numpy()
            assert_close_fp32(out[0], out[1], err_msg="identical rows of one batch")
            assert not np.allclose(out[0], out[2], rtol=1e-3)
            assert torch.equal(member(x[:1]), member(x[1:2]))


def test_freeze_dropout__same_seed_same_mask_and_no_dropout_is_an_error():
    from deepmr_dist.errors import InputError
    from deepmr_dist.models.examples import simulation_cnn_with_dropout, simulation_ensemble

    a, b = freeze_dropout(simulation_cnn_with_dropout(), 1), freeze_dropout(simulation_cnn_with_dropout(), 1)
    x = torch.from_numpy(np.stack([reference_one_hot(s) for s in random_seqs(2, 100, 6)]))
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
    with pytest.raises(InputError, match="has none"):
        freeze_dropout(simulation_ensemble(1)[0], 1)


def test_mutation_list__skips_identity_and_orders_by_locus_position_base():
    x = torch.from_numpy(np.stack([reference_one_hot("ACGN"), reference_one_hot("TTTT")]))
    locus, position, base = mutation_list(x)
    assert locus.shape[0] == 3 * 3 + 4 + 3 * 4
    keys = list(zip(locus.tolist(), position.tolist(), base.tolist()))
    assert keys == sorted(keys)
    assert (0, 0, 0) not in keys and (0, 3, 0) in keys
    mutants = apply_mutations(x, locus, position, base)
    changed = (mutants != x[locus]).any(dim=1)  # (mutant, position)
    assert torch.equal(changed.sum(dim=1), torch.ones(locus.shape[0], dtype=torch.long))
    assert torch.equal(changed.float().argmax(dim=1), position)
    assert torch.equal(mutants[torch.arange(locus.shape[0]), :, position].argmax(dim=1), base)


def test_load_members__simulation_state_dict_files_and_bad_file(tmp_path):
    """Plain state dicts of the simulation CNN load as members; any other file is an error naming it."""
    originals = load_members(ModelSpec(("deepmr_dist.models.examples:simulation_ensemble",)))
    paths = []
    for i, member in enumerate(originals[:2]):
        paths.append(str(tmp_path / f"member-{i}.pt"))
        torch.save(member.state_dict(), paths[-1])
    loaded = load_members(ModelSpec(tuple(paths)))
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (5, 100)), 4).transpose(1, 2).float()
    with torch.inference_mode():
        for original, member in zip(originals, loaded):
            assert not member.training
            torch.testing.assert_close(member(x), original(x), rtol=0, atol=0)
    bad = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(InputError, match=f"{bad} is not a TorchScript archive or a simulation CNN state dict"):
        load_members(ModelSpec((str(bad),)))
