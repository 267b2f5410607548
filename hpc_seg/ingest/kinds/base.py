"""The kind record and its registry; ``hpc_seg.ingest.kinds`` imports every built-in kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional



@dataclass(frozen=True)
class CaseSource:
    """One case of a source; ``options``: the kind-specific options of the conversion (e.g.
    ``{"segment": {LABEL: CLASS}}``), which travel with the case to the worker that loads it."""

    case_id: str
    image: Optional[Path]
    label: Optional[Path]
    options: dict = field(default_factory=dict, compare=False)


@dataclass
class Discovered:
    """What ``discover`` found: the cases and the facts of this source (classes may come from it)."""

    cases: list[CaseSource]
    classes: list[str]
    extra: dict = field(default_factory=dict)  # e.g. the MSD task name


@dataclass(frozen=True)
class DatasetKind:
    """Args:
        name: registry name (``hpc-seg prepare NAME …``).
        modality: ``CT`` (int16 HU, one channel) or ``RGB`` (uint8, three channels).
        classes: class names, 0 = background; None when the source defines them (MSD).
        discover: ``(src_dir) -> Discovered``; raises InputDataError for a wrong layout.
        load: ``(CaseSource, classes) -> (image, label, spacing, meta)``; InputDataError on bad files.
        window: default HU window (CT).
        normalize: default normalisation: ``minmax`` / ``zscore`` (CT) or ``rgb``.
        rgb_mean, rgb_std: per-channel statistics for ``rgb``.
        modes: sampling modes that make sense (RGB photos: ``2d`` only).
        merge: ``(class, class it lies inside)`` pairs (LiTS: tumour in liver): on a case of another
            source that does not annotate the class, it counts as the outer one (``hpc_seg.preprocessing.labels``).
        options: names of the kind-specific options its ``load`` reads from ``CaseSource.options``
            (conversion refuses others).
    """

    name: str
    modality: str
    classes: Optional[tuple[str, ...]]
    discover: Callable[[Path], Discovered]
    load: Callable
    window: Optional[tuple[float, float]] = None
    normalize: str = "minmax"
    rgb_mean: tuple[float, ...] = ()
    rgb_std: tuple[float, ...] = ()
    modes: tuple[str, ...] = ("2d", "2.5d", "3d")
    merge: tuple[tuple[str, str], ...] = ()
    options: tuple[str, ...] = ()

    @property
    def channels(self) -> int:
        return 3 if self.modality == "RGB" else 1

    def store_info(self, classes: list[str]) -> dict:
        """The facts written into the store's root attributes at conversion."""
        return {"classes": list(classes), "channels": self.channels, "modality": self.modality,
                "modes": list(self.modes), "merge": dict(self.merge),
                "defaults": {"window": list(self.window) if self.window else None, "normalize": self.normalize,
                             "rgb_mean": list(self.rgb_mean), "rgb_std": list(self.rgb_std)}}


KINDS: dict[str, DatasetKind] = {}


def register(kind: DatasetKind) -> DatasetKind:
    KINDS[kind.name] = kind
    return kind
