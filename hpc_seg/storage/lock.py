"""One preparation at a time per store: a lock file beside the store, taken by atomic create.

``STORE.zarr.lock`` is created with ``O_CREAT | O_EXCL`` — atomic on local filesystems, NFSv3+,
Lustre and GPFS, unlike ``fcntl`` locks, which many parallel filesystems do not honour across nodes.
It holds a token and who took it (host, pid, time, what). The array tasks and the finalizer of one
``prepare --slurm`` share its token: they run under the lock their submission took, and the
finalizer removes it. A second preparation of the same store — another user, a second terminal, a
second submission — is refused, naming the holder; a lock left by a process that died on this host
is taken over, one from another host is reported with the command that removes it.

On an object store (``s3://…``) the lock is an object created by a conditional PUT
(``If-None-Match: *``, ``hpc_seg.storage.location.create_exclusive``): of two writers, one gets 412.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import contextmanager

from hpc_seg.storage import location as loc
from hpc_seg.errors import StoreError


def lock_path(store) -> str:
    return loc.normalize(store) + ".lock"


def _holder(path: str) -> dict:
    try:
        return loc.read_json(path) or {}
    except (OSError, StoreError):
        return {}


def _dead_here(info: dict) -> bool:
    if info.get("host") != socket.gethostname() or not info.get("pid") or info.get("shared"):
        return False
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def acquire(store, what: str, shared: bool = False) -> str:
    """Take the store's lock; returns its token. ``shared``: held for jobs (released by the
    finalizer, not by this process's death)."""
    path = lock_path(store)
    token = uuid.uuid4().hex
    info = {"token": token, "host": socket.gethostname(), "pid": os.getpid(), "what": what,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "shared": shared}
    for _ in range(2):
        if not loc.create_exclusive(path, json.dumps(info).encode()):
            held = _holder(path)
            if _dead_here(held):  # its process is gone: the lock is stale
                loc.remove_file(path)
                continue
            raise StoreError(f"{store}: another preparation holds this store's lock ({held.get('what', '?')} on "
                             f"{held.get('host', '?')}, pid {held.get('pid', '?')}, since {held.get('since', '?')}); "
                             f"wait for it, or if it is gone for good remove {path}")
        return token
    raise StoreError(f"{store}: could not take the lock {path}")


def check(store, token: str) -> None:
    """A job of a shared preparation: the lock must still be the one its submission took."""
    held = _holder(lock_path(store))
    if held.get("token") != token:
        raise StoreError(f"{store}: the store's lock {lock_path(store)} is not this preparation's "
                         f"(held by {held.get('what', 'nobody')}); refusing to write")


def release(store, token: str) -> None:
    path = lock_path(store)
    if _holder(path).get("token") == token:
        loc.remove_file(path)


@contextmanager
def store_lock(store, what: str, token: str | None = None):
    """Hold the lock for the block (or, with ``token``, check that a shared one is ours)."""
    if token is not None:
        check(store, token)
        yield token
        return
    token = acquire(store, what)
    try:
        yield token
    finally:
        release(store, token)
