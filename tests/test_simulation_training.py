"""Training the simulation CNN: learning, early stopping, determinism, Dask, weight files."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deepmr_dist.errors import InputError
from deepmr_dist.models.architectures import SimulationCNN
from deepmr_dist.simulation.generator import SimulationConfig, one_hot, simulate_round
from deepmr_dist.simulation.training import (
    TrainingSettings,
    _cluster_has_gpus,
    load_ensemble,
    train_ensemble,
    train_member,
)

TINY = TrainingSettings(epochs=4, batch_size=100, learning_rate=0.01, patience=10)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    ds = simulate_round(3, 0, seed=4, config=SimulationConfig(n_train=400, n_test=0))
    return one_hot(ds["sequence"].values), ds["label"].values


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training__lowers_validation_loss(data):
    _, history = train_member(*data, seed=0, settings=TINY, threads=1)
    assert len(history.val_loss) == 4
    assert min(history.val_loss[1:]) < 0.8 * history.val_loss[0]
    assert history.best_epoch == int(np.argmin(history.val_loss))


def test_training__same_seed_same_weights_and_other_seed_other_weights(data):
    first, _ = train_member(*data, seed=3, settings=TINY, threads=1)
    again, _ = train_member(*data, seed=3, settings=TINY, threads=1)
    other, _ = train_member(*data, seed=4, settings=TINY, threads=1)
    assert _same_weights(first, again)
    assert not _same_weights(first, other)


def test_training__leaves_global_torch_random_state_alone(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_member(*data, seed=0, settings=TrainingSettings(epochs=1, batch_size=200), threads=1)
    assert torch.equal(torch.rand(3), expected)


def test_training__early_stopping_restores_the_best_epoch(data):
    noisy = TrainingSettings(epochs=40, batch_size=50, learning_rate=0.05, patience=3)
    state, history = train_member(*data, seed=0, settings=noisy, threads=1)
    best = history.best_epoch
    assert len(history.val_loss) == best + 1 + noisy.patience < noisy.epochs  # stopped early
    assert all(loss >= history.val_loss[best] for loss in history.val_loss[best + 1 :])
    # training is deterministic, so a run that ends at the best epoch holds the kept weights
    truncated, _ = train_member(*data, seed=0, settings=TrainingSettings(
        epochs=best + 1, batch_size=50, learning_rate=0.05, patience=3), threads=1)
    assert _same_weights(state, truncated)


def test_training__ensemble_weights_load_with_weights_only(data, tmp_path):
    members = train_ensemble(*data, n_members=2, seeds=[7, 8], out_dir=tmp_path, settings=TINY)
    assert [m.path.name for m in members] == ["member-0.pt", "member-1.pt"]
    assert (tmp_path / "member-0.json").exists()
    state = torch.load(members[0].path, weights_only=True)
    expected, _ = train_member(*data, seed=7, settings=TINY, threads=1)
    assert _same_weights(state, expected)
    models = load_ensemble([m.path for m in members])
    assert all(isinstance(model, SimulationCNN) and not model.training for model in models)
    reference = SimulationCNN()
    reference.load_state_dict(state)
    x = torch.from_numpy(data[0][:20])
    with torch.no_grad():
        assert torch.equal(models[0](x), reference.eval()(x))


def test_training__load_rejects_a_file_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="junk.pt"):
        load_ensemble([path])


def test_training__bad_arguments_raise(data, tmp_path):
    with pytest.raises(InputError, match="seeds"):
        train_ensemble(*data, n_members=3, seeds=[1, 2], out_dir=tmp_path)
    with pytest.raises(InputError, match=r"\(n, 4, L\)"):
        train_member(data[0][:, :3], data[1], seed=0)


def test_training__gpu_resources_requested_only_when_workers_declare_them():
    def client(resources):
        workers = {f"w{i}": {"resources": r} for i, r in enumerate(resources)}
        return SimpleNamespace(scheduler_info=lambda **_: {"workers": workers})

    assert _cluster_has_gpus(client([{"GPU": 1}, {"GPU": 1}]))
    assert not _cluster_has_gpus(client([{}, {}]))


def test_training__dask_cluster_gives_the_same_weights_as_in_process(data, tmp_path):
    from distributed import Client, LocalCluster

    local = train_ensemble(*data, n_members=2, seeds=[1, 2], out_dir=tmp_path / "local", settings=TINY)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        remote = train_ensemble(*data, n_members=2, seeds=[1, 2], client=client, out_dir=tmp_path / "dask",
                                settings=TINY)
    for a, b in zip(local, remote, strict=True):
        assert _same_weights(torch.load(a.path, weights_only=True), torch.load(b.path, weights_only=True))
        assert a.history.val_loss == b.history.val_loss
