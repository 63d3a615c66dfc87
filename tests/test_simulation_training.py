"""Training the simulation CNN: learning, target scaling, schedule, early stopping, determinism, Dask, weight files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmr_dist.errors import InputError
from deepmr_dist.models.architectures import SimulationCNN, load_simulation_cnns
from deepmr_dist.simulation.generator import SimulationConfig, one_hot, select_split, simulate_round
from deepmr_dist.simulation.training import (
    TrainingSettings,
    fold_target_scaling,
    train_ensemble,
    train_member,
    validation_split,
)

TINY = TrainingSettings(epochs=4, batch_size=100, learning_rate=0.01, patience=10, one_cycle=False)


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


def test_training__a_member_learns_an_unconfounded_round_and_its_weights_predict_labels():
    config = SimulationConfig(n_train=3000, n_test=0, n_calibration=0)
    ds = select_split(simulate_round("unconfounded", 0, seed=0, config=config), "train")
    x, y = one_hot(ds["sequence"].values), ds["label"].values
    settings = TrainingSettings(epochs=15)
    state, history = train_member(x, y, seed=0, settings=settings, threads=1)
    val_index, _ = validation_split(len(x), 0, settings.validation_fraction)
    model = SimulationCNN()
    model.load_state_dict(state)
    with torch.no_grad():
        predicted = model.eval()(torch.from_numpy(x[val_index])).numpy()
    mse = ((predicted - y[val_index]) ** 2).mean(axis=0)
    # the saved weights (scaling folded in) predict labels with the MSE training measured on standardised targets
    np.testing.assert_allclose(mse, history.best_val_mse, rtol=1e-4)
    np.testing.assert_allclose(history.val_loss, np.mean(np.array(history.val_mse) / np.square(history.target_scale),
                                                         axis=1), rtol=1e-5)
    # learns: here about 0.04 and 0.12 of the label variances (80 exposure, 800 outcome); noise alone is about 0.001
    assert np.all(mse < 0.25 * y[val_index].var(axis=0))


def test_training__folding_the_target_scaling_reproduces_the_standardised_model():
    torch.manual_seed(0)
    model = SimulationCNN()
    x = torch.from_numpy(one_hot(np.random.default_rng(0).integers(0, 4, size=(64, 100))))
    with torch.no_grad():
        model.train()(x)  # batch norms get running statistics other than 0 and 1
    model.eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    mean, scale = torch.tensor([12.1, 21.2]), torch.tensor([9.1, 28.2])
    folded = fold_target_scaling(state, mean, scale)
    assert _same_weights(state, model.state_dict())  # input left alone
    assert {k for k in state if not torch.equal(state[k], folded[k])} == {"head.5.weight", "head.5.bias"}
    plain = SimulationCNN()
    plain.load_state_dict(folded)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x) * scale + mean, rtol=1e-5, atol=1e-5)


def test_training__one_cycle_learning_rate_and_the_papers_settings():
    settings = TrainingSettings(epochs=10, learning_rate=0.05)
    rates = np.array([settings.learning_rate_at(step, steps_per_epoch=10) for step in range(100)])
    assert rates[0] == pytest.approx(0.05 / 25)
    assert int(np.argmax(rates)) == 30 and rates[30] == pytest.approx(0.05)
    assert np.all(np.diff(rates[:31]) > 0) and np.all(np.diff(rates[30:]) < 0)
    assert rates[99] == pytest.approx(0.05 / 2.5e5)
    paper = TrainingSettings.paper()
    assert (paper.epochs, paper.batch_size, paper.learning_rate, paper.validation_fraction, paper.patience,
            paper.one_cycle, paper.standardize) == (100, 1000, 1e-3, 0.15, 10, False, False)
    assert paper.learning_rate_at(500, steps_per_epoch=9) == 1e-3


def test_training__one_cycle_patience_counts_only_after_the_rise(data):
    settings = TrainingSettings(epochs=20, patience=1)
    _, history = train_member(*data, seed=0, settings=settings, threads=1)
    rise, losses = 6, history.val_loss  # ceil(0.3 * 20) epochs while the rate rises
    assert any(losses[e] >= min(losses[:e]) for e in range(1, rise))  # no improvement during the rise ...
    assert rise < len(losses) < settings.epochs  # ... did not stop the run, the first one after it did
    assert losses[-1] >= min(losses[:-1]) and all(losses[e] < min(losses[:e]) for e in range(rise, len(losses) - 1))


def test_training__without_standardizing_the_loss_is_the_label_mse(data):
    settings = TrainingSettings(epochs=2, batch_size=100, learning_rate=1e-3, one_cycle=False, standardize=False)
    _, history = train_member(*data, seed=0, settings=settings, threads=1)
    assert history.target_mean == [0.0, 0.0] and history.target_scale == [1.0, 1.0]
    np.testing.assert_allclose(history.val_loss, np.mean(history.val_mse, axis=1), rtol=1e-6)


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
    # a constant rate: a one-cycle schedule spans `epochs`, so the truncated run below would follow other rates
    noisy = TrainingSettings(epochs=40, batch_size=50, learning_rate=0.05, patience=3, one_cycle=False)
    state, history = train_member(*data, seed=0, settings=noisy, threads=1)
    best = history.best_epoch
    assert len(history.val_loss) == best + 1 + noisy.patience < noisy.epochs  # stopped early
    assert all(loss >= history.val_loss[best] for loss in history.val_loss[best + 1 :])
    # training is deterministic, so a run that ends at the best epoch holds the kept weights
    truncated, _ = train_member(*data, seed=0, settings=TrainingSettings(
        epochs=best + 1, batch_size=50, learning_rate=0.05, patience=3, one_cycle=False), threads=1)
    assert _same_weights(state, truncated)


def test_training__ensemble_weights_load_with_weights_only(data, tmp_path):
    members = train_ensemble(*data, n_members=2, seeds=[7, 8], out_dir=tmp_path, settings=TINY)
    assert [m.path.name for m in members] == ["member-0.pt", "member-1.pt"]
    assert (tmp_path / "member-0.json").exists()
    state = torch.load(members[0].path, weights_only=True)
    expected, _ = train_member(*data, seed=7, settings=TINY, threads=1)
    assert _same_weights(state, expected)
    models = load_simulation_cnns([m.path for m in members])
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
        load_simulation_cnns([path])


def test_training__bad_arguments_raise(data, tmp_path):
    with pytest.raises(InputError, match="seeds"):
        train_ensemble(*data, n_members=3, seeds=[1, 2], out_dir=tmp_path)
    with pytest.raises(InputError, match=r"\(n, 4, L\)"):
        train_member(data[0][:, :3], data[1], seed=0)


def test_training__dask_cluster_gives_the_same_weights_as_in_process(data, tmp_path):
    from distributed import Client, LocalCluster

    local = train_ensemble(*data, n_members=2, seeds=[1, 2], out_dir=tmp_path / "local", settings=TINY)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        remote = train_ensemble(*data, n_members=2, seeds=[1, 2], client=client, out_dir=tmp_path / "dask",
                                settings=TINY)
    # Exact: train_member pins torch to `threads` (1) in this process and on the workers alike, and the
    # batches come from the seed, so both run the same float32 operations on the same shapes.
    for a, b in zip(local, remote, strict=True):
        assert _same_weights(torch.load(a.path, weights_only=True), torch.load(b.path, weights_only=True))
        assert a.history.val_loss == b.history.val_loss
