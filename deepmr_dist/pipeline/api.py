"""The Python API behind ``deepmr run`` and ``deepmr predict``, each as short as its command.

:func:`run` does what ``deepmr run PIPELINE.yaml`` does; :func:`predict` what
``deepmr predict`` does, returning the store's ``ism`` group lazily. Both start
an embedded cluster when no client is given. ``deepmr_dist`` exports them
lazily, with the stages (``effects``, ``local_ce``, ``global_ce``) and
``open_run``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deepmr_dist.pipeline.config import PipelineConfig
from deepmr_dist.pipeline.config_types import ClusterSettings, load_config, parse_config

if TYPE_CHECKING:  # imported lazily: loading a pipeline needs neither torch nor distributed
    import xarray as xr
    from distributed import Client

    from deepmr_dist.models.ensemble import ModelSpec
    from deepmr_dist.pipeline.runner import PipelineResult
    from deepmr_dist.stages.predict import ISMSettings


STUDY_KEYS = frozenset({"scenarios", "rounds", "members", "concurrent_rounds", "motifs", "generator", "training", "analysis"})
"""Top-level keys of :class:`deepmr_dist.pipeline.study.StudyConfig` that a pipeline config does not have
(it has ``sequences`` and ``model`` instead)."""


def is_study(path: str | Path) -> bool:
    """Whether the YAML at ``path`` is a simulation study (``deepmr simulate``'s config) rather than a pipeline.

    Decided on its top-level keys (:data:`STUDY_KEYS`); an unreadable file is left
    to :func:`load_pipeline` to report.
    """
    from deepmr_dist.pipeline.config_types import read_yaml_mapping

    from deepmr_dist.errors import InputError

    try:
        data = read_yaml_mapping(Path(path))
    except InputError:  # the loader that follows reports it
        return False
    keys = set(data) if isinstance(data, dict) else set()
    return bool(keys & STUDY_KEYS) and not keys & {"sequences", "model"}


def load_study(
    path: str | Path,
    *,
    rounds: int | None = None,
    cluster: str | Mapping[str, Any] | None = None,
):
    """The validated study config at ``path`` with the command line's overrides applied (``cluster`` as in
    :func:`load_pipeline`)."""
    from deepmr_dist.pipeline.config import StudyConfig

    config = load_config(Path(path), StudyConfig)
    overrides: dict = {"rounds": rounds} if rounds is not None else {}
    overrides["cluster"] = config.cluster.with_overrides(_cluster_fields(cluster)).model_dump(exclude_unset=True)
    return parse_config({**config.model_dump(), **overrides}, StudyConfig, f"{path} with the command line's overrides")


def _cluster_fields(cluster: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``cluster`` as :class:`~deepmr_dist.pipeline.config_types.ClusterSettings` fields: an address, or fields."""
    if cluster is None:
        return {}
    return {"address": cluster} if isinstance(cluster, str) else dict(cluster)


