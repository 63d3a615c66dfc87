"""A real S3 API for tests: moto's server on 127.0.0.1 (a thread of the test process) with one bucket.

Dask workers in other processes reach it over HTTP like any S3 endpoint, so
stores written by them are real object-store writes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class S3:
    """A running loopback S3 endpoint and a bucket on it."""

    endpoint: str
    bucket: str

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for stores and files on this endpoint (s3fs's listing cache left on, as users have it)."""
        return {
            "key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }  # fmt: skip

    def url(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"


@contextlib.contextmanager
def s3_server(bucket: str = "deepmr-test") -> Iterator[S3]:
    """Start moto's server on a free loopback port, create ``bucket``, yield it, stop the server."""
    import s3fs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = S3(endpoint=f"http://{host}:{port}", bucket=bucket)
        fs = s3fs.S3FileSystem(**s3.storage_options)
        fs.call_s3("create_bucket", Bucket=bucket)
        yield s3
    finally:
        server.stop()
