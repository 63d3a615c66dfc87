"""Progress bars of the long computations (effects, MR, meta): one tqdm line on stderr each.

A computation shows a bar when it runs on a distributed client inside
:func:`shown`: the pipeline's runner enters it for every stage (``deepmr run``;
``-q`` gives ``None``, no bar), ``deepmr effects`` for its write. Store writes
(:func:`deepmr_dist.io.store.write_group`) wait through :func:`wait`, the other
computations of the stages (the pooled statistics of the instrument rule, the
local CEs the meta-analysis reads) through :func:`compute`.

The bar counts the computation's tasks as the scheduler finishes them: it is
distributed's console progress bar
(:class:`distributed.diagnostics.progressbar.TextProgressBar`, fed by the
scheduler's progress plugin), drawn with tqdm on stderr instead of its own line
on stdout, where results go. It stays at 100 % when the computation finishes
and is cleared when a task fails, so the last line a failed command leaves is
its error. On a local scheduler (no distributed client) nothing is shown.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import dask
from distributed import Client, Future
from distributed.diagnostics.progressbar import TextProgressBar
from tqdm.auto import tqdm

__all__ = ["compute", "shown", "wait"]

_LABEL: ContextVar[str | None] = ContextVar("deepmr_progress_label", default=None)
"""The label of the bars shown now (``None``: no bar)."""


@contextmanager
def shown(label: str | None) -> Iterator[None]:
    """Computations waited for by :func:`wait` or :func:`compute` during the block show a bar named ``label``.

    ``None`` shows none (``--quiet``); blocks nest, the innermost label counts.
    """
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def wait(futures: Future | list[Future], what: str | None = None) -> Any:
    """The result of a future (of a list of futures: their results), shown as a bar of their tasks inside :func:`shown`.

    Parameters
    ----------
    futures
        Futures of one client.
    what
        Added to the bar's label, ``"mr (pooled statistics)"``: which of a stage's computations it is.

    Raises
    ------
    Exception
        Whatever a task raised, as ``Future.result`` raises it.
    """
    many = isinstance(futures, list)
    watched = futures if many else [futures]
    label = _LABEL.get()
    if label is not None and watched:
        _TaskBar(watched, label if what is None else f"{label} ({what})")
    if not many:
        return futures.result()
    return futures[0].client.gather(futures) if futures else []


def compute(*collections: Any, what: str) -> tuple[Any, ...]:
    """``dask.compute(*collections)``; on a distributed client through :func:`wait`, so with a bar inside :func:`shown`.

    Objects that are not dask collections are returned as they are.
    """
    lazy = [i for i, c in enumerate(collections) if dask.is_dask_collection(c)]
    if not lazy:
        return collections
    client = getattr(dask.base.get_scheduler(collections=[collections[i] for i in lazy]), "__self__", None)
    if not isinstance(client, Client):
        return dask.compute(*collections)
    results = list(collections)
    for i, value in zip(lazy, wait(client.compute([collections[i] for i in lazy]), what)):
        results[i] = value
    return tuple(results)


class _TaskBar(TextProgressBar):
    """distributed's console bar drawn by tqdm on stderr; returns once the tasks of ``futures`` finish or one fails."""

    def __init__(self, futures: list[Future], desc: str) -> None:
        client = futures[0].client
        self._desc = desc
        self._bar: tqdm | None = None  # drawn once the scheduler has counted the tasks
        try:
            super().__init__(futures, scheduler=client.scheduler.address, loop=client.loop, complete=True)
        finally:
            if self._bar is not None:
                self._bar.close()

    def _draw_bar(self, remaining: int, all: int, **kwargs: Any) -> None:  # noqa: A002 (distributed's name)
        if self._bar is None:
            self._bar = tqdm(desc=self._desc, total=all, unit="task", file=sys.stderr)
        self._bar.update(all - remaining - self._bar.n)

    def _draw_stop(self, status: str, **kwargs: Any) -> None:
        if self._bar is not None:
            self._bar.leave = status == "finished"  # a failed computation's bar is cleared before its error line
