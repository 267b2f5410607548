"""Where a store lives: a local directory or an object-store URL (``s3://bucket/path.zarr``).

Every store path of hpc-seg goes through this module; run directories stay POSIX paths. A store
path is a plain string: a local path, or a URL with a protocol fsspec knows. :func:`fs_for` picks
the path's filesystem once — :class:`LocalFS` (POSIX calls) or :class:`ObjectFS` (fsspec) — and
both offer the same operations: whole-file reads and atomic writes, atomic create, listing,
removal, the zarr store to open, and byte ranges for the shard reader (``hpc_seg.storage.chunks``).
The module-level functions (``is_file``, ``join``, ``read_json``, …) dispatch to it.

S3 (s3fs): endpoint and credentials come from the standard AWS environment, read by botocore
itself — ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_REGION``/``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for
S3-compatible servers (MinIO, Ceph RGW, a site's object store)::

    export AWS_ENDPOINT_URL=https://objects.example.org AWS_ACCESS_KEY_ID=… AWS_SECRET_ACCESS_KEY=…
    hpc-seg prepare lits /data/LiTS17 s3://bucket/lits.zarr
    hpc-seg train --config configs/unet_aspp.yaml --set data.store=s3://bucket/lits.zarr

Processes: an :class:`ObjectFS` holds only its protocol; the fsspec filesystem behind it is made
once per process (keyed by pid, outside fsspec's instance cache) and looked up on every call, so a
DataLoader worker or conversion worker never uses the HTTP session and event-loop thread of the
process it was forked from, whatever objects it inherited.

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


def _unreachable(path, exc: Exception) -> StoreError:
    return StoreError(f"{normalize(path)}: object store request failed ({type(exc).__name__}: {exc}); check "
                      "AWS_ENDPOINT_URL, the credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) "
                      "and the bucket name")


class _FileSystem:
    """What both filesystems share; each implements the primitives."""

    remote: bool
    sep: str

    def join(self, base, *parts: str) -> str:
        base = self.normalize(base)
        if not parts:
            return base
        return self.sep.join([base.rstrip(self.sep), *[p.strip("/") for p in parts]])

    def read_json(self, path) -> dict | None:
        raw = self.read_bytes(path)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise StoreError(f"{path}: damaged JSON ({exc})") from None

    def write_json(self, path, payload, indent: int | None = 2) -> str:
        return self.write_bytes(path, (json.dumps(payload, indent=indent) + "\n").encode())

    def state(self, path) -> str:
        """``absent``, ``empty`` (an empty directory or prefix), ``store`` (has zarr.json) or ``other``."""
        return "store" if self.is_file(self.join(path, "zarr.json")) else self._occupancy(path)


class LocalFS(_FileSystem):
    """A store on a POSIX filesystem (local disk, NFS, Lustre, GPFS)."""

    remote = False
    sep = os.sep

    def normalize(self, path) -> str:
        text = str(path)
        return str(Path(text[7:] if text.startswith("file://") else text))

    def key(self, path) -> str:
        return self.normalize(path)

    def _p(self, path) -> Path:
        return Path(self.normalize(path))

    def read_bytes(self, path) -> bytes | None:
        try:
            return self._p(path).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def write_bytes(self, path, data: bytes) -> str:
        atomic_write_bytes(self._p(path), data)
        return self.normalize(path)

    def create_exclusive(self, path, data: bytes) -> bool:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def exists(self, path) -> bool:
        return self._p(path).exists()

    def is_file(self, path) -> bool:
        return self._p(path).is_file()

    def subdirs(self, path) -> list[str]:
        d = self._p(path)
        return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []

    def _occupancy(self, path) -> str:
        p = self._p(path)
        return "absent" if not p.exists() else "empty" if p.is_dir() and not any(p.iterdir()) else "other"

    def remove_tree(self, path) -> None:
        if self._p(path).exists():
            shutil.rmtree(self._p(path))

    def remove_file(self, path) -> None:
        self._p(path).unlink(missing_ok=True)

    def version(self, path) -> str:
        st = self._p(path).stat()
        return f"{st.st_mtime_ns}-{st.st_size}"

    def zarr_store(self, path, read_only: bool = True):
        return self.normalize(path)

    # byte ranges: a handle is an open file descriptor
    def open(self, path) -> int:
        return os.open(self._p(path), os.O_RDONLY)

    def tail(self, fd: int, n: int) -> bytes:
        """The last ``n`` bytes (b"" when the file is shorter)."""
        end = os.fstat(fd).st_size
        return os.pread(fd, n, end - n) if end >= n else b""

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def close(self, fd: int) -> None:
        os.close(fd)


class ObjectFS(_FileSystem):
    """A store in an object store (``s3://…``) through this process's fsspec filesystem.

    Request failures other than "no such object" raise StoreError naming the endpoint settings;
    writes and removals pass fsspec's errors through."""

    remote = True
    sep = "/"

    def __init__(self, protocol: str):
        self.protocol = protocol

    @staticmethod
    def _fs(path):
        return filesystem(path)  # looked up per call: the process's own, never one inherited

    def normalize(self, path) -> str:
        return str(path).rstrip("/")

    def key(self, path) -> str:
        """The path as the filesystem names it (bucket/key)."""
        return self.normalize(path).split("://", 1)[1]

    def read_bytes(self, path) -> bytes | None:
        try:
            return self._fs(path).cat_file(self.key(path))
        except FileNotFoundError:
            return None
        except Exception as exc:  # botocore/aiohttp errors are not OSErrors
            raise _unreachable(path, exc) from None

    def write_bytes(self, path, data: bytes) -> str:
        self._fs(path).pipe_file(self.key(path), data)  # one PUT: atomic
        return self.normalize(path)

    def create_exclusive(self, path, data: bytes) -> bool:
        try:
            self._fs(path).pipe_file(self.key(path), data, mode="create")
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

    def _info(self, path) -> dict | None:
        try:  # not fs.isfile/exists: they read an unreachable endpoint as "no such file"
            return self._fs(path).info(self.key(path))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _unreachable(path, exc) from None

    def exists(self, path) -> bool:
        return self._info(path) is not None

    def is_file(self, path) -> bool:
        info = self._info(path)
        return info is not None and info["type"] == "file"

    def _ls(self, path, detail: bool) -> list | None:
        try:
            return self._fs(path).ls(self.key(path), detail=detail, refresh=True)
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _unreachable(path, exc) from None

    def subdirs(self, path) -> list[str]:
        entries = self._ls(path, detail=True) or []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def _occupancy(self, path) -> str:
        entries = self._ls(path, detail=False)
        return "absent" if entries is None else "empty" if not entries else "other"

    def remove_tree(self, path) -> None:
        fs = self._fs(path)
        try:
            fs.rm(self.key(path), recursive=True)
        except FileNotFoundError:
            pass
        fs.invalidate_cache()

    def remove_file(self, path) -> None:
        try:
            self._fs(path).rm_file(self.key(path))
        except FileNotFoundError:
            pass

    def version(self, path) -> str:
        """The object's ETag (its size where the server gives none): one HEAD."""
        info = self._fs(path).info(self.key(path))
        return str(info.get("ETag") or info.get("etag") or info["size"]).strip('"')

    def zarr_store(self, path, read_only: bool = True):
        from zarr.storage import FsspecStore

        return FsspecStore(filesystem(path, asynchronous=True), path=self.key(path), read_only=read_only)

    # byte ranges: a handle is the object's key; every read is one ranged GET
    def open(self, path) -> str:
        return self.key(path)

    def tail(self, key: str, n: int) -> bytes:
        """The last ``n`` bytes: one suffix-range GET (``bytes=-n``)."""
        return self._range(key, -n, None)

    def pread(self, key: str, n: int, offset: int) -> bytes:
        return self._range(key, offset, offset + n)

    def _range(self, key: str, start: int, end: int | None) -> bytes:
        try:
            return self._fs(f"{self.protocol}://{key}").cat_file(key, start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _unreachable(f"{self.protocol}://{key}", exc) from None

    def close(self, key: str) -> None:
        pass


LOCAL = LocalFS()
_OBJECT: dict[str, ObjectFS] = {}


def fs_for(path) -> LocalFS | ObjectFS:
    """The filesystem ``path`` lives on: the one place that tells local paths from URLs."""
    if not is_remote(path):
        return LOCAL
    proto = protocol(path)
    fs = _OBJECT.get(proto)
    if fs is None:
        fs = _OBJECT[proto] = ObjectFS(proto)
    return fs


# ------------------------------------------------------------------ the operations, by path
def normalize(path) -> str:
    """A store path as the one string every layer uses: URLs without a trailing slash, local paths as given."""
    return fs_for(path).normalize(path)


def join(base, *parts: str) -> str:
    return fs_for(base).join(base, *parts)


def read_bytes(path) -> bytes | None:
    """The file's bytes, or None when it does not exist."""
    return fs_for(path).read_bytes(path)


def read_json(path) -> dict | None:
    return fs_for(path).read_json(path)


def write_bytes(path, data: bytes) -> str:
    """Atomic write (a temporary file renamed locally; one PUT on an object store)."""
    return fs_for(path).write_bytes(path, data)


def write_json(path, payload, indent: int | None = 2) -> str:
    return fs_for(path).write_json(path, payload, indent)


def exists(path) -> bool:
    return fs_for(path).exists(path)


def is_file(path) -> bool:
    return fs_for(path).is_file(path)


def subdirs(path) -> list[str]:
    """Names of the directories (prefixes) directly under ``path``."""
    return fs_for(path).subdirs(path)


def state(path) -> str:
    """``absent``, ``empty`` (an empty directory or prefix), ``store`` (has zarr.json) or ``other``."""
    return fs_for(path).state(path)


def remove_tree(path) -> None:
    """Delete a directory (prefix) and everything below it; nothing when absent."""
    fs_for(path).remove_tree(path)


def remove_file(path) -> None:
    fs_for(path).remove_file(path)


def create_exclusive(path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist; False when it does (atomic)."""
    return fs_for(path).create_exclusive(path, data)


def zarr_store(path, read_only: bool = True):
    """What ``zarr.open_group`` takes for this store: a local path, or an FsspecStore made in this process."""
    return fs_for(path).zarr_store(path, read_only)
