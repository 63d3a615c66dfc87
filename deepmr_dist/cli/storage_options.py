"""``--storage-options JSON``, defined once for every command that reads or writes a store, a table or a model at a URL.

:func:`storage_options` parses it, :func:`store_options` gives it as the options of ``--store``
(none for a local store) and :func:`put_file` is how a command that writes a file locally (an
export, a report) copies it to a URL.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepmr_dist.errors import InputError, StoreError

HELP = (
    'fsspec options of every URL the command reads or writes (store, tables, model files, outputs), a JSON object, '
    'e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'; credentials come from the environment '
    "(AWS_ACCESS_KEY_ID, ...); ignored for local paths"
)


def add_storage_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Add ``--storage-options JSON`` (``args.storage_options``, read by :func:`storage_options`)."""
    parser.add_argument("--storage-options", metavar="JSON", help=HELP)


def storage_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The parsed ``--storage-options`` (None if not given).

    Raises
    ------
    InputError
        If it is not a JSON object: one line saying where it is wrong.
    """
    if args.storage_options is None:
        return None
    try:
        options = json.loads(args.storage_options)
    except json.JSONDecodeError as exc:
        raise InputError(f"--storage-options is not valid JSON: {exc}") from None
    if not isinstance(options, dict):
        raise InputError(f"--storage-options must be a JSON object, got {type(options).__name__}: {args.storage_options}")
    return options


def store_options(args: argparse.Namespace) -> dict[str, Any] | None:
    """The parsed ``--storage-options`` (checked even so) as options of ``args.store``: None for a local store, which takes none."""
    from deepmr_dist.io.location import is_local

    options = storage_options(args)
    return None if is_local(args.store) else options


def put_file(local: str | Path, url: str, options: Mapping[str, Any] | None) -> None:
    """Copy the local file ``local`` to the fsspec URL ``url`` in one put (an object store has no appends).

    Raises
    ------
    StoreError
        If the filesystem refuses the write: one line naming ``url``.
    """
    from deepmr_dist.io.location import filesystem

    fs, target = filesystem(url, options)
    try:
        fs.put_file(str(local), target)
    except OSError as exc:
        raise StoreError(f"cannot write {url}: {exc.strerror or exc}") from None
