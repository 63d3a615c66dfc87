"""The command that is writing a store: the line a store's ``history`` attribute gets for it.

``deepmr`` sets its command line for the duration of the command
(:func:`command`, called by :func:`deepmr_dist.cli.main`). Outside it (the Python
API, a script, a notebook) the command is the Python process: ``python`` and its
``sys.argv``, timed at its first write. :func:`deepmr_dist.io.store.write_group`
and :func:`deepmr_dist.io.store.create_store` append the line of the current
command to the store's history once per command and store (:attr:`Command.stores`),
however many groups the command writes.

A line is ``<ISO 8601 UTC start time> <command line>``, e.g.
``2026-08-01T09:30:00Z deepmr run pipelines/quickstart.yaml``; the value of
``--storage-options`` (which may hold credentials) is left out.

This module imports nothing but the standard library: the CLI imports it
before it knows which subcommand runs.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone

SECRET_OPTIONS = ("--storage-options",)
"""Options whose values a history line leaves out (they may hold credentials)."""
REDACTED = "<not recorded>"
"""What a history line shows in place of such a value."""


@dataclass
class Command:
    """One command that may write stores.

    Attributes
    ----------
    text : str
        The command line, e.g. ``deepmr run pipelines/quickstart.yaml``.
    started : str
        When it started (ISO 8601, UTC, seconds).
    stores : set of str
        The stores (fsspec URLs) whose history already has its line.
    """

    text: str
    started: str
    stores: set[str] = field(default_factory=set)

    @property
    def line(self) -> str:
        """The command's line in a store's history."""
        return f"{self.started} {self.text}"


_current: ContextVar[Command | None] = ContextVar("deepmr_command", default=None)
_process: list[Command] = []  # the Python process as a command, made at its first write


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def command_text(program: str, argv: Sequence[str]) -> str:
    """``program argv...`` quoted for a shell, with the values of :data:`SECRET_OPTIONS` replaced by :data:`REDACTED`."""
    words, hide = [program], False
    for arg in argv:
        if hide:
            words.append(REDACTED)
            hide = False
        elif arg in SECRET_OPTIONS:
            words.append(arg)
            hide = True
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            words.append(f"{arg.split('=', 1)[0]}={REDACTED}")
        else:
            words.append(arg)
    return shlex.join(words)


@contextmanager
def command(argv: Sequence[str]) -> Iterator[Command]:
    """Make ``deepmr argv...``, starting now, the current command for the duration of the block."""
    token = _current.set(Command(command_text("deepmr", argv), _now()))
    try:
        yield _current.get()
    finally:
        _current.reset(token)


def current() -> Command:
    """The command set by :func:`command`, else the Python process (``python`` and ``sys.argv``)."""
    active = _current.get()
    if active is not None:
        return active
    if not _process:
        _process.append(Command(command_text("python", [arg for arg in sys.argv if arg]), _now()))
    return _process[0]


def with_current(history: str | None, store: str) -> str:
    """``history`` (one line per command) with the current command's line appended, unless it has it for ``store``.

    The caller adds ``store`` to :attr:`Command.stores` once the history is written.
    """
    line = current().line
    if history and store in current().stores:
        return history
    return f"{history}\n{line}" if history else line
