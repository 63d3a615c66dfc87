"""Real architectures (DeepSEA-style, bpnet-lite BPNet and ChromBPNet), random-initialised, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import reference_one_hot
from deepmr_dist.errors import InputError
from deepmr_dist.ism.engine import FullRecompute, make_runner, saturation_mutagenesis
from deepmr_dist.ism.incremental.run import IncrementalRunner
from deepmr_dist.models.architectures import DeepSEA, deepsea_ensemble, head_for_tasks
from deepmr_dist.models.ensemble import ModelSpec, load_members
from deepmr_dist.models.heads import OutputHead

try:
    import bpnetlite
except ImportError:  # bpnet-lite is the benchmarks extra
    bpnetlite = None

needs_bpnet = pytest.mark.skipif(bpnetlite is None, reason="bpnet-lite is not installed")

BASES = "ACGT"
RTOL = 1e-4

CELLS = [f"cell{i:02d}" for i in range(40)]
ASSAYS = ["DNase", "CTCF", "GATA1", "TAL1", "POLR2A", "EP300", "H3K27ac", "H3K4me3"]
TASK_NAMES = [f"{cell}|{assay}" for cell in CELLS for assay in ASSAYS]  # 320 names, DeepSEA-style
SMALL_DEEPSEA = {"filters": (8, 12, 16), "width": 5, "pool": 2, "hidden": 16, "dropout": (0.2, 0.2, 0.5)}


def random_seqs(n: int, length: int, seed: int) -> list[str]:
    """Random sequences; the first has an ``N`` at its first and middle positions."""
    rng = np.random.default_rng(seed)
    seqs = ["".join(rng.choice(list(BASES), length)) for _ in range(n)]
    first = list(seqs[0])
    first[0] = first[length // 2] = "N"
    seqs[0] = "".join(first)
    return seqs


def batch(seqs: list[str]) -> torch.Tensor:
    return torch.from_numpy(np.stack([reference_one_hot(s) for s in seqs]))


def brute_force(members: list[nn.Module], head: OutputHead, seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Predict each reference and each explicitly written single-base mutant sequence."""
    ref = mut = None
    with torch.no_grad():
        for i, seq in enumerate(seqs):
            edits = [(p, b) for p in range(len(seq)) for b, base in enumerate(BASES) if seq[p] != base]
            mutants = np.stack([reference_one_hot(seq[:p] + BASES[b] + seq[p + 1 :]) for p, b in edits])
            for m, member in enumerate(members):
                r = head(member(torch.from_numpy(reference_one_hot(seq)[None])), 1).numpy()[0]
                if ref is None:
                    ref = np.zeros((len(seqs), len(members), r.size))
                    mut = np.full((len(seqs), len(members), len(seq), 4, r.size), np.nan)
                ref[i, m] = r
                out = head(member(torch.from_numpy(mutants)), len(edits)).numpy()
                for (p, b), row in zip(edits, out):
                    mut[i, m, p, b] = row
    assert ref is not None and mut is not None
    return ref, mut


def engine(
    members: list[nn.Module], head: OutputHead, seqs: list[str], *, incremental: bool
) -> tuple[np.ndarray, np.ndarray]:
    length = len(seqs[0])
    runners = [make_runner(m, length, incremental=incremental) for m in members]
    ref, mut = saturation_mutagenesis(runners, head, batch(seqs), mutant_batch=257)
    return ref.numpy(), mut.numpy()


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal NaN patterns and ``|got - want| <= RTOL * |want|``, with a floor of ``RTOL * 1e-2 * max|want|``."""
    assert got.shape == want.shape
    assert np.array_equal(np.isnan(got), np.isnan(want))
    scale = np.nanmax(np.abs(want))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * 1e-2 * scale, equal_nan=True)


def check_ism(members: list[nn.Module], head: OutputHead, seqs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The full-recompute engine equals brute force; returns the engine's (ref, mut)."""
    ref, mut = engine(members, head, seqs, incremental=False)
    ref_b, mut_b = brute_force(members, head, seqs)
    assert_close(ref, ref_b)
    assert_close(mut, mut_b)
    return ref, mut


