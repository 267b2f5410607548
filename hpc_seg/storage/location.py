"""Where a store lives: a local directory or an object-store URL (``s3://bucket/path.zarr``).

Every store path of hpc-seg goes through this module (fsspec underneath); run directories stay
POSIX paths. A store path is a plain string: a local path, or a URL with a protocol fsspec knows.

S3 (s3fs): endpoint and credentials come from the standard AWS environment, read by botocore
itself — ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for
S3-compatible servers (MinIO, Ceph RGW, a site's object store)::

    export AWS_ENDPOINT_URL=https://objects.example.org AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…
    hpc-seg prepare lits /data/LiTS17 s3://bucket/lits.zarr
    hpc-seg train --config configs/unet_aspp.yaml --set data.store=s3://bucket/lits.zarr

Processes: a filesystem object is made once per process (keyed by pid, outside fsspec's instance
cache), so a DataLoader worker or conversion worker never uses the HTTP session and event-loop
thread of the process it was forked from.

Writes: an object PUT is atomic (readers see the old or the new object), so metadata written here is
atomic on S3 as on a local disk (temporary file + rename). ``create_exclusive`` is an atomic create:
``O_CREAT | O_EXCL`` locally, a conditional PUT (``If-None-Match: *``) on S3.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from hpc_seg.errors import StoreError
from hpc_seg.storage.atomic import atomic_write_bytes

_FS: dict[tuple[int, str], object] = {}


def is_remote(path) -> bool:
    """True for URLs with a protocol other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def normalize(path) -> str:
    """A store path as the one string every layer uses: URLs without a trailing slash, local paths as given."""
    text = str(path)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text[7:] if text.startswith("file://") else text))


def protocol(path) -> str:
    return str(path).split("://", 1)[0] if is_remote(path) else "file"


def filesystem(path, asynchronous: bool = False):
    """This process's fsspec filesystem for ``path``'s protocol (never one inherited across fork);
    ``asynchronous``: the instance zarr's event loop uses (``zarr_store``)."""
    key = (os.getpid(), protocol(path) + ("+async" if asynchronous else ""))
    fs = _FS.get(key)
    if fs is None:
        import fsspec

        try:
            fs = fsspec.filesystem(protocol(path), skip_instance_cache=True,
                                   **({"asynchronous": True} if asynchronous else {}))
        except (ImportError, ValueError) as exc:
            raise StoreError(f"{path}: no filesystem for protocol '{key[1]}' ({exc}); for s3:// install s3fs") from None
        if any(pid != key[0] for pid, _ in _FS):  # forked: drop the parent's
            _FS.clear()
        _FS[key] = fs
    return fs


def join(base, *parts: str) -> str:
    base = normalize(base)
    if not parts:
        return base
    sep = "/" if is_remote(base) else os.sep
    return sep.join([base.rstrip(sep), *[p.strip("/") for p in parts]])


def _key(path) -> str:
    """The path as the filesystem names it (bucket/key for S3)."""
    return normalize(path).split("://", 1)[1] if is_remote(path) else normalize(path)


def _unreachable(path, exc: Exception) -> StoreError:
    return StoreError(f"{normalize(path)}: object store request failed ({type(exc).__name__}: {exc}); check "
                      "AWS_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                      "and the bucket name")


def read_bytes(path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    if not is_remote(path):
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
    try:
        return filesystem(path).cat_file(_key(path))
    except FileNotFoundError:
        return None
    except Exception as exc:  # botocore/aiohttp errors are not OSErrors
        raise _unreachable(path, exc) from None


def read_json(path) -> dict | None:
    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise StoreError(f"{path}: damaged JSON ({exc})") from None


def write_bytes(path, data: bytes) -> str:
    """Atomic write (a temporary file renamed locally; one PUT on an object store)."""
    if is_remote(path):
        filesystem(path).pipe_file(_key(path), data)
    else:
        atomic_write_bytes(path, data)
    return normalize(path)


def write_json(path, payload, indent: int | None = 2) -> str:
    return write_bytes(path, (json.dumps(payload, indent=indent) + "\n").encode())


def is_file(path) -> bool:
    if not is_remote(path):
        return Path(path).is_file()
    try:  # not fs.isfile: it reads an unreachable endpoint as "no such file"
        return filesystem(path).info(_key(path))["type"] == "file"
    except FileNotFoundError:
        return False
    except Exception as exc:
        raise _unreachable(path, exc) from None


def subdirs(path) -> list[str]:
    """Names of the directories (prefixes) directly under ``path``."""
    if not is_remote(path):
        d = Path(path)
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
    fs = filesystem(path)
    try:
        entries = fs.ls(_key(path), detail=True, refresh=True)
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise _unreachable(path, exc) from None
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")


def state(path) -> str:
    """``absent``, ``empty`` (an empty directory or prefix), ``store`` (has zarr.json) or ``other``."""
    if is_file(join(path, "zarr.json")):
        return "store"
    if not is_remote(path):
        p = Path(path)
        return "absent" if not p.exists() else "empty" if p.is_dir() and not any(p.iterdir()) else "other"
    try:
        entries = filesystem(path).ls(_key(path), refresh=True)
    except FileNotFoundError:
        return "absent"
    except Exception as exc:
        raise _unreachable(path, exc) from None
    return "empty" if not entries else "other"


def remove_tree(path) -> None:
    """Delete a directory (prefix) and everything below it; nothing when absent."""
    if not is_remote(path):
        if Path(path).exists():
            shutil.rmtree(path)
        return
    fs = filesystem(path)
    try:
        fs.rm(_key(path), recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def remove_file(path) -> None:
    if not is_remote(path):
        Path(path).unlink(missing_ok=True)
        return
    try:
        filesystem(path).rm_file(_key(path))
    except FileNotFoundError:
        pass


def create_exclusive(path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False when it does (atomic)."""
    if not is_remote(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    try:
        filesystem(path).pipe_file(_key(path), data, mode="create")
    except FileExistsError:
        return False
    except Exception as exc:
        if "PreconditionFailed" in str(exc) or "412" in str(exc):
            return False
        if "NotImplemented" in str(exc) or "501" in str(exc):  # no conditional writes: no safe lock there
            raise StoreError(f"{path}: the object store refused a conditional write ({exc}); it must support "
                             "If-None-Match (AWS S3, MinIO, Ceph ≥ 18) for the preparation lock") from None
        raise _unreachable(path, exc) from None
    return True


def zarr_store(path, read_only: bool = True):
    """What ``zarr.open_group`` takes for this store: a local path, or an FsspecStore made in this process."""
    if not is_remote(path):
        return normalize(path)
    from zarr.storage import FsspecStore

    return FsspecStore(filesystem(path, asynchronous=True), path=_key(path), read_only=read_only)