def load_pipeline(
    config_or_path: PipelineConfig | str | Path,
    *,
    store: str | None = None,
    cluster: str | Mapping[str, Any] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> PipelineConfig:
    """The validated pipeline, with relative paths taken from the YAML's folder and the overrides applied.

    Parameters
    ----------
    config_or_path : PipelineConfig or path
        A pipeline YAML (e.g. ``pipelines/quickstart.yaml``) or an already validated config.
    store : str, optional
        Override the pipeline's store.
    cluster : str or mapping, optional
        Override the pipeline's cluster: an address (``"local"``, ``"slurm"`` or a scheduler
        address), or fields of its ``cluster:`` section (``{"kind": "slurm", "jobs": 4}``, TLS files, ...).
    storage_options : dict, optional
        Override the pipeline's fsspec options of the store and outputs.

    Raises
    ------
    InputError
        If the YAML cannot be read or is not a valid pipeline (naming the fields).
    """
    if isinstance(config_or_path, PipelineConfig):
        config = config_or_path
    else:
        path = Path(config_or_path)
        config = load_config(path, PipelineConfig).resolve_paths(path.parent)
    update: dict = {"cluster": config.cluster.with_overrides(_cluster_fields(cluster))}
    if store:
        update["store"] = store
    if storage_options is not None:
        update["storage_options"] = storage_options
    return config.model_copy(update=update)


@contextlib.contextmanager
def _client(client: Client | None, settings: ClusterSettings, verbose: bool) -> Iterator[Client]:
    """``client`` itself, or one of ``settings`` (embedded, connected or SLURM) for the duration of the block."""
    if client is not None:
        yield client
        return
    from deepmr_dist.cluster import connect

    with connect(**settings.connect_options(), verbose=verbose) as own:
        yield own


def run(
    config_or_path: PipelineConfig | str | Path,
    *,
    store: str | None = None,
    storage_options: dict[str, Any] | None = None,
    cluster: str | Mapping[str, Any] | None = None,
    client: Client | None = None,
    progress: bool = True,
    overwrite: bool = False,
    **run_options: Any,
) -> PipelineResult:
    """Run a pipeline, as ``deepmr run`` does: every stage, skipping those already done.

    Parameters
    ----------
    config_or_path : PipelineConfig or path
        A pipeline YAML or a validated config.
    store : str, optional
        Override the pipeline's store.
    storage_options : dict, optional
        Override the pipeline's fsspec options of the store and outputs.
    cluster : str or mapping, optional
        ``"local"`` (an embedded cluster), ``"slurm"``, a scheduler address, or fields of the ``cluster:``
        section (:func:`load_pipeline`); default the pipeline's (itself ``"local"`` by default); ignored with ``client``.
    client : distributed.Client, optional
        Run on this client's cluster.
    progress : bool
        Progress bars on stderr.
    overwrite : bool
        Replace a deepmr store made by another run.
    **run_options
        ``verify``, ``break_lock``, ``lock_timeout`` of
        :func:`deepmr_dist.pipeline.runner.run_pipeline`.

    Returns
    -------
    PipelineResult
        The store, the output folder, the local and global tables and the true
        global CE where the pipeline simulates.

    Examples
    --------
    >>> import deepmr_dist as dmr
    >>> result = dmr.run("pipelines/quickstart.yaml")  # doctest: +SKIP
    >>> result.global_table  # doctest: +SKIP
    """
    from deepmr_dist.pipeline.runner import run_pipeline

    config = load_pipeline(config_or_path, store=store, cluster=cluster, storage_options=storage_options)
    with _client(client, config.cluster, progress) as c:
        return run_pipeline(config, client=c, progress=progress, overwrite=overwrite, **run_options)


def predict(
    loci: xr.Dataset,
    model: ModelSpec | str | Sequence[str],
    store: str,
    *,
    client: Client | None = None,
    settings: ISMSettings | None = None,
    overwrite: bool = False,
    progress: bool = True,
    storage_options: dict[str, Any] | None = None,
) -> xr.Dataset:
    """ISM of every locus with every ensemble member into ``store``, as ``deepmr predict`` does.

    Parameters
    ----------
    loci : xarray.Dataset
        Sequences (:func:`deepmr_dist.io.sequence.read_fasta` and friends).
    model : ModelSpec, str or sequence of str
        The ensemble: TorchScript paths and/or ``package.module:factory`` entry points.
    store : str
        Store location (a directory or an fsspec URL).
    client : distributed.Client, optional
        Run on this client's cluster; default an embedded cluster.
    settings : ISMSettings, optional
        Head, chunking and batching; default every task of the model.
    overwrite, progress : bool
        As ``deepmr predict``.
    storage_options : dict, optional
        fsspec options of a remote ``store`` (s3fs's ``endpoint_url``, ...); credentials come from the environment.

    Returns
    -------
    xarray.Dataset
        The store's ``ism`` group, opened lazily; ``attrs["predict_report"]`` holds
        what the run did (loci computed and skipped, timings).
    """
    from deepmr_dist.models.ensemble import ModelSpec
    from deepmr_dist.stages.predict import ISMSettings
    from deepmr_dist.stages.predict import predict as predict_stage

    if not isinstance(model, ModelSpec):
        model = ModelSpec((model,) if isinstance(model, str) else tuple(model))
    with _client(client, ClusterSettings(), progress) as c:
        return predict_stage(loci, model, store, client=c, settings=settings or ISMSettings(),
                             overwrite=overwrite, progress=progress, storage_options=storage_options)  # fmt: skip
