"""The store lock: an advisory lease in the store, refreshed by a heartbeat, refused to a second writer,
broken at once when its holder on this machine is gone and, with ``break_stale``, when its heartbeat is stale.

Holders in other processes are real Python processes started here and stopped by their pid.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import xarray as xr

from deepmr_dist.errors import StoreError
from deepmr_dist.io import store
from deepmr_dist.io.lock import lock, LOCK_NAME, read_lease, StoreLock
from helpers_lock import lock_held_by_a_thread

HOLDER = """
import sys, time
from deepmr_dist.io.lock import lock

with lock(sys.argv[1], "holder script", timeout=float(sys.argv[2])):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that takes the lease of ``tmp_path/run.zarr`` (heartbeat timeout as given): (path, Popen)."""
    procs: list[subprocess.Popen] = []

    def start(timeout: float) -> tuple[str, subprocess.Popen]:
        path = str(tmp_path / "run.zarr")
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(timeout)], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline() == "held\n"
        return path, proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _refusal(path: str, **options) -> str:
    with pytest.raises(StoreError) as err:
        with lock(path, "second writer", **options):
            pass
    assert "\n" not in str(err.value)
    return str(err.value)


def test_lock__second_writer_is_refused_with_one_line_naming_the_holder(holder):
    path, proc = holder(60.0)
    message = _refusal(path)
    assert f"{path} is locked by another writer: holder script (pid {proc.pid} on {socket.gethostname()}" in message
    assert "wait for it to finish" in message and "--break-lock" in message
    assert read_lease(path).pid == proc.pid


def test_lock__lease_of_a_killed_holder_of_this_machine_is_broken_at_once(holder, caplog):
    path, proc = holder(60.0)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(10) == -signal.SIGKILL
    assert read_lease(path).pid == proc.pid  # left behind
    with lock(path, "next writer") as held:
        assert read_lease(path).token == held.token
    assert "that process is gone" in caplog.text
    assert read_lease(path) is None


def test_lock__hung_holder_is_broken_only_with_break_lock_once_its_heartbeat_is_stale(holder):
    path, proc = holder(0.4)  # heartbeat every 0.1 s while it runs
    assert "wait for it to finish" in _refusal(path, timeout=2.0, break_stale=True)
    os.kill(proc.pid, signal.SIGSTOP)  # hung: alive, but no heartbeat
    try:
        while read_lease(path).age() <= 2.0:
            time.sleep(0.1)
        message = _refusal(path, timeout=2.0)
        assert "heartbeat is older than 2 s: if that run is gone, rerun with --break-lock" in message
        with lock(path, "breaker", timeout=2.0, break_stale=True) as held:
            assert read_lease(path).token == held.token
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_lock__heartbeat_keeps_a_held_lease_fresh(tmp_path):
    path = str(tmp_path / "run.zarr")
    with lock_held_by_a_thread(path, "slow writer", timeout=1.0):
        first = read_lease(path).heartbeat
        deadline = time.monotonic() + 2.5  # ten heartbeats
        while time.monotonic() < deadline:
            assert "wait for it to finish" in _refusal(path, timeout=1.0, break_stale=True)
            time.sleep(0.2)
        assert read_lease(path).heartbeat > first


def test_lock__is_reentrant_within_a_thread_and_exclusive_across_threads(tmp_path):
    path = str(tmp_path / "run.zarr")
    outcome: list[str] = []
    with lock(path, "outer") as outer:
        with lock(path, "inner") as inner:
            assert inner is outer
        thread = threading.Thread(target=lambda: outcome.append(_refusal(path)))
        thread.start()
        thread.join(30)
        assert read_lease(path).token == outer.token  # the inner exit did not release it
    assert "locked by another writer: outer" in outcome[0]


def test_lock__release_removes_the_lease_and_the_folder_it_created_but_keeps_one_that_existed(tmp_path):
    path = tmp_path / "new.zarr"
    with lock(str(path), "w"):
        assert sorted(p.name for p in path.iterdir()) == [LOCK_NAME]
        assert store.inspect_target(str(path)).kind == "empty"  # the lease is not content
    assert not path.exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    with lock(str(existing), "w"):
        pass
    assert existing.is_dir() and not any(existing.iterdir())


def test_lock__lease_broken_by_another_process_is_reported_when_the_holder_leaves(tmp_path):
    path = str(tmp_path / "run.zarr")
    intruder = None
    with pytest.raises(StoreError, match="lease was broken by intruder.*deepmr verify --store .* --full"):
        with lock(path, "victim", timeout=0.4) as held:
            os.remove(held.lease_path)  # what a breaker does before it takes the lease
            intruder = StoreLock(path, "intruder", timeout=60.0).acquire()
            while not held.broken:
                time.sleep(0.05)
    assert read_lease(path).token == intruder.token  # the victim's exit did not remove it
    intruder.release()


def test_lock__unreadable_lease_is_refused_unless_broken(tmp_path):
    folder = tmp_path / "run.zarr"
    folder.mkdir()
    lease = folder / LOCK_NAME
    lease.write_text("{not json")
    assert "unreadable lease" in _refusal(str(folder))
    assert "unreadable lease" in _refusal(str(folder), break_stale=True)  # it may be a lease being written
    os.utime(lease, (time.time() - 120, time.time() - 120))
    with lock(str(folder), "w", break_stale=True):
        assert read_lease(str(folder)).holder == "w"


def test_lock__lease_on_an_object_store_is_an_exclusive_create(tmp_path):
    path = f"memory://lock-test-{uuid.uuid4().hex}/run.zarr"
    fs, root = fsspec.core.url_to_fs(path)
    try:
        outcome: list[str] = []
        with lock(path, "object writer") as held:
            assert json.loads(fs.cat_file(f"{root}/{LOCK_NAME}"))["token"] == held.token
            thread = threading.Thread(target=lambda: outcome.append(_refusal(path)))
            thread.start()
            thread.join(30)
        assert "locked by another writer: object writer" in outcome[0]
        assert not fs.exists(f"{root}/{LOCK_NAME}")
    finally:
        if fs.exists(root):
            fs.rm(root, recursive=True)


def test_write_group__is_refused_while_another_writer_holds_the_lease(holder):
    path, proc = holder(60.0)
    with pytest.raises(StoreError, match=f"locked by another writer: holder script \\(pid {proc.pid}"):
        store.write_group(path, xr.Dataset({"a": ("x", np.arange(3))}), "meta")
    assert sorted(p.name for p in Path(path).iterdir()) == [LOCK_NAME]