def small_bpnets(n_members: int = 1, seed: int = 0, **kw) -> list[nn.Module]:
    from deepmr_dist.models.bpnet import bpnet_ensemble

    sizes = {"tasks": ("Oct4", "Sox2"), "n_filters": 8, "n_layers": 3, "trimming": 10, "profile_window": 20}
    return bpnet_ensemble(n_members, seed, **{**sizes, **kw})


def small_chrombpnets(n_members: int = 1, seed: int = 0) -> list[nn.Module]:
    from deepmr_dist.models.bpnet import chrombpnet_ensemble

    return chrombpnet_ensemble(
        n_members, seed, tasks=("K562", "HepG2"), n_filters=8, n_layers=3, bias_filters=4, bias_layers=2, trimming=10,
        profile_window=20,
    )


def weights(member: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in member.state_dict().values()]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(weights(a), weights(b), strict=True))


# --------------------------------------------------------------------------- DeepSEA-style


def test_deepsea__ism_of_tasks_chosen_by_name_with_sigmoid_matches_brute_force() -> None:
    members = deepsea_ensemble(2, 3, length=64, n_tasks=len(TASK_NAMES), **SMALL_DEEPSEA)
    wanted = ["cell17|GATA1", "cell02|DNase", "cell39|TAL1"]
    head = head_for_tasks(TASK_NAMES, wanted, transform="sigmoid")
    assert head.tasks == tuple(TASK_NAMES.index(n) for n in wanted) and head.names(len(TASK_NAMES)) == wanted
    seqs = random_seqs(2, 64, 1)
    ref, mut = check_ism(members, head, seqs)
    # independent reading of the same tasks: sigmoid of the chosen logits
    with torch.no_grad():
        logits = members[1](batch(seqs)).numpy()
    expected = 1 / (1 + np.exp(-logits[:, [TASK_NAMES.index(n) for n in wanted]]))
    np.testing.assert_allclose(ref[:, 1], expected, rtol=1e-5)
    assert ref.shape == (2, 2, 3) and mut.shape == (2, 2, 64, 4, 3)
    assert np.all((mut[~np.isnan(mut)] > 0) & (mut[~np.isnan(mut)] < 1))


def test_deepsea__default_sizes_are_deepseas_and_short_inputs_are_errors() -> None:
    model = DeepSEA()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.out_channels, c.kernel_size[0]) for c in convs] == [(320, 8), (480, 8), (960, 8)]
    dense = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(53 * 960, 925), (925, 919)]  # DeepSEA's 1000 bp
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == [0.2, 0.2, 0.5]
    with pytest.raises(InputError, match="length 30 is too short"):
        DeepSEA(30, 5, **SMALL_DEEPSEA)
    with pytest.raises(InputError, match="one probability in \\[0, 1\\) per block"):
        DeepSEA(64, 5, filters=(4, 4), dropout=(0.1,))


def test_head_for_tasks__unknown_names_suggest_close_matches() -> None:
    with pytest.raises(InputError, match=r"'cell05\|gata1' \(did you mean 'cell05\|GATA1'"):
        head_for_tasks(TASK_NAMES, ["cell05|DNase", "cell05|gata1"])
    with pytest.raises(InputError, match=r"unknown task\(s\): 'zzz' \(the model has 320 tasks\)"):
        head_for_tasks(TASK_NAMES, ["zzz"])
    with pytest.raises(InputError, match="chosen more than once"):
        head_for_tasks(TASK_NAMES, ["cell01|CTCF", "cell01|CTCF"])
    with pytest.raises(InputError, match="not as one string"):
        head_for_tasks(TASK_NAMES, "cell01|CTCF")
    with pytest.raises(InputError, match="no tasks chosen"):
        head_for_tasks(TASK_NAMES, [])
    with pytest.raises(InputError, match=r"repeat \['a'\]"):
        head_for_tasks(["a", "b", "a"], ["b"])
    with pytest.raises(InputError, match="unknown transform 'softmax'; valid: none, sigmoid, log1p"):
        head_for_tasks(TASK_NAMES, None, transform="softmax")
    everything = head_for_tasks(TASK_NAMES)
    assert everything.tasks == tuple(range(320)) and everything.transform == "none"


