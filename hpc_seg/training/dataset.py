"""Streaming datasets over the hpc-seg Zarr store, and the rank/worker-sharded sampler.

* ``ZarrSliceDataset`` yields 2D slices (``mode: 2d``), 2.5D stacks of ``slices`` adjacent
  slices as channels (``2.5d``; the label is the centre slice) or 3D patches of ``patch_depth``
  slices (``3d``). Every slice of every case is one item (3D: non-overlapping z-windows).
* Items are addressed as ``(index, epoch)``; all randomness (foreground oversampling,
  augmentation) is drawn from ``Generator([seed, epoch, index])``, so a sample is identical
  whichever DataLoader worker or rank produces it, and a resumed run sees the same samples.
* Each item carries its case's ``label_map`` (``hpc_seg.preprocessing.labels``): identity for a case that
  annotates every class, else which class each model class counts as (partially labelled data).
* Zarr arrays are opened lazily per process (after fork/spawn), never shared across workers; a
  dataset pickled for a spawned worker leaves them behind. For an object store (``s3://``) every
  process makes its own filesystem session (``hpc_seg.storage.location``) and the DataLoader starts
  its workers with ``forkserver``, so no worker inherits the main process's HTTP session or event loop.
* ``ShardedSampler`` permutes items by (seed, epoch) and gives rank r the items ``perm[r::world]``;
  DataLoader workers split a rank's stream batch by batch, so each sample is read once per epoch
  per world (``even=True`` wraps at most world-1 items so that all ranks take equal steps).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpc_seg.config.schema import DataConfig
from hpc_seg.storage import store as zstore
from hpc_seg.ingest.index import from_runs, read_index
from hpc_seg.preprocessing.labels import case_label_map
from hpc_seg.storage.location import is_remote
from hpc_seg.preprocessing.plan import PreprocessingPlan, model_input, read_plan
from hpc_seg.preprocessing.augment import augment, resize_label


class ZarrSliceDataset(Dataset):
    """Args:
        store: path of an hpc-seg Zarr store.
        case_ids: cases to draw from (one split).
        cfg: the ``data`` section of the config (sampling: mode, oversampling, augmentation).
        train: enable oversampling and augmentation.
        seed: base seed of all sample randomness.
        plan: the resolved preprocessing plan (default: the store's plan of ``cfg.split_seed``,
            resolved with ``cfg``).
    """

    def __init__(self, store: str | Path, case_ids: list[str], cfg: DataConfig, train: bool,
                 seed: int = 0, plan: PreprocessingPlan | None = None):
        self.store, self.cfg, self.train, self.seed = str(store), cfg, train, seed
        self.plan = plan if plan is not None else read_plan(store, cfg.split_seed).resolve(cfg)
        index = read_index(store)
        missing = [c for c in case_ids if c not in index["cases"]]
        if missing:
            raise zstore.StoreError(f"{store}: cases {missing[:5]} not in the store index")
        self.case_ids = list(case_ids)
        stats = [index["cases"][c]["stats"] for c in self.case_ids]
        self.depths = [s["shape"][0] for s in stats]
        self.fg_slices = [self._fg_slices(s) for s in stats]
        self.label_maps = torch.tensor([case_label_map(self.plan, index, c, index["classes"]) for c in self.case_ids],
                                       dtype=torch.int64).reshape(len(self.case_ids), -1)
        step = cfg.patch_depth if cfg.mode == "3d" else 1
        self.items = np.array([(ci, z) for ci, d in enumerate(self.depths) for z in range(0, d, step)],
                              dtype=np.int64).reshape(-1, 2)
        self._arrays: dict[int, tuple] = {}
        self._pid = None

    def _fg_slices(self, stats: dict) -> tuple[np.ndarray, np.ndarray]:
        by_class = stats["slices_with_class"]
        target = from_runs(by_class.get(str(self.cfg.oversample_class), []))
        any_fg = np.unique(np.concatenate([from_runs(v) for v in by_class.values()] or [np.zeros(0, np.int64)]))
        return target, any_fg

    def __len__(self) -> int:
        return len(self.items)

    def _case(self, ci: int):
        if self._pid != os.getpid():  # opened lazily, once per process (fork/spawn safe)
            self._arrays, self._pid = {}, os.getpid()
        if ci not in self._arrays:
            image, label = zstore.open_case_arrays(self.store, self.case_ids[ci])
            cache = self.cfg.cache
            self._arrays[ci] = (zstore.ChunkReader(image, cache), zstore.ChunkReader(label, cache))
        return self._arrays[ci]

    def __getstate__(self) -> dict:  # a spawned worker opens its own arrays
        return {**self.__dict__, "_arrays": {}, "_pid": None}

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        ci, z = (int(v) for v in self.items[index])
        if self.train and self.cfg.oversample > 0 and rng.random() < self.cfg.oversample:
            target, any_fg = self.fg_slices[ci]
            pool = target if len(target) else any_fg
            if len(pool):
                z = int(pool[rng.integers(len(pool))])
                if self.cfg.mode == "3d":  # centre the patch on the foreground slice
                    z = max(0, min(z - self.cfg.patch_depth // 2, self.depths[ci] - self.cfg.patch_depth))
        return ci, z

    def read(self, ci: int, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Raw (C*k, H, W) image and (H, W) label for 2D/2.5D; (C, D, H, W)/(D, H, W) for 3D."""
        image, label = self._case(ci)
        depth = self.depths[ci]
        if self.cfg.mode == "3d":
            lo, hi = z, z + self.cfg.patch_depth
        else:
            half = (self.cfg.slices // 2) if self.cfg.mode == "2.5d" else 0
            lo, hi = z - half, z + half + 1
        a, b = max(lo, 0), min(hi, depth)
        lab_sel = slice(a, b) if self.cfg.mode == "3d" else z
        img, lab = image[:, a:b], label[lab_sel]
        idx = np.clip(np.arange(lo, hi), 0, depth - 1) - a  # replicate edge slices
        if a != lo or b != hi:
            img = img[:, idx]
        if self.cfg.mode == "3d":  # past the last slice: edge image, background label
            inside = (np.arange(lo, hi) < depth)[:, None, None]
            return img, np.where(inside, lab[np.minimum(idx, b - a - 1)], 0).astype(np.uint8)
        return img.reshape(-1, *img.shape[2:]), lab

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        ci, z = self._pick(index, rng)
        raw, lab = self.read(ci, z)
        image = model_input(self.plan, raw[None])[0]
        label = resize_label(torch.from_numpy(lab.astype(np.int64)), self.plan.size)
        if self.train and self.cfg.augment.enabled:
            image, label = augment(image, label, rng, self.cfg.augment)
        return {"image": image.float(), "label": label, "case": ci, "z": z, "label_map": self.label_maps[ci]}


class ShardedSampler(Sampler):
    """Deterministic (seed, epoch) permutation, sharded over ``world`` ranks; resumable.

    Yields ``(index, epoch)``. ``set_epoch(e)`` starts epoch e; ``skip(n)`` drops the first n
    items of this rank's shard (resuming mid-epoch).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0,
                 even: bool = True):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        self.n, self.rank, self.world, self.shuffle, self.seed, self.even = n, rank, world, shuffle, seed, even
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = epoch, 0

    def skip(self, n: int) -> None:
        self.start = n

    def _shard(self) -> np.ndarray:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        if self.even and self.n % self.world:
            order = np.concatenate([order, order[: self.world - self.n % self.world]])
        return order[self.rank::self.world]

    def __iter__(self):
        for i in self._shard()[self.start:]:
            yield int(i), self.epoch

    def __len__(self) -> int:
        return max(len(self._shard()) - self.start, 0)


def build_loader(cfg: DataConfig, case_ids: list[str], train: bool, rank: int = 0, world: int = 1,
                 seed: int = 0, batch_size: int | None = None, num_workers: int | None = None,
                 plan: PreprocessingPlan | None = None):
    """DataLoader over ``case_ids`` with the sharded sampler; returns (loader, sampler)."""
    ds = ZarrSliceDataset(cfg.store, case_ids, cfg, train=train, seed=seed, plan=plan)
    sampler = ShardedSampler(len(ds), rank, world, shuffle=train, seed=seed, even=train)
    workers = cfg.num_workers if num_workers is None else num_workers
    context = "forkserver" if workers and is_remote(cfg.store) else None
    loader = DataLoader(ds, batch_size=batch_size or cfg.batch_size, sampler=sampler,
                        num_workers=workers, drop_last=train, pin_memory=torch.cuda.is_available(),
                        persistent_workers=workers > 0, collate_fn=_collate, multiprocessing_context=context)
    return loader, sampler


def _compact(label: torch.Tensor) -> torch.Tensor:
    """Class ids as uint8 (an eighth of int64's bytes over the host-to-device copy); the loss
    widens them on the device."""
    fits = label.numel() == 0 or (int(label.min()) >= 0 and int(label.max()) < 256)
    return label.to(torch.uint8) if fits else label


def _collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "label": _compact(torch.stack([it["label"] for it in items])),
            "case": torch.tensor([it["case"] for it in items]),
            "z": torch.tensor([it["z"] for it in items]),
            "label_map": torch.stack([it["label_map"] for it in items])}
