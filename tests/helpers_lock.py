"""A store lock held by another thread of this process, for tests of what a second writer is told."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from deepmr_dist.io.lock import lock


@contextmanager
def lock_held_by_a_thread(path: str, holder: str, **options: Any) -> Iterator[None]:
    """``lock(path, holder, **options)`` taken by a thread started here and held until the block exits.

    The thread releases the lock and is joined on exit (also when the block raises).
    """
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with lock(path, holder, **options):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(60), f"the thread did not take the lock of {path}"
        yield
    finally:
        release.set()
        thread.join(60)