# --------------------------------------------------------------------------- BPNet / ChromBPNet


@needs_bpnet
def test_bpnet__counts_and_profile_heads_match_brute_force() -> None:
    from deepmr_dist.models.bpnet import bpnet_head

    members = small_bpnets(2, seed=4)
    names = members[0].task_names
    seqs = random_seqs(2, 60, 2)
    counts_head = bpnet_head(names, ["Sox2", "Oct4"])
    profile_head = bpnet_head(names, readout="profile")
    assert counts_head.output_index == 1 and counts_head.names(2) == ["Sox2", "Oct4"]
    ref_counts, _ = check_ism(members, counts_head, seqs)
    ref_profile, _ = check_ism(members, profile_head, seqs)
    # independent meaning of both readouts, from each task's bpnet-lite model on its own
    x = batch(seqs)
    with torch.no_grad():
        for t, tower in enumerate(members[0].towers):
            logits, log_counts = tower(x)
            np.testing.assert_allclose(ref_counts[:, 0, 1 - t], log_counts[:, 0].numpy(), rtol=1e-5)
            assert logits.shape == (2, 2, 40)  # 60 bp - 2 x trimming 10
            reads = torch.softmax(logits.reshape(2, -1), dim=-1).reshape(2, 2, 40) * log_counts.exp()[:, :, None]
            window_reads = reads[:, :, 10:30].sum(dim=(1, 2))  # central 20 of 40 positions, both strands
            np.testing.assert_allclose(ref_profile[:, 0, t], window_reads.log().numpy(), rtol=1e-5)


