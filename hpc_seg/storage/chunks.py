"""Fast reads of boxes (ints and step-1 slices) from arrays of *our* store layouts.

zarr-python 3 pays a fixed round trip through its asyncio loop on every ``array[sel]`` (~1 ms,
zarr-python issue #3524), which dominates a 2.5D sample of three small chunks. For arrays in a
local store with the codec chains hpc-seg writes, :class:`ChunkReader` reads the bytes itself and
decodes them with numcodecs' Blosc (what zarr's ``BloscCodec`` calls):

* **sharded** (``hpc-seg/zarr-v3``): one shard file per array per case holding one chunk per slice
  (``sharding_indexed``: bytes → Blosc → crc32c inside, index at the end with its own crc32c). The
  shard's index is read once per shard and kept; a chunk is then one ``pread`` of its byte range.
  Every chunk is written at conversion, so an empty index entry, a missing shard or a checksum that
  does not match is damage: :class:`~hpc_seg.errors.StoreError` naming the case and the slice, never
  a slice of zeros.
* **unsharded** (``hpc-seg/zarr-v2``): one file per chunk; an absent chunk file is the fill value
  (that layout did not write empty chunks).
* **object store** (``s3://…``, sharded only): the same, with byte ranges instead of ``pread``: the
  index is one suffix-range GET (``bytes=-N``) per shard per process; the chunks of one read that
  are adjacent in the shard (the k slices of a 2.5D stack) come in one ranged GET. With
  ``cache=DIR`` a shard is fetched whole once (one HEAD + one GET), atomically into a local cache
  keyed by the object's ETag (a re-converted case is fetched again), then read with ``pread``.

Anything else (other stores, codecs or selections) goes through zarr. ``tests/storage/test_store.py``
checks both paths against zarr's own indexing.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

from hpc_seg.errors import StoreError
from hpc_seg.storage import location as loc

EMPTY = np.uint64(2 ** 64 - 1)  # the sharding index's "no chunk here"


def _little_bytes_blosc(codecs) -> tuple[bool, bool]:
    """(bytes LE → Blosc [→ crc32c]?, has crc32c)."""
    codecs = list(codecs)
    crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    core = codecs[:-1] if crc else codecs
    ok = (len(core) == 2 and isinstance(core[0], BytesCodec)
          and getattr(core[0].endian, "value", "little") == "little" and isinstance(core[1], BloscCodec))
    return ok, crc


class ChunkReader:
    """``reader[sel]`` == ``array[sel]`` for ints and step-1 slices, without zarr's per-call overhead.
    ``cache``: a local directory caching whole shards of an object store (ignored for local stores)."""

    def __init__(self, array: zarr.Array, cache: str | None = None):
        self.array = array
        self._fds: dict[tuple, tuple] = {}
        self._ready: dict[tuple, tuple] = {}  # (bytes, expected size) fetched ahead by one coalesced request
        md = array.metadata
        codecs = list(getattr(md, "codecs", ()))
        where = _where(array.store) if sys.byteorder == "little" else None
        local = where is not None and not loc.is_remote(where)
        remote = where is not None and loc.is_remote(where)
        self.sharded = (local or remote) and len(codecs) == 1 and isinstance(codecs[0], ShardingCodec)
        if self.sharded:
            sh = codecs[0]
            ok, self.crc = _little_bytes_blosc(sh.codecs)
            index_ok, self.index_crc = _index_codecs(sh.index_codecs)
            self.fast = ok and index_ok and getattr(sh.index_location, "value", "end") == "end"
            self.chunks = tuple(sh.chunk_shape)
            self.shard_shape = tuple(md.chunk_grid.chunk_shape)
            self.per_shard = tuple(s // c for s, c in zip(self.shard_shape, self.chunks))
            self._index: dict[tuple, np.ndarray] = {}
        else:
            ok, self.crc = _little_bytes_blosc(codecs)
            self.fast = local and ok and not self.crc
            self.chunks = tuple(md.chunk_grid.chunk_shape)
        if self.fast:
            self.files = ShardFiles(where, array.path, cache)
            self.dtype = np.dtype(array.dtype).newbyteorder("<")
            self.fill = np.asarray(md.fill_value, dtype=self.dtype)
            self.blosc = numcodecs.Blosc()

    # ------------------------------------------------------------------ where a chunk's bytes are
    def _damaged(self, coords, what: str) -> StoreError:
        parts = self.array.path.split("/")
        case = parts[1] if len(parts) >= 3 and parts[0] == "cases" else self.array.path
        z_axis = 1 if self.array.ndim == 4 else 0
        return StoreError(f"{self.files.where}: case {case}, {parts[-1]} slice z={coords[z_axis]}: {what}; "
                          f"the store is damaged: convert this case again (delete cases/{case} and rerun "
                          "'hpc-seg prepare' or 'hpc-seg convert' with the same source)")

    def _shard_index(self, key: tuple, path, handle, coords) -> np.ndarray:
        index = self._index.get(key)
        if index is None:
            n = int(np.prod(self.per_shard))
            size = 16 * n + (4 if self.index_crc else 0)
            raw = self.files.tail(handle, size)
            if len(raw) != size or (self.index_crc and not _crc_ok(raw)):
                raise self._damaged(coords, f"shard index of {path} unreadable or failing its checksum")
            index = np.frombuffer(raw[: 16 * n], dtype="<u8").reshape(n, 2)
            self._index[key] = index
        return index

    def _locate(self, coords: tuple[int, ...]) -> tuple:
        """(handle, offset, nbytes) of a chunk inside its shard (the shard's index read once)."""
        key = tuple(k // p for k, p in zip(coords, self.per_shard))
        handle, path = self._open(key, coords)
        try:
            index = self._shard_index(key, path, handle, coords)
        except FileNotFoundError:
            raise self._damaged(coords, f"shard file {path} is missing") from None
        offset, nbytes = index[np.ravel_multi_index([k % p for k, p in zip(coords, self.per_shard)], self.per_shard)]
        if offset == EMPTY:
            raise self._damaged(coords, "chunk missing from its shard")
        return handle, int(offset), int(nbytes)

    def _raw(self, coords: tuple[int, ...]) -> bytes | None:
        if not self.sharded:
            # None: the unsharded layout does not write chunks equal to the fill value
            return self.files.read(self.array.metadata.encode_chunk_key(coords))
        ready = self._ready.pop(coords, None)
        if ready is None:
            handle, offset, nbytes = self._locate(coords)
            raw = self.files.pread(handle, nbytes, offset)
        else:
            raw, nbytes = ready
        if len(raw) != nbytes or (self.crc and not _crc_ok(raw)):
            raise self._damaged(coords, "chunk truncated or failing its crc32c checksum")
        return raw[:-4] if self.crc else raw

    def _prefetch(self, coords_list) -> None:
        """Object stores: chunks of one read that lie next to each other in a shard (adjacent slices
        of a 2.5D stack) come in one ranged GET — a request costs 10–50 ms on S3, bytes are cheap."""
        spans = sorted((self._locate(c), c) for c in coords_list)  # ((handle, offset, nbytes), coords)
        i = 0
        while i < len(spans):
            (handle, start, _), _ = spans[i]
            j, end = i, start
            while j < len(spans) and spans[j][0][0] == handle and spans[j][0][1] == end:
                end += spans[j][0][2]
                j += 1
            data = self.files.pread(handle, end - start, start)
            for (_, offset, nbytes), coords in spans[i:j]:
                self._ready[coords] = (data[offset - start: offset - start + nbytes], nbytes)
            i = j

    def _open(self, key: tuple, coords) -> tuple:
        """The shard's handle, open for the current read only (one ``open`` per read call)."""
        if key not in self._fds:
            name = self.array.metadata.encode_chunk_key(key)
            try:
                self._fds[key] = (self.files.open(name), self.files.name(name))
            except FileNotFoundError:
                raise self._damaged(coords, f"shard file {self.files.name(name)} is missing") from None
        return self._fds[key]

    def _chunk(self, coords: tuple[int, ...], into: np.ndarray | None = None) -> np.ndarray | None:
        """Decode one chunk; with ``into`` (a C-contiguous view of the chunk's size) decode in place."""
        raw = self._raw(coords)
        if raw is None:
            if into is not None:
                into[...] = self.fill
                return None
            return np.broadcast_to(self.fill, self.chunks)
        if into is not None:
            self.blosc.decode(raw, out=into)
            return None
        return np.frombuffer(self.blosc.decode(raw), dtype=self.dtype).reshape(self.chunks)

    # ------------------------------------------------------------------ selections
    def _box(self, sel) -> tuple[list[int], list[int], list[int]] | None:
        sel = sel if isinstance(sel, tuple) else (sel,)
        starts, stops, squeeze = [], [], []
        for ax, n in enumerate(self.array.shape):
            s = sel[ax] if ax < len(sel) else slice(None)
            if isinstance(s, (int, np.integer)):
                i = int(s) + n if s < 0 else int(s)
                if not 0 <= i < n:
                    raise IndexError(f"index {s} out of range for axis {ax} of size {n}")
                starts.append(i), stops.append(i + 1), squeeze.append(ax)
            elif isinstance(s, slice) and s.step in (None, 1):
                a, b, _ = s.indices(n)
                starts.append(a), stops.append(max(a, b))
            else:
                return None
        return starts, stops, squeeze

    def __getitem__(self, sel) -> np.ndarray:
        box = self._box(sel) if self.fast else None
        if box is None:
            return self.array[sel]
        try:
            return self._read_box(*box)
        finally:
            for handle, _ in self._fds.values():
                self.files.close(handle)
            self._fds.clear()
            self._ready.clear()

    def _read_box(self, starts: list[int], stops: list[int], squeeze: list[int]) -> np.ndarray:
        out = np.empty([b - a for a, b in zip(starts, stops)], dtype=self.dtype)
        grid = [range(a // c, (b - 1) // c + 1) if b > a else range(0)
                for a, b, c in zip(starts, stops, self.chunks)]
        if self.sharded and self.files.remote and self.files.cache is None:
            self._prefetch(list(itertools.product(*grid)))
        for coords in itertools.product(*grid):
            lo = [max(a, k * c) for a, k, c in zip(starts, coords, self.chunks)]
            hi = [min(b, (k + 1) * c) for b, k, c in zip(stops, coords, self.chunks)]
            src = tuple(slice(l - k * c, h - k * c) for l, h, k, c in zip(lo, hi, coords, self.chunks))
            dst = tuple(slice(l - a, h - a) for l, h, a in zip(lo, hi, starts))
            target = out[dst]
            whole = all(h - l == c for l, h, c in zip(lo, hi, self.chunks))
            if whole and target.flags.c_contiguous:  # the usual case: one full slice, no extra copy
                self._chunk(coords, into=target)
            else:
                target[...] = self._chunk(coords)[src]
        return out[tuple(0 if ax in squeeze else slice(None) for ax in range(out.ndim))]


def _index_codecs(codecs) -> tuple[bool, bool]:
    codecs = list(codecs)
    crc = bool(codecs) and isinstance(codecs[-1], Crc32cCodec)
    core = codecs[:-1] if crc else codecs
    ok = len(core) == 1 and isinstance(core[0], BytesCodec) and getattr(core[0].endian, "value", "little") == "little"
    return ok, crc


def _crc_ok(raw: bytes) -> bool:
    """The last 4 bytes are the little-endian crc32c of the rest (zarr's Crc32cCodec)."""
    import google_crc32c

    return len(raw) >= 4 and google_crc32c.value(raw[:-4]) == int.from_bytes(raw[-4:], "little")


class ShardFiles:
    """The chunk files (shards) of one array, through its store's filesystem
    (``hpc_seg.storage.location``): open, tail, pread, close, whole reads. A handle is the
    filesystem that reads it and its own handle, so with ``cache`` (a local directory) an
    object-store shard is fetched whole once per ETag, atomically, and then read with ``pread``.
    Counts object-store requests and bytes (``bench/object_store.py``)."""

    def __init__(self, where: str, path: str, cache: str | None = None):
        self.where, self.fs = where, loc.fs_for(where)
        self.dir, self.remote = self.fs.join(where, path), self.fs.remote
        self.cache = Path(cache) if cache and self.remote else None
        self._cached: dict[str, str] = {}
        self.requests = self.bytes = 0

    def name(self, key: str) -> str:
        return self.fs.join(self.dir, key)

    def read(self, key: str) -> bytes | None:
        """A whole chunk file; None when absent."""
        return self.fs.read_bytes(self.name(key))

    def open(self, key: str) -> tuple:
        path = self.name(key)
        if self.cache is None:
            return self.fs, self.fs.open(path)
        if path not in self._cached:
            self._cached[path] = self._fetch(path)
        return loc.LOCAL, loc.LOCAL.open(self._cached[path])

    def _fetch(self, path: str) -> str:
        """Download ``path`` whole into the cache (atomically) unless its ETag is there already."""
        import hashlib

        tag = self.fs.version(path)
        self.requests += 1
        local = self.cache / hashlib.sha1(f"{self.fs.key(path)}@{tag}".encode()).hexdigest()[:32]
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
            data = self.fs.read_bytes(path)
            if data is None:
                raise FileNotFoundError(path)
            self.requests, self.bytes = self.requests + 1, self.bytes + len(data)
            tmp.write_bytes(data)
            os.replace(tmp, local)
        return str(local)

    def _counted(self, fs, data: bytes) -> bytes:
        if fs.remote:
            self.requests, self.bytes = self.requests + 1, self.bytes + len(data)
        return data

    def tail(self, handle: tuple, n: int) -> bytes:
        fs, h = handle
        return self._counted(fs, fs.tail(h, n))

    def pread(self, handle: tuple, n: int, offset: int) -> bytes:
        fs, h = handle
        return self._counted(fs, fs.pread(h, n, offset))

    def close(self, handle: tuple) -> None:
        fs, h = handle
        fs.close(h)


def _where(store) -> str | None:
    """The location (``hpc_seg.storage.location``) of a zarr store the fast path reads; None for others."""
    from zarr.storage import FsspecStore, LocalStore

    if isinstance(store, LocalStore):
        return str(store.root)
    if isinstance(store, FsspecStore):
        proto = store.fs.protocol[0] if isinstance(store.fs.protocol, (tuple, list)) else store.fs.protocol
        return f"{proto}://{store.path.rstrip('/')}"
    return None
