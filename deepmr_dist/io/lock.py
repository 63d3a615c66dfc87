"""One writer per store: an advisory lease (:data:`LOCK_NAME`) in the store's folder.

:func:`lock` holds it for the duration of a writing run, refreshed by a
heartbeat thread; a second writer is refused with one line naming the holder.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from deepmr_dist.errors import StoreError
from deepmr_dist.io.location import filesystem

log = logging.getLogger(__name__)

LOCK_NAME = ".deepmr-lock.json"
"""The lease object in a store's root folder (Zarr ignores it; :func:`deepmr_dist.io.store.inspect_target` does not count it)."""

DEFAULT_LOCK_TIMEOUT = 60.0
"""Seconds without a heartbeat after which a lease is stale and ``--break-lock`` may break it."""


def _pid_namespace() -> str:
    """This process's PID namespace (Linux), so that a pid is compared only within the namespace it belongs to."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] != "Z"  # a zombie is dead


@dataclass(frozen=True)
class Lease:
    """The content of a store's lease (:data:`LOCK_NAME`): who writes the store, since when, last seen when."""

    holder: str
    token: str
    pid: int
    host: str
    pid_namespace: str
    started: float
    heartbeat: float

    @classmethod
    def parse(cls, data: bytes) -> Lease | None:
        """The lease in ``data``, or None if it is not one (damaged, or caught being written)."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def age(self) -> float:
        """Seconds since the last heartbeat, by this machine's clock."""
        return time.time() - self.heartbeat

    def holder_is_gone(self) -> bool:
        """Whether the holder ran on this machine, in this PID namespace, and its process no longer exists."""
        return self.host == socket.gethostname() and self.pid_namespace == _pid_namespace() and not _pid_alive(self.pid)

    def describe(self) -> str:
        started = datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds")
        return f"{self.holder} (pid {self.pid} on {self.host}, since {started}, last heartbeat {self.age():.0f} s ago)"


_HELD: dict[tuple[str, int], StoreLock] = {}
"""Leases held by this process, by (store URL, thread): a writer that calls another (the runner calls
``predict``, which calls ``write_ism_chunk``; ``effects`` calls ``write_group``) holds one lease."""


def _lock_key(fs: fsspec.AbstractFileSystem, root: str) -> tuple[str, int]:
    return fs.unstrip_protocol(root), threading.get_ident()


