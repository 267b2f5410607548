"""Streaming datasets over the hpc-seg Zarr store, and the rank/worker-sharded sampler.

* ``ZarrSliceDataset`` yields 2D slices (``mode: 2d``) or 2.5D stacks of ``slices`` adjacent
  slices as channels (``2.5d``; the label is the centre slice): every slice of every case is one
  item. ``ZarrPatchDataset`` yields 3D patches of ``patch_depth`` slices (``3d``): one item per
  non-overlapping z-window. Both cut samples by ``hpc_seg.preprocessing.slices``, the rule
  whole-volume inference uses (past either end of a case the edge slice repeats); they share
  :class:`ZarrCaseDataset` (cases, items, oversampling, the sample pipeline). :func:`make_dataset`
  picks one by ``cfg.mode``.
* Items are addressed as ``(index, epoch)``; all randomness (foreground oversampling,
  augmentation) is drawn from ``Generator([seed, epoch, index])``, so a sample is identical
  whichever DataLoader worker or rank produces it, and a resumed run sees the same samples.
* Oversampling prefers slices of the class named by ``data.oversample_class`` among the store's
  classes, and any foreground slice for a case without it or a name the store lacks (Kvasir has no
  ``tumour``: its polyp slices are preferred).
* Each item carries its case's ``label_map`` (``hpc_seg.preprocessing.labels``): identity for a case that
  annotates every class, else which class each model class counts as (partially labelled data).
* The store is one :class:`~hpc_seg.ingest.catalog.Store` (index and plan read once). Zarr arrays
  are opened lazily per process (after fork/spawn), never shared across workers; a dataset pickled
  for a spawned worker leaves them, and the Store's root, behind. For an object store (``s3://``)
  every process makes its own filesystem session (``hpc_seg.storage.location``) and the DataLoader
  starts its workers with ``forkserver``, so no worker inherits the main process's HTTP session or
  event loop.
* ``ZarrCropDataset`` cuts 2D/2.5D samples around an organ's box (a cascade's stage 2).
* ``ShardedSampler`` permutes items by (seed, epoch) and gives rank r the items ``perm[r::world]``;
  DataLoader workers split a rank's stream batch by batch, so each sample is read once per epoch
  per world (``even=True`` wraps at most world-1 items so that all ranks take equal steps).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hpc_seg.config.schema import DataConfig
from hpc_seg.errors import StoreError
from hpc_seg.ingest.catalog import Store
from hpc_seg.ingest.index import from_runs
from hpc_seg.preprocessing.augment import augment, resize_label
from hpc_seg.preprocessing.crop import class_mask, crop_box, organ_box
from hpc_seg.preprocessing.labels import case_label_map
from hpc_seg.preprocessing.plan import PreprocessingPlan, model_input
from hpc_seg.preprocessing.slices import edge_indices, window
from hpc_seg.storage.chunks import ChunkReader


_WARNED_INDICES: set = set()


def oversample_target(wanted: str | int, classes: list[str]) -> int | None:
    """The index (among the store's ``classes``, which the index's per-slice statistics use) of the
    class whose slices oversampling prefers; None, i.e. any foreground slice, for a name the store
    lacks. An int is read as that index for one version, with a FutureWarning naming the name to
    write instead."""
    if not isinstance(wanted, (int, np.integer)) or isinstance(wanted, bool):
        return classes.index(wanted) if wanted in classes else None
    name = classes[wanted] if 0 <= wanted < len(classes) else None
    instead = (f"data.oversample_class: {name}" if name is not None else
               f"one of {classes[1:]} (index {wanted} is no class of this store: any foreground slice is preferred)")
    if wanted not in _WARNED_INDICES:  # once per process: every dataset (validation too) resolves it
        _WARNED_INDICES.add(wanted)
        warnings.warn(f"data.oversample_class: {wanted} is a class index, read as one for this version only; "
                      f"write the class name instead: {instead}", FutureWarning, stacklevel=3)
    return int(wanted)


def _fg_slices(stats: dict, target: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(slices containing the target class, slices containing any foreground) of one case."""
    by_class = stats["slices_with_class"]
    preferred = from_runs(by_class.get(str(target), [])) if target is not None else from_runs([])
    any_fg = np.unique(np.concatenate([from_runs(v) for v in by_class.values()] or [np.zeros(0, np.int64)]))
    return preferred, any_fg


