"""Training the paper's simulation CNN, one member or a whole ensemble.

Settings are the paper's: MSE loss, Adam (lr 1e-3), batch 1000, a 15 %
validation split, up to 100 epochs, early stopping with patience 10 on the
validation loss, and the best epoch's weights restored.

A member is a pure function of (data, seed, settings, torch thread count) on
CPU: the seed fixes the validation split, the initial weights and the batch
order, and global torch random state is left untouched. CPU reductions can
depend on the number of threads, so the ensemble trainer pins it (default 1)
in-process and on workers alike; GPU kernels are not guaranteed bitwise
reproducible.

Weights are written as plain state dicts (``torch.save(model.state_dict())``)
and read back with ``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from deepmr_dist.errors import InputError
from deepmr_dist.models.architectures import SimulationCNN


@dataclass(frozen=True)
class TrainingSettings:
    """Optimization settings; the defaults are the paper's."""

    epochs: int = 100
    batch_size: int = 1000
    learning_rate: float = 1e-3
    validation_fraction: float = 0.15
    patience: int = 10

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1 or self.learning_rate <= 0:
            raise InputError(f"invalid training settings {self}")
        if not 0.0 < self.validation_fraction < 1.0:
            raise InputError(f"validation_fraction must lie in (0, 1), got {self.validation_fraction}")


@dataclass
class TrainingHistory:
    """Per-epoch losses of one member and where training stopped.

    Attributes
    ----------
    train_loss, val_loss
        Mean squared error per epoch (training loss averaged over batches in
        training mode; validation loss over the whole split in eval mode).
    best_epoch
        0-based epoch whose weights were kept.
    seconds
        Wall time of the training loop.
    """

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = -1
    seconds: float = 0.0

    @property
    def best_val_loss(self) -> float:
        """Validation loss of the kept weights."""
        return self.val_loss[self.best_epoch]


@dataclass(frozen=True)
class TrainedMember:
    """One ensemble member on disk."""

    index: int
    seed: int
    path: Path
    history: TrainingHistory


def train_member(
    x: np.ndarray,
    y: np.ndarray,
    seed: int,
    *,
    settings: TrainingSettings | None = None,
    device: str | None = None,
    threads: int | None = None,
) -> tuple[dict[str, torch.Tensor], TrainingHistory]:
    """Train one :class:`~deepmr_dist.models.architectures.SimulationCNN`.

    Parameters
    ----------
    x
        ``(n, 4, L)`` one-hot sequences (see :func:`~deepmr_dist.simulation.generator.one_hot`).
    y
        ``(n, n_tasks)`` labels (the Anscombe-transformed counts).
    seed
        Fixes the validation split, initial weights and batch order.
    settings
        Optimization settings; default :class:`TrainingSettings()`.
    device
        Torch device; default ``"cuda"`` when available, else ``"cpu"``.
    threads
        Torch CPU threads for this call (restored afterwards); ``None`` leaves
        the current setting.

    Returns
    -------
    state_dict, history
        The best epoch's weights as CPU tensors, and the loss history.
    """
    settings = TrainingSettings() if settings is None else settings
    x, y = _check_data(x, y)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device is None else device
    n_val = max(1, int(round(settings.validation_fraction * len(x))))
    if len(x) - n_val < 1:
        raise InputError(f"{len(x)} sequences leave none for training after the validation split")
    order = np.random.default_rng(seed).permutation(len(x))
    val_index, train_index = order[:n_val], order[n_val:]
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = SimulationCNN(length=x.shape[2], n_tasks=y.shape[1]).to(device)
            return _fit(model, x, y, train_index, val_index, seed, settings, device)
    finally:
        torch.set_num_threads(previous_threads)


