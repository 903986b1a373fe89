"""Local copies of what must be local to be read: a gs:// TFDS dataset directory (ArrayRecord reads local
files) and a gs:// .npy / .bin token file (memory-mapped). Each is copied once into the cache, atomically,
under a name that holds the object's identity (name, size, generation), so a rewritten object is copied again."""
from __future__ import annotations

import functools
import os
import posixpath
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

from vffn_jax import storage
from vffn_jax.data import sources
from vffn_jax.data.cache_dir import cache_key, cache_root
from vffn_jax.errors import ConfigError

COPY_CHUNK = 16 << 20  # bytes per read when copying a gs:// object into the cache


def _write_atomically(path: Path, chunks: Iterable[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _copy_object(url: str, dest: Path) -> None:
    with storage.as_path(url).open("rb") as src:
        _write_atomically(dest, iter(functools.partial(src.read, COPY_CHUNK), b""))


def gcs_stat(name: str, info: dict) -> list:
    return [storage.GCS_PREFIX + name.removeprefix(storage.GCS_PREFIX), int(info["size"]), sources.gcs_version(info)]


def copy_into_cache(url: str, info: dict, cache_dir: str = "") -> Path:
    """The local copy of the gs:// object `url` in the token cache, copied on first use (or when the object
    changed: its generation is part of the name)."""
    obj = storage.as_path(url)
    dest = cache_root(cache_dir) / "tokens" / f"{obj.stem}-gcs-{cache_key({'object': gcs_stat(url, info)})}{obj.suffix}"
    if not dest.exists():
        _copy_object(url, dest)
    return dest


def local_copy_of_gcs_tfds_dir(spec: str, label: str, cache_dir: str = "",
                               accepted: str = "") -> tuple[Path, list] | None:
    """(local copy, identity) of the gs:// TFDS dataset directory `spec` (the folder holding
    dataset_info.json), copied once into `cache_root()/tfds-gcs/`; None when `spec` is not one."""
    try:
        is_tfds = storage.as_path(f"{spec.rstrip('/')}/dataset_info.json").exists()
    except ConfigError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable bucket: the listing below says why
        is_tfds = False
    if not is_tfds:
        return None
    root_url, objects, _ = sources.gcs_listing(spec, label, accepted)
    prefix = root_url.removeprefix(storage.GCS_PREFIX).rstrip("/") + "/"
    names = sorted(n for n, i in objects.items() if i.get("type") == "file" and not n.endswith("/"))
    stats = [gcs_stat(n, objects[n]) for n in names]
    dest = cache_root(cache_dir) / "tfds-gcs" / f"{posixpath.basename(prefix.rstrip('/'))}-{cache_key(stats)}"
    if not (dest / "dataset_info.json").is_file():
        tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            for (url, _, _), name in zip(stats, names):
                _copy_object(url, tmp / name.removeprefix(prefix))
            try:
                os.rename(tmp, dest)
            except OSError:  # another process put its complete copy there first
                if not (dest / "dataset_info.json").is_file():
                    raise
        except (ConfigError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 - gcsfs and google-auth raise many types; all mean "cannot read"
            raise sources.gcs_read_error(spec, label, e) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, stats
