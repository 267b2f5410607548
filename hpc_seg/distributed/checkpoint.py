"""Sharded, atomic, verifiable checkpoints around DeepSpeed's ``save_checkpoint``.

Layout under ``RUN_DIR/checkpoints``::

    step00000100/                 DeepSpeed files of every rank (model/optimizer shards)
      rank_state_00000.pt         our per-rank state: RNG states, sampler position
      manifest.json               every file with size and sha256, step, world size, ZeRO stage
    latest                        text: the newest complete tag (DeepSpeed reads it too)
    best                          text: the tag with the best validation mean IoU

Writing is atomic: every rank saves into ``tmp-step…``, then rank 0 renames it, every rank
checksums its share of the files (round-robin over the sorted names), rank 0 writes the manifest
and only then points ``latest`` at it. Resume: rank 0 lists the candidates (``latest`` first, then
older ones) and broadcasts them, every rank verifies its share of each candidate's files (sizes, or
sizes and checksums; round-robin, so it works at any world size) and all ranks take the first tag
that no rank found damaged — they always load the same checkpoint. A damaged checkpoint is skipped
with a warning. ``keep_last`` newest checkpoints are kept, plus ``best``.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path

import torch

from hpc_seg.errors import HpcSegError
from hpc_seg.distributed import collectives as coll
from hpc_seg.storage.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text

TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class CheckpointError(HpcSegError):
    pass


class CheckpointManager:
    """Args:
        root: the ``checkpoints`` directory (shared by all ranks).
        rank, world_size: this process's place.
        keep_last: newest complete checkpoints to keep (``best`` is kept too).
        verify: ``size`` or ``sha256``.
    """

    def __init__(self, root: str | Path, rank: int, world_size: int, keep_last: int = 2, verify: str = "sha256"):
        self.root, self.rank, self.world_size = Path(root), rank, world_size
        self.keep_last, self.verify_mode = keep_last, verify

    # ---------------------------------------------------------------- save
    def save(self, engine, step: int, client_state: dict, rank_state: dict, meta: dict) -> str:
        """Collective: every rank must call it. Returns the tag written."""
        tag, tmp = tag_for(step), f"tmp-{tag_for(step)}"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp, ignore_errors=True)
        coll.barrier()
        error = _attempt(lambda: (engine.save_checkpoint(str(self.root), tag=tmp, client_state=client_state,
                                                          save_latest=False),
                                  atomic_write_bytes(self.root / tmp / f"rank_state_{self.rank:05d}.pt",
                                                     _to_bytes(rank_state))))
        self._agree_or_abort(error, tag, [tmp])
        final = self.root / tag
        if self.rank == 0:
            if final.exists():  # the same step saved again (e.g. signal right after a periodic save)
                shutil.rmtree(final)
            (self.root / tmp).rename(final)
        coll.barrier()
        names = _file_names(final)
        mine = {n: {"size": (final / n).stat().st_size, "sha256": sha256(final / n)}
                for n in names[self.rank::self.world_size]}  # each rank hashes its share
        shares = coll.all_gather_object(mine)
        error = None
        if self.rank == 0:
            files = {n: info for share in shares for n, info in share.items()}
            error = _attempt(lambda: atomic_write_json(final / "manifest.json", {
                **meta, "step": step, "tag": tag, "world_size": self.world_size, "files": dict(sorted(files.items()))}))
            if error is None:
                error = _attempt(lambda: atomic_write_text(self.root / "latest", tag))
        self._agree_or_abort(error, tag, [tag])
        if self.rank == 0:
            self._prune()
        coll.barrier()
        return tag

    def _agree_or_abort(self, error: str | None, tag: str, remove: list[str]) -> None:
        """All ranks learn whether any rank failed to write; then the partial checkpoint is removed
        and CheckpointError raised on every rank (``latest`` and older checkpoints untouched)."""
        if coll.all_max(1.0 if error else 0.0) == 0:
            return
        errors = [e for e in coll.all_gather_object(error) if e]
        if self.rank == 0:
            for name in remove:
                shutil.rmtree(self.root / name, ignore_errors=True)
        coll.barrier()
        previous = self._read_pointer("latest")
        raise CheckpointError(f"{self.root}: writing checkpoint {tag} failed ({errors[0]}); it was removed and "
                              f"nothing else changed: 'latest' still points to {previous or 'no checkpoint'}, "
                              f"intact. Free space (df -h {self.root}) and rerun with --resume latest")

    def mark_best(self, tag: str) -> None:
        if self.rank == 0:
            atomic_write_text(self.root / "best", tag)

    def _prune(self) -> None:
        best = self._read_pointer("best")
        tags = self.tags()
        for tag in tags[: max(len(tags) - self.keep_last, 0)]:
            if tag != best:
                shutil.rmtree(self.root / tag, ignore_errors=True)

    # ---------------------------------------------------------------- resume
    def tags(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and TAG_RE.match(p.name))

    def _read_pointer(self, name: str) -> str | None:
        try:
            return (self.root / name).read_text().strip() or None
        except OSError:
            return None

    def verify(self, tag: str, share: tuple[int, int] = (0, 1)) -> str | None:
        """None if the checkpoint is complete and intact, else the problem. ``share`` = (i, n):
        check only the files i, i+n, i+2n, … of the sorted manifest (one rank's part)."""
        d = self.root / tag
        try:
            manifest = json.loads((d / "manifest.json").read_text())
        except (OSError, ValueError) as exc:
            return f"no readable manifest ({exc.__class__.__name__})"
        items = sorted(manifest["files"].items())[share[0]::share[1]]
        for name, info in items:
            p = d / name
            if not p.is_file():
                return f"file {name} is missing"
            if p.stat().st_size != info["size"]:
                return f"file {name} has {p.stat().st_size} bytes, manifest says {info['size']}"
            if self.verify_mode == "sha256" and sha256(p) != info["sha256"]:
                return f"file {name} fails its checksum"
        return None

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """``latest`` or a path → (root, tag) of a good checkpoint, falling back to older ones."""
        if resume == "latest":
            root = self.root
            wanted = self._read_pointer("latest")
            if wanted is None and not self.tags():
                return None
        else:
            p = Path(resume)
            if not p.exists():
                raise CheckpointError(f"{p}: checkpoint not found")
            if TAG_RE.match(p.name):
                root, wanted = p.parent, p.name
            else:
                root, wanted = p, CheckpointManager(p, 0, 1)._read_pointer("latest")
        other = CheckpointManager(root, self.rank, self.world_size, self.keep_last, self.verify_mode)
        candidates = other.tags()[::-1]
        if wanted in candidates:
            candidates.remove(wanted)
            candidates.insert(0, wanted)
        candidates = coll.broadcast_object(candidates, src=0)  # rank 0's view decides the order
        for tag in candidates:
            problems = [p for p in coll.all_gather_object(other.verify(tag, (self.rank, self.world_size))) if p]
            if not problems:
                return root, tag
            if self.rank == 0:
                warnings.warn(f"checkpoint {root / tag} is damaged ({problems[0]}); trying the previous one",
                              stacklevel=2)
        raise CheckpointError(f"{root}: no intact checkpoint to resume from")

    @staticmethod
    def manifest(root: Path, tag: str) -> dict:
        return json.loads((Path(root) / tag / "manifest.json").read_text())

    @staticmethod
    def load_rank_state(root: Path, tag: str, rank: int) -> dict | None:
        p = Path(root) / tag / f"rank_state_{rank:05d}.pt"
        return torch.load(p, map_location="cpu", weights_only=False) if p.is_file() else None


def _attempt(fn) -> str | None:
    """Run a write; None on success, else one line (disk full shows as OSError, or as the
    RuntimeError that torch.save raises for a failed write)."""
    try:
        fn()
        return None
    except (OSError, RuntimeError) as exc:
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"


def _file_names(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())


def _to_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