def _read_window(image, lo: int, hi: int, depth: int) -> tuple[np.ndarray, int]:
    """Slices lo..hi-1 of a (C, Z, H, W) case as (C, hi-lo, H, W), reading only the slices inside
    it (one box read); outside, the edge slice repeats. Also returns the first slice read."""
    a, b = max(lo, 0), min(hi, depth)
    img = image[:, a:b]
    if (a, b) != (lo, hi):
        img = img[:, edge_indices(lo, hi, depth) - a]
    return img, a


class ZarrCaseDataset(Dataset):
    """What the slice and the patch dataset share. Args:
        store: an hpc-seg store: a path or an open :class:`~hpc_seg.ingest.catalog.Store`.
        case_ids: cases to draw from (one split).
        cfg: the ``data`` section of the config (sampling: mode, oversampling, augmentation).
        train: enable oversampling and augmentation.
        seed: base seed of all sample randomness.
        plan: the resolved preprocessing plan (default: the store's plan of ``cfg.split_seed``,
            resolved with ``cfg``).
    Subclasses say which ``modes`` they cut, the z-step between items and how a sample is read.
    """

    modes: tuple[str, ...] = ()

    def __init__(self, store: Store | str | Path, case_ids: list[str], cfg: DataConfig, train: bool,
                 seed: int = 0, plan: PreprocessingPlan | None = None):
        if cfg.mode not in self.modes:
            raise ValueError(f"{type(self).__name__} cuts {'/'.join(self.modes)} samples, not data.mode "
                             f"'{cfg.mode}'; make_dataset picks the dataset of a mode")
        self.store, self.cfg, self.train, self.seed = Store.of(store), cfg, train, seed
        self.plan = plan if plan is not None else self.store.plan(cfg.split_seed).resolve(cfg)
        index = self.store.index
        missing = [c for c in case_ids if c not in index["cases"]]
        if missing:
            raise StoreError(f"{self.store}: cases {missing[:5]} not in the store index")
        self.case_ids = list(case_ids)
        stats = [index["cases"][c]["stats"] for c in self.case_ids]
        self.depths = [s["shape"][0] for s in stats]
        target = oversample_target(cfg.oversample_class, list(index["classes"]))
        self.fg_slices = [_fg_slices(s, target) for s in stats]
        self.label_maps = torch.tensor([case_label_map(self.plan, index, c, index["classes"]) for c in self.case_ids],
                                       dtype=torch.int64).reshape(len(self.case_ids), -1)
        step = self.step()
        self.items = np.array([(ci, z) for ci, d in enumerate(self.depths) for z in range(0, d, step)],
                              dtype=np.int64).reshape(-1, 2)
        self._arrays: dict[int, tuple] = {}
        self._pid = None

    def step(self) -> int:
        """Slices between the first slices of consecutive items of a case."""
        return 1

    def start(self, ci: int, z: int) -> int:
        """The item's first-slice coordinate for a sample drawn at foreground slice ``z``."""
        return z

    def read(self, ci: int, z: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.items)

    def _case(self, ci: int):
        if self._pid != os.getpid():  # opened lazily, once per process (fork/spawn safe)
            self._arrays, self._pid = {}, os.getpid()
        if ci not in self._arrays:
            image, label = self.store.case(self.case_ids[ci])
            cache = self.cfg.cache
            self._arrays[ci] = (ChunkReader(image, cache), ChunkReader(label, cache))
        return self._arrays[ci]

    def __getstate__(self) -> dict:  # a spawned worker opens its own arrays (the Store pickles its path only)
        return {**self.__dict__, "_arrays": {}, "_pid": None}

    def _pick(self, index: int, rng: np.random.Generator) -> tuple[int, int]:
        ci, z = (int(v) for v in self.items[index])
        if self.train and self.cfg.oversample > 0 and rng.random() < self.cfg.oversample:
            target, any_fg = self.fg_slices[ci]
            pool = target if len(target) else any_fg
            if len(pool):
                z = self.start(ci, int(pool[rng.integers(len(pool))]))
        return ci, z

    def __getitem__(self, key) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng([self.seed, epoch, index])
        ci, z = self._pick(index, rng)
        raw, lab = self.read(ci, z, rng)
        image = model_input(self.plan, raw[None])[0]
        label = resize_label(torch.from_numpy(lab.astype(np.int64)), self.plan.size)
        if self.train and self.cfg.augment.enabled:
            image, label = augment(image, label, rng, self.cfg.augment)
        return {"image": image.float(), "label": label, "case": ci, "z": z, "label_map": self.label_maps[ci]}