def train_ensemble(
    x: np.ndarray,
    y: np.ndarray,
    n_members: int = 5,
    seeds: Sequence[int] | None = None,
    *,
    client=None,
    out_dir: str | Path,
    settings: TrainingSettings | None = None,
    threads: int = 1,
) -> list[TrainedMember]:
    """Train an ensemble, one member per seed, locally or as Dask tasks.

    Parameters
    ----------
    x, y
        Training data as in :func:`train_member`.
    n_members
        Number of members.
    seeds
        One seed per member; default ``0 .. n_members - 1``.
    client
        A ``dask.distributed.Client``: each member becomes one task. Tasks ask
        for ``resources={"GPU": 1}`` when the cluster's workers declare GPU
        resources, else for none (same code on CPU). ``None`` trains in-process.
    out_dir
        Run directory; member i is written to ``member-<i>.pt`` (state dict)
        with its history in ``member-<i>.json``.
    settings
        Optimization settings; default the paper's.
    threads
        Torch CPU threads per member (in-process and on workers alike, so the
        two give identical weights).

    Returns
    -------
    list of TrainedMember
        In member order.
    """
    seeds = list(range(n_members)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n_members:
        raise InputError(f"got {len(seeds)} seeds for {n_members} members")
    if len(set(seeds)) != len(seeds):
        raise InputError(f"member seeds must differ, got {seeds}")
    x, y = _check_data(x, y)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = {"settings": settings, "threads": threads}
    if client is None:
        results = [train_member(x, y, seed, **options) for seed in seeds]
    else:
        resources = {"GPU": 1} if _cluster_has_gpus(client) else None
        x_future, y_future = client.scatter([x, y], broadcast=True, hash=False)
        futures = [
            client.submit(train_member, x_future, y_future, seed, pure=False, resources=resources, **options)
            for seed in seeds
        ]
        results = client.gather(futures)
    members = []
    for index, (seed, (state, history)) in enumerate(zip(seeds, results)):
        path = out_dir / f"member-{index}.pt"
        torch.save(state, path)
        path.with_suffix(".json").write_text(json.dumps({"seed": seed, **asdict(history)}, indent=1))
        members.append(TrainedMember(index=index, seed=seed, path=path, history=history))
    return members


def load_ensemble(paths: Sequence[str | Path], device: str = "cpu") -> list[SimulationCNN]:
    """Load state dicts written by :func:`train_ensemble` into models in eval mode.

    The architecture (length, filters, width, blocks, hidden size, tasks) is
    read off each state dict's tensor shapes; files are opened with
    ``weights_only=True``.
    """
    models = []
    for path in paths:
        try:
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as err:  # torch.load raises many types (IndexError, UnpicklingError, ...) on a bad file
            raise InputError(f"cannot load weights file {path}: {err}") from err
        try:
            model = SimulationCNN(**_architecture(state))
            model.load_state_dict(state)
        except (KeyError, IndexError, ValueError, RuntimeError) as err:
            raise InputError(f"weights file {path} is not a SimulationCNN state dict: {err}") from err
        models.append(model.to(device).eval())
    return models


def _check_data(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] != 4:
        raise InputError(f"x must be one-hot sequences of shape (n, 4, L), got {x.shape}")
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise InputError(f"y must have shape (n, n_tasks) with n = {x.shape[0]}, got {y.shape}")
    if not np.all(np.isfinite(y)):
        raise InputError("y holds non-finite labels")
    return x, y


def _fit(model: SimulationCNN, x: np.ndarray, y: np.ndarray, train_index: np.ndarray, val_index: np.ndarray,
         seed: int, settings: TrainingSettings, device: str) -> tuple[dict[str, torch.Tensor], TrainingHistory]:
    x_train = torch.from_numpy(x[train_index]).to(device)
    y_train = torch.from_numpy(y[train_index]).to(device)
    x_val = torch.from_numpy(x[val_index]).to(device)
    y_val = torch.from_numpy(y[val_index]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    loss_fn = torch.nn.MSELoss()
    shuffler = torch.Generator().manual_seed(seed)
    history = TrainingHistory()
    best_state, best_loss, waited = None, float("inf"), 0
    started = time.perf_counter()
    for epoch in range(settings.epochs):
        model.train()
        batch_losses = []
        for batch in torch.randperm(len(x_train), generator=shuffler).split(settings.batch_size):
            batch = batch.to(device)
            optimizer.zero_grad()
            loss = loss_fn(model(x_train[batch]), y_train[batch])
            loss.backward()
            optimizer.step()
            batch_losses.append(loss.item())
        val_loss = _evaluate(model, x_val, y_val, settings.batch_size)
        history.train_loss.append(float(np.mean(batch_losses)))
        history.val_loss.append(val_loss)
        if val_loss < best_loss:
            best_loss, best_state, waited = val_loss, copy.deepcopy(model.state_dict()), 0
            history.best_epoch = epoch
        else:
            waited += 1
            if waited >= settings.patience:
                break
    history.seconds = time.perf_counter() - started
    if best_state is None:
        raise InputError(f"training with seed {seed} diverged: the validation loss was never finite")
    return {name: tensor.detach().cpu() for name, tensor in best_state.items()}, history


@torch.no_grad()
def _evaluate(model: SimulationCNN, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    squared = sum(float(((model(xb) - yb) ** 2).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return squared / y.numel()


def _cluster_has_gpus(client) -> bool:
    try:
        info = client.scheduler_info(n_workers=-1)  # newer distributed lists only 5 workers by default
    except TypeError:  # distributed before 2025 has no n_workers and lists all
        info = client.scheduler_info()
    workers = info["workers"].values()
    return any(worker.get("resources", {}).get("GPU", 0) > 0 for worker in workers)


def _architecture(state: dict[str, torch.Tensor]) -> dict[str, int]:
    convs = sorted((k for k in state if k.startswith("features.") and k.endswith(".weight") and state[k].ndim == 3),
                   key=lambda k: int(k.split(".")[1]))
    linears = sorted((k for k in state if k.startswith("head.") and k.endswith(".weight")),
                     key=lambda k: int(k.split(".")[1]))
    n_filters, _, width = state[convs[0]].shape
    hidden, flat = state[linears[0]].shape
    n_blocks = len(convs)
    return {
        "length": flat // n_filters + n_blocks * (width - 1),
        "n_tasks": int(state[linears[-1]].shape[0]),
        "n_filters": int(n_filters),
        "width": int(width),
        "n_blocks": n_blocks,
        "hidden": int(hidden),
    }