@needs_bpnet
def test_bpnet__control_tracks_are_zeros_and_whole_window_profile_equals_counts() -> None:
    member = small_bpnets(1, seed=5, n_control_tracks=2, profile_window=None)[0]
    x = batch(random_seqs(3, 70, 3))
    with torch.no_grad():
        profile, log_counts, profile_log_counts = member(x)
        for t, tower in enumerate(member.towers):
            logits, counts = tower(x, torch.zeros(3, 2, 70))
            torch.testing.assert_close(profile[:, 2 * t : 2 * t + 2], logits, rtol=0, atol=0)
            torch.testing.assert_close(log_counts[:, t], counts[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(profile_log_counts, log_counts, rtol=1e-6, atol=1e-6)


@needs_bpnet
def test_chrombpnet__counts_and_profile_heads_match_brute_force() -> None:
    from deepmr_dist.models.bpnet import bpnet_head

    members = small_chrombpnets(1, seed=6)
    seqs = random_seqs(2, 50, 4)
    ref, _ = check_ism(members, bpnet_head(members[0].task_names), seqs)
    check_ism(members, bpnet_head(members[0].task_names, ["HepG2"], readout="profile"), seqs)
    # ChromBPNet's counts: accessibility and bias counts added in linear space
    with torch.no_grad():
        tower = members[0].towers[1]
        total = tower.accessibility(batch(seqs))[1].exp() + tower.bias(batch(seqs))[1].exp()
    np.testing.assert_allclose(ref[:, 0, 1], total[:, 0].log().numpy(), rtol=1e-5)


@needs_bpnet
def test_bpnet__input_length_trimming_and_readout_errors() -> None:
    from deepmr_dist.models.bpnet import BPNetTasks, bpnet_head

    member = small_bpnets(1)[0]  # trimming 10, window 20
    assert member.output_length(1000) == 980 and member.output_length(40) == 20
    with pytest.raises(InputError, match="39 bp are too short.*at least 40 bp"):
        member.output_length(39)
    default_trim = bpnetlite.BPNet(n_filters=4, n_layers=8, n_control_tracks=0, verbose=False)  # 2114 -> 1000
    with pytest.raises(InputError, match="trimming 557"):
        BPNetTasks([default_trim], ["a"]).output_length(1000)
    other = bpnetlite.BPNet(n_filters=4, n_layers=2, n_control_tracks=0, trimming=3, verbose=False)
    with pytest.raises(InputError, match="trimming must be >= 0, got -1"):
        small_bpnets(1, trimming=-1)
    with pytest.raises(InputError, match="share trimming"):
        BPNetTasks([member.towers[0], other], ["a", "b"])
    with pytest.raises(InputError, match="is a Linear, not a bpnet-lite"):
        BPNetTasks([nn.Linear(2, 2)], ["a"])
    with pytest.raises(InputError, match="one unique task name per model"):
        BPNetTasks([other, other], ["a", "a"])
    with pytest.raises(InputError, match="unknown BPNet readout 'logits'"):
        bpnet_head(member.task_names, readout="logits")
    with pytest.raises(InputError, match=r"'oct4' \(did you mean 'Oct4'\?\)"):
        bpnet_head(member.task_names, ["oct4"])


@needs_bpnet
def test_bpnet_ensemble__zero_argument_entry_point_is_the_papers_1kb_setting() -> None:
    from deepmr_dist.models.bpnet import PAPER_TFS, bpnet_head

    members = load_members(ModelSpec(("deepmr_dist.models.bpnet:bpnet_ensemble",)))
    assert len(members) == 5 and all(m.task_names == PAPER_TFS for m in members)
    assert members[0].output_length(1000) == 1000
    x = batch(random_seqs(1, 1000, 5))
    with torch.inference_mode():
        out = members[0](x)
    assert [tuple(t.shape) for t in out] == [(1, 8, 1000), (1, 4), (1, 4)]
    assert bpnet_head(PAPER_TFS)(out, 1).shape == (1, 4)


@needs_bpnet
def test_load_bpnet_checkpoints__whole_model_files_round_trip_and_bad_files(tmp_path) -> None:
    from deepmr_dist.models.bpnet import load_bpnet_checkpoint, load_bpnet_checkpoints

    bpnets, chroms = small_bpnets(2, seed=8), small_chrombpnets(1, seed=9)
    bpnets[0].towers[0].logger.start()
    bpnets[0].towers[0].logger.add([0, 1, 0.5, 0.1, 2.0, 1.0, 2.5, np.float64(0.3), np.float32(0.2), 1.5, True])
    paths: dict[str, list[str]] = {"Oct4": [], "Sox2": []}
    for i, member in enumerate(bpnets):
        for task, tower in zip(member.task_names, member.towers):
            paths[task].append(str(tmp_path / f"{task}-{i}.torch"))
            torch.save(tower.train(), paths[task][-1])  # as bpnet-lite's fit writes them
    loaded = load_bpnet_checkpoints(paths, profile_window=20)
    x = batch(random_seqs(2, 50, 6))
    with torch.inference_mode():
        for original, member in zip(bpnets, loaded):
            assert not member.training and member.task_names == ("Oct4", "Sox2")
            for got, want in zip(member(x), original.eval()(x)):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    chrom_path = tmp_path / "chrom.torch"
    torch.save(chroms[0].towers[0], chrom_path)
    chrom = load_bpnet_checkpoint(chrom_path, trimming=0)
    assert chrom.accessibility.trimming == chrom.bias.trimming == 0
    assert load_bpnet_checkpoints({"a": [paths["Oct4"][0]]}, trimming=5)[0].output_length(100) == 90
    with pytest.raises(InputError, match="same number"):
        load_bpnet_checkpoints({"Oct4": paths["Oct4"], "Sox2": paths["Sox2"][:1]})
    with pytest.raises(InputError, match="missing.torch does not exist"):
        load_bpnet_checkpoint(tmp_path / "missing.torch")
    state = tmp_path / "state.pt"
    torch.save(bpnets[0].towers[0].state_dict(), state)
    with pytest.raises(InputError, match=f"{state} is a state dict"):
        load_bpnet_checkpoint(state)
    other = tmp_path / "sequential.pt"
    torch.save(nn.Sequential(nn.Conv1d(4, 2, 3)), other)
    with pytest.raises(InputError, match="holds torch.nn.modules.container.Sequential"):
        load_bpnet_checkpoint(other)


# --------------------------------------------------------------------------- seeds and incremental ISM


def _factories() -> list:
    cases = [pytest.param(lambda n, s: deepsea_ensemble(n, s, length=64, n_tasks=20, **SMALL_DEEPSEA), id="deepsea")]
    cases += [
        pytest.param(small_bpnets, id="bpnet", marks=needs_bpnet),
        pytest.param(small_chrombpnets, id="chrombpnet", marks=needs_bpnet),
    ]
    return cases


@pytest.mark.parametrize("factory", _factories())
def test_seeded_factories__same_seed_same_members_other_seed_other_members(factory) -> None:
    state = torch.random.get_rng_state()
    a, b, c = factory(2, 11), factory(2, 11), factory(3, 12)
    assert torch.equal(torch.random.get_rng_state(), state), "the global torch random state must be untouched"
    assert same_weights(a[0], b[0]) and same_weights(a[1], b[1])
    assert not same_weights(a[0], a[1])
    assert not any(same_weights(x, y) for x in a for y in c)
    assert same_weights(factory(1, 11)[0], a[0]), "member i must not depend on the ensemble size"
    with pytest.raises(InputError, match="at least one member"):
        factory(0, 11)


def _incremental_cases() -> list:
    deepsea = pytest.param(
        lambda: deepsea_ensemble(1, 13, length=64, n_tasks=20, **SMALL_DEEPSEA),
        head_for_tasks([f"t{i}" for i in range(20)], ["t3", "t17"], transform="sigmoid"),
        64,
        id="deepsea",
    )
    bpnet = [
        pytest.param(lambda: small_bpnets(1, 14), OutputHead(output_index=i), 60, id=f"bpnet-{name}", marks=needs_bpnet)
        for i, name in ((1, "counts"), (2, "profile"))
    ]
    control = pytest.param(
        lambda: small_bpnets(1, 15, n_control_tracks=2),
        OutputHead(output_index=2),
        60,
        id="bpnet-controls",
        marks=needs_bpnet,
    )
    chrom = pytest.param(
        lambda: small_chrombpnets(1, 16), OutputHead(output_index=1), 50, id="chrombpnet", marks=needs_bpnet
    )
    return [deepsea, *bpnet, control, chrom]


@pytest.mark.parametrize(("build", "head", "length"), _incremental_cases())
def test_incremental_runner__equals_full_recompute_or_falls_back(build, head, length) -> None:
    members = build()
    runners = [make_runner(m, length, incremental=True, head=head) for m in members]  # skips unread outputs
    assert all(isinstance(r, (IncrementalRunner, FullRecompute)) for r in runners)
    if not isinstance(members[0], DeepSEA):
        assert all(isinstance(r, IncrementalRunner) for r in runners), "BPNet towers side by side stay incremental"
    seqs = random_seqs(2, length, 7)
    ref_i, mut_i = saturation_mutagenesis(runners, head, batch(seqs), mutant_batch=101)
    ref_f, mut_f = engine(members, head, seqs, incremental=False)
    assert_close(ref_i.numpy(), ref_f)
    assert_close(mut_i.numpy(), mut_f)