class ZarrSliceDataset(ZarrCaseDataset):
    """2D slices and 2.5D stacks (``slices`` adjacent slices centred on the item's slice)."""

    modes = ("2d", "2.5d")

    def read(self, ci: int, z: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (C*k, H, W) image (channel-major) and (H, W) label of the sample at slice ``z``."""
        image, label = self._case(ci)
        img, _ = _read_window(image, *window(z, self.cfg.mode, slices=self.cfg.slices), self.depths[ci])
        return img.reshape(-1, *img.shape[2:]), label[z]


class ZarrPatchDataset(ZarrCaseDataset):
    """3D patches of ``patch_depth`` slices; an oversampled patch is centred on its foreground slice."""

    modes = ("3d",)

    def step(self) -> int:
        return self.cfg.patch_depth

    def start(self, ci: int, z: int) -> int:
        return max(0, min(z - self.cfg.patch_depth // 2, self.depths[ci] - self.cfg.patch_depth))

    def read(self, ci: int, z: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (C, D, H, W) image and (D, H, W) label of the patch from slice ``z``; past the last
        slice the image repeats the edge slice and the label is background."""
        image, label = self._case(ci)
        depth = self.depths[ci]
        lo, hi = window(z, "3d", patch_depth=self.cfg.patch_depth)
        img, a = _read_window(image, lo, hi, depth)
        lab = label[a:min(hi, depth)][edge_indices(lo, hi, depth) - a]
        inside = (np.arange(lo, hi) < depth)[:, None, None]
        return img, np.where(inside, lab, 0).astype(np.uint8)


class ZarrCropDataset(ZarrSliceDataset):
    """Samples cut around an organ: a cascade's stage 2 (``data.crop_around``, ``plan.crop``).

    Each case's box is the 3D bounding box of its reference organ (the store classes named in
    ``plan.crop["around"]``), grown by ``crop_margin`` of its extent per axis and, in training, with each
    edge moved by up to ``crop_jitter`` of it (``hpc_seg.preprocessing.crop``, the rule inference uses
    on stage 1's organ without jitter). Items are the slices of the box (margin included); a 2.5D stack
    repeats the box's edge slice past its ends, as inference on the cropped volume does. The crop is
    resized to the plan's input size by ``model_input`` like any slice. A case that marks no organ
    gives no items, and so does a case that does not annotate the organ's first class (a tumour-only
    mask gives no liver box). Boxes are found on first use of a case in each process (its label
    volume read once).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.plan.crop:
            raise StoreError("ZarrCropDataset needs a plan with a crop (data.crop_around)")
        classes = list(self.store.index["classes"])
        self.organ = [c for c in self.plan.crop["around"] if c in classes]
        self._boxes: dict[int, tuple] = {}
        keep = []
        for ci, cid in enumerate(self.case_ids):
            zr = self._z_range(cid, classes)
            if zr is not None:
                keep += [(ci, z) for z in range(*zr)]
        if not keep and self.case_ids and self.train:  # validation: a rank's share may hold none (it then pads)
            raise StoreError(f"{self.store}: no case of {len(self.case_ids)} marks {self.organ}: nothing to crop around")
        self.items = np.array(keep, dtype=np.int64).reshape(-1, 2)

    def _z_range(self, cid: str, classes: list[str]) -> tuple[int, int] | None:
        """The box's slices with the margin (no jitter), from the index: no voxel is read."""
        annotated = self.store.index["cases"][cid].get("annotated")
        if annotated is not None and self.organ[0] not in annotated:  # e.g. tumour marked, liver not: no box
            return None
        stats = self.store.index["cases"][cid]["stats"]
        zs = [from_runs(stats["slices_with_class"].get(str(classes.index(c)), [])) for c in self.organ]
        zs = np.concatenate(zs) if zs else np.zeros(0, np.int64)
        if zs.size == 0:
            return None
        depth = stats["shape"][0]
        cut = crop_box(((int(zs.min()), int(zs.max()) + 1), (0, 1), (0, 1)), (depth, 1, 1), self.cfg.crop_margin)
        return cut[0].start, cut[0].stop

    def _box(self, ci: int) -> tuple:
        if ci not in self._boxes:
            _, label = self.store.case(self.case_ids[ci])
            lab = label[...]
            self._boxes[ci] = (organ_box(class_mask(lab, self.store.index["classes"], self.organ)), lab.shape)
        return self._boxes[ci]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "_boxes": {}}

    def read(self, ci: int, z: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Raw (C*k, h, w) crop and (h, w) label of slice ``z`` of case ``ci``'s box."""
        box, shape = self._box(ci)
        jitter = rng if self.train else None
        zs, ys, xs = crop_box(box, shape, self.cfg.crop_margin, self.cfg.crop_jitter, jitter)
        zlo, zhi = min(zs.start, z), max(zs.stop, z + 1)  # a jittered box still holds its item's slice
        lo, hi = window(z, self.cfg.mode, slices=self.cfg.slices)
        idx = np.clip(np.arange(lo, hi), zlo, zhi - 1)
        image, label = self._case(ci)
        a, b = int(idx.min()), int(idx.max()) + 1
        img = image[:, a:b][:, idx - a][:, :, ys, xs]
        return img.reshape(-1, *img.shape[2:]), label[z][ys, xs]


def make_dataset(store: Store | str | Path, case_ids: list[str], cfg: DataConfig, train: bool, seed: int = 0,
                 plan: PreprocessingPlan | None = None) -> ZarrCaseDataset:
    """The dataset of ``cfg.mode``: :class:`ZarrPatchDataset` for ``3d``, :class:`ZarrCropDataset`
    when samples are cut around an organ (``data.crop_around``), else :class:`ZarrSliceDataset`."""
    cls = ZarrPatchDataset if cfg.mode == "3d" else ZarrCropDataset if cfg.crop_around else ZarrSliceDataset
    return cls(store, case_ids, cfg, train=train, seed=seed, plan=plan)


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
                 plan: PreprocessingPlan | None = None, store: Store | None = None):
    """DataLoader over ``case_ids`` with the sharded sampler (the dataset of ``cfg.mode``); returns
    (loader, sampler). ``store``: ``cfg.store`` already open (default: opened here)."""
    ds = make_dataset(store if store is not None else cfg.store, case_ids, cfg, train=train, seed=seed, plan=plan)
    sampler = ShardedSampler(len(ds), rank, world, shuffle=train, seed=seed, even=train)
    workers = cfg.num_workers if num_workers is None else num_workers
    context = "forkserver" if workers and ds.store.remote else None
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