class StoreLock:
    """An advisory lease on a store, held by one writing run at a time (see :func:`lock`).

    Acquiring creates :data:`LOCK_NAME` in the store's folder (the folder too,
    if there is none yet) by an exclusive create: ``O_EXCL`` on local and
    network filesystems, ``mode="xb"`` on others, which object stores with
    conditional writes (``If-None-Match``; recent s3fs and gcsfs) honour and
    others may not. A heartbeat thread rewrites it every ``timeout / 4``
    seconds. A lease whose holder ran on this machine and is gone is broken at
    once; any other is broken only when asked (``break_stale``) and only once
    its heartbeat is older than ``timeout``, by this machine's clock.
    """

    def __init__(
        self,
        path: str,
        holder: str,
        *,
        timeout: float = DEFAULT_LOCK_TIMEOUT,
        break_stale: bool = False,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.holder = holder
        self.timeout = timeout
        self.break_stale = break_stale
        self.fs, self.root = filesystem(path, storage_options)
        self.lease_path = f"{self.root}/{LOCK_NAME}"
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self.remove_root = False
        """Remove the store's folder with the lease (set by :func:`deepmr_dist.io.store.remove_store`, and when acquiring created it)."""
        self.broken = False
        self.broken_by: Lease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _lease(self) -> Lease:
        return Lease(self.holder, self.token, os.getpid(), socket.gethostname(), _pid_namespace(), self.started, time.time())

    def _read(self) -> tuple[bool, Lease | None]:
        """(whether a lease exists, the lease or None if unreadable)."""
        try:
            return True, Lease.parse(self.fs.cat_file(self.lease_path))
        except FileNotFoundError:
            return False, None

    def acquire(self) -> StoreLock:
        """Take the lease and start the heartbeat.

        Raises
        ------
        StoreError
            One line: who holds the lease (and whether it may be broken), or why it cannot be written.
        """
        try:
            if self.fs.exists(self.root) and not self.fs.isdir(self.root):
                raise StoreError(f"{self.path} exists and is not a deepmr store (it is a file)")
            created = not self.fs.exists(self.root)
            if created:
                self.fs.makedirs(self.root, exist_ok=True)
            for _ in range(3):
                try:
                    with self.fs.open(self.lease_path, "xb") as f:
                        f.write(json.dumps(asdict(self._lease())).encode())
                    break
                except FileExistsError:
                    self._break_or_refuse()
            else:
                raise StoreError(f"{self.path}: another writer took the lease while this one broke a stale one")
        except OSError as exc:
            raise StoreError(f"cannot write to {self.path} (taking its lock): {exc.strerror or exc}") from None
        self.remove_root = created
        self._thread = threading.Thread(target=self._beat, name=f"deepmr-lease {self.path}", daemon=True)
        self._thread.start()
        return self

    def _break_or_refuse(self) -> None:
        """Remove the lease in the way if it may be broken; raise :class:`StoreError` otherwise."""
        exists, current = self._read()
        if not exists:
            return
        if current is None:  # damaged, or being written: stale only once its file is older than the timeout
            if not self.break_stale or self._file_age() <= self.timeout:
                raise StoreError(
                    f"{self.path} holds an unreadable lease ({LOCK_NAME}): if no run is writing this store, "
                    f"rerun with --break-lock once it is older than {self.timeout:g} s"
                )
            log.warning("%s: breaking an unreadable lease", self.path)
        elif current.holder_is_gone():
            log.warning("%s: breaking the lease of %s: that process is gone", self.path, current.describe())
        elif self.break_stale and current.age() > self.timeout:
            log.warning("%s: breaking the stale lease of %s", self.path, current.describe())
        else:
            if current.age() > self.timeout:
                advice = f"its heartbeat is older than {self.timeout:g} s: if that run is gone, rerun with --break-lock"
            else:
                advice = (f"wait for it to finish (a lease whose heartbeat is older than {self.timeout:g} s "
                          "can be broken with --break-lock)")  # fmt: skip
            raise StoreError(f"{self.path} is locked by another writer: {current.describe()}; {advice}")
        if self._read() == (exists, current):  # not renewed or replaced meanwhile
            self.fs.rm_file(self.lease_path)

    def _file_age(self) -> float:
        """Seconds since the lease file was last written (infinite where the filesystem does not say)."""
        try:
            return time.time() - self.fs.modified(self.lease_path).timestamp()
        except (NotImplementedError, OSError):
            return float("inf")

    def _write(self, lease: Lease) -> None:
        data = json.dumps(asdict(lease)).encode()
        if isinstance(self.fs, LocalFileSystem):
            partial = f"{self.lease_path}.{self.token}"
            with open(partial, "wb") as f:
                f.write(data)
            os.replace(partial, self.lease_path)
        else:
            self.fs.pipe_file(self.lease_path, data)

    def _beat(self) -> None:
        while not self._stop.wait(max(self.timeout / 4, 0.05)):
            try:
                exists, current = self._read()
                if current is None or current.token != self.token:
                    self.broken, self.broken_by = True, current
                    log.warning("%s: this run's lease was broken by %s", self.path,
                                current.describe() if current else "another process")  # fmt: skip
                    return
                self._write(self._lease())
            except OSError as exc:  # a network filesystem's hiccup: the next beat tries again
                log.debug("%s: heartbeat failed: %s", self.path, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still this run's (and the folder, if it is to go)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            exists, current = self._read()
            if current is not None and current.token == self.token:
                self.fs.rm_file(self.lease_path)
            if self.remove_root and self.fs.exists(self.root) and not self.fs.ls(self.root, detail=False):
                self.fs.rm(self.root, recursive=True)
        except OSError as exc:
            log.warning("%s: could not remove this run's lease: %s", self.path, exc)

    def raise_if_lost(self) -> None:
        """Raise :class:`StoreError` if another process broke this lease while it was held."""
        if self.broken:
            by = self.broken_by.describe() if self.broken_by else "another process"
            raise StoreError(
                f"{self.path}: this run's lease was broken by {by} while it wrote; "
                f"the store may hold the writes of both: check it with `deepmr verify --store {self.path} --full`"
            )


@contextmanager
def lock(
    path: str,
    holder: str,
    *,
    timeout: float = DEFAULT_LOCK_TIMEOUT,
    break_stale: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> Iterator[StoreLock]:
    """Hold the store's lease for the duration of a ``with`` block (see :class:`StoreLock`).

    Re-entrant within a thread: a writer called by another writer of the same
    store in the same thread shares its lease.

    Parameters
    ----------
    holder
        Who writes (``"deepmr predict"``), named to the writers it refuses.
    timeout
        Seconds without a heartbeat after which the lease is stale.
    break_stale
        Break a stale lease (``--break-lock``).

    Raises
    ------
    StoreError
        If another writer holds the lease, or (on leaving) if another process broke it meanwhile.
    """
    fs, root = filesystem(path, storage_options)
    key = _lock_key(fs, root)
    if key in _HELD:
        yield _HELD[key]
        return
    held = StoreLock(path, holder, timeout=timeout, break_stale=break_stale, storage_options=storage_options).acquire()
    _HELD[key] = held
    try:
        yield held
    except BaseException:
        del _HELD[key]
        held.release()
        raise
    del _HELD[key]
    held.release()
    held.raise_if_lost()


def read_lease(path: str, storage_options: Mapping[str, Any] | None = None) -> Lease | None:
    """The lease on the store at ``path``, if one is held (None also for an unreadable one)."""
    fs, root = filesystem(path, storage_options)
    try:
        return Lease.parse(fs.cat_file(f"{root}/{LOCK_NAME}"))
    except FileNotFoundError:
        return None


def is_lease_file(child: str) -> bool:
    """Whether ``child`` (a path in a store's folder) is a lease or a lease being written."""
    return posixpath.basename(child.rstrip("/")).startswith(LOCK_NAME)


def held_lease(fs: fsspec.AbstractFileSystem, root: str) -> StoreLock | None:
    """The lease this thread holds on the store at ``root`` of ``fs``, if any."""
    return _HELD.get(_lock_key(fs, root))
