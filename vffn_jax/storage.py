"""Paths that are local folders or `gs://bucket/...` objects, through the path type Orbax uses.

Every path the project reads or writes (`--workdir`, `--init-from`, `data.path`, outputs) goes
through `as_path`, which returns an `etils.epath.Path`: a local path or a GCS path served by gcsfs.
Orbax and tensorstore write checkpoints straight to the bucket; small files (config.json, metrics,
checksums, plots) go through epath. `check_writable` is the start-up probe that turns a missing
bucket or a read-only folder into a clear error before anything is compiled.
"""
from __future__ import annotations

import io
import logging
import os
import socket
import urllib.parse
import uuid
from pathlib import Path

from etils import epath

from vffn_jax.config import ConfigError

GCS_PREFIX = "gs://"

# gcsfs warns "could not determine bucket type" for every bucket the emulator (and some real
# buckets without hierarchical-namespace metadata) serve: noise, not a problem. Its "out of retries"
# tracebacks are logged at ERROR before the same error reaches our code, which reports it in one line.
logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
GCS_PROBE_TIMEOUT_S = 5.0  # a TCP connection to the Cloud Storage endpoint takes milliseconds when it works
_REACHED: set[tuple[str, int]] = set()  # endpoints this process has connected to


def _configure_gcsfs() -> None:
    """No listings cache: checkpoints are written by tensorstore and by other hosts, not through this
    process's gcsfs, so a cached listing would miss new steps."""
    try:
        import fsspec.config
    except ImportError:
        return
    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_configure_gcsfs()


def is_gcs(path: str | os.PathLike) -> bool:
    return str(path).startswith(GCS_PREFIX)


def as_path(path: str | os.PathLike) -> epath.Path:
    """`gs://...` stays a GCS path; anything else becomes an absolute local path."""
    if isinstance(path, epath.Path) and is_gcs(path):
        return path
    text = os.fspath(path)
    if is_gcs(text):
        if len(text) <= len(GCS_PREFIX) or text[len(GCS_PREFIX)] == "/":
            raise ConfigError(f"{text!r}: a GCS path is gs://BUCKET[/PREFIX]")
        check_gcs_reachable(text)
        return epath.Path(text.rstrip("/"))
    return epath.Path(os.path.abspath(os.path.expanduser(text)))


def gcs_endpoint() -> tuple[str, int]:
    """(host, port) that gcsfs talks to: $STORAGE_EMULATOR_HOST, else storage.googleapis.com:443."""
    url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def check_gcs_reachable(path: str) -> None:
    """ConfigError within seconds when the Cloud Storage endpoint cannot be reached at all (no network, a
    DNS failure, an emulator that is not running): gcsfs would retry every request with backoff for about
    a minute and a half first. Checked once per process and endpoint."""
    host, port = gcs_endpoint()
    if (host, port) in _REACHED:
        return
    try:
        socket.create_connection((host, port), timeout=GCS_PROBE_TIMEOUT_S).close()
    except OSError as e:
        via = " (from $STORAGE_EMULATOR_HOST)" if os.environ.get("STORAGE_EMULATOR_HOST") else ""
        raise ConfigError(f"{path}: cannot reach Cloud Storage at {host}:{port}{via} ({type(e).__name__}: "
                          f"{_first_line(e)}); check this machine's network and DNS, or start the emulator / "
                          "unset STORAGE_EMULATOR_HOST") from None
    _REACHED.add((host, port))


def gcs_fs():
    """The gcsfs filesystem that epath uses for gs:// paths (one per process; listing cache off, above), for
    what epath does not offer: detailed listings, ranged and concurrent reads, uploads of a local file."""
    import fsspec

    return fsspec.filesystem("gs")


def gcs_key(path) -> str:
    """`bucket/object` of a gs:// path, the form gcsfs takes."""
    return str(path).removeprefix(GCS_PREFIX)


def local_path(path: str | os.PathLike) -> Path | None:
    """The `pathlib.Path` of a local path (None for gs://), for code that needs a real file name."""
    return None if is_gcs(path) else Path(os.fspath(as_path(path)))


def _fix_hint(path: epath.Path) -> str:
    if is_gcs(path):
        bucket = str(path)[len(GCS_PREFIX):].split("/", 1)[0]
        return (f"check that bucket gs://{bucket} exists (gcloud storage buckets create gs://{bucket}) and that "
                "this machine's credentials may write to it (gcloud auth application-default login, or the VM's "
                "service account with roles/storage.objectAdmin)")
    return "check that the folder's parent exists and is writable, or pass another path"


def check_writable(path: str | os.PathLike, what: str) -> epath.Path:
    """Creates `path` if needed and writes, reads back and deletes a probe file there.

    Raises ConfigError naming `what` (e.g. "--workdir") and the path with the fix; returns the path.
    """
    p = as_path(path)
    probe = p / f".vffn_write_probe-{uuid.uuid4().hex[:12]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        if probe.read_text() != "ok":
            raise OSError("the probe file read back different contents")
        probe.unlink()
    except Exception as e:  # gcsfs, google-auth and OSError raise many types; all mean "cannot write here"
        raise ConfigError(f"{what}={path}: cannot write there ({type(e).__name__}: {_first_line(e)}); "
                          f"{_fix_hint(p)}") from None
    return p


def check_readable(path: str | os.PathLike, what: str) -> epath.Path:
    """ConfigError naming `what` when `path` does not exist (or its bucket cannot be read)."""
    p = as_path(path)
    try:
        exists = p.exists()
    except Exception as e:
        raise ConfigError(f"{what}={path}: cannot read it ({type(e).__name__}: {_first_line(e)}); "
                          f"{_fix_hint(p)}") from None
    if not exists:
        raise FileNotFoundError(f"{what}={path} does not exist")
    return p


def upload_tree(local_dir, target) -> None:
    """Copies every file under a local folder to the same relative place under `target` (local or gs://):
    for what is written by libraries that only write local files (TensorBoard events, profiler traces)."""
    local_dir, target = Path(local_dir), as_path(target)
    for f in local_dir.rglob("*"):
        if f.is_file():
            dest = target / f.relative_to(local_dir).as_posix()
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())


def write_text_atomic(path: epath.Path, text: str) -> None:
    """Readers never see half a file: a local file is written beside and renamed; a GCS object
    appears only when its upload completes."""
    if is_gcs(path):
        path.write_text(text)
        return
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text)
    tmp.replace(path)


def save_figure(fig, path) -> epath.Path:
    """Writes a matplotlib figure as PNG through epath (so a gs:// workdir gets its plots too) and closes it."""
    import matplotlib.pyplot as plt

    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    path.write_bytes(png.getvalue())
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else "no message"
