"""Overlays show axial CT slices as clinicians read them (radiological convention): the patient's
right on the image's left, anterior up, R/L/A/P at the edges; RGB photos are drawn as stored.

The geometry comes from the files, not from the code under test: markers are placed by their world
(NIfTI RAS+) coordinates through a known affine, read back through the project's ingest path
(``load_ct_pair`` → ``to_canonical``) and prepared by the function ``overlays`` draws with."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hpc_seg.evaluation import report
from hpc_seg.ingest.nifti_io import load_ct_pair

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "totalseg-ct"
SHAPE = (40, 30, 12)  # voxel axes (i, j, k) of the file, deliberately not square
# In NIfTI world space +x is the patient's right and +y anterior; each affine stores the voxels
# in another order, as scanners and converters do.
AFFINES = {
    "RAS": [[2, 0, 0, -40], [0, 3, 0, -45], [0, 0, 4, 0]],
    "LPS": [[-2, 0, 0, 40], [0, -3, 0, 45], [0, 0, 4, 0]],
    "LAS": [[-2, 0, 0, 40], [0, 3, 0, -45], [0, 0, 4, 0]],
    "PRS swapped": [[0, 3, 0, -45], [-2, 0, 0, 40], [0, 0, 4, 0]],
}
RIGHT_ANTERIOR, LEFT_ANTERIOR = 2000, 300  # HU of the two markers; the window clips 2000 to 400


def _world(affine: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _marked_case(tmp_path: Path, rows) -> tuple[Path, Path]:
    """A CT whose markers sit by world position: right-anterior (2000 HU, label 1) and
    left-anterior (300 HU, label 2), both in the middle axial slab."""
    affine = np.vstack([np.asarray(rows, float), [0, 0, 0, 1]])
    x, y, z = np.moveaxis(_world(affine, SHAPE), -1, 0)
    (cx, cy, cz) = [(v.min() + v.max()) / 2 for v in (x, y, z)]
    slab = np.abs(z - cz) < 6
    right_ant = slab & (x - cx > 0.3 * np.ptp(x) / 2) & (y - cy > 0.3 * np.ptp(y) / 2)
    left_ant = slab & (cx - x > 0.3 * np.ptp(x) / 2) & (y - cy > 0.3 * np.ptp(y) / 2)
    ct = np.full(SHAPE, -1000, np.int16)
    ct[right_ant], ct[left_ant] = RIGHT_ANTERIOR, LEFT_ANTERIOR
    seg = (right_ant * 1 + left_ant * 2).astype(np.uint8)
    paths = tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(ct, affine), paths[0])
    nib.save(nib.Nifti1Image(seg, affine), paths[1])
    return paths


def _displayed(image_path: Path, label_path: Path):
    """Through ingest and ``display_slice``: the displayed image and label of the axial slice
    with most label (what evaluate shows), as ``imshow(origin="upper")`` draws them."""
    ct, seg = load_ct_pair(image_path, label_path)
    z = int(np.argmax((seg.data > 0).sum(axis=(1, 2))))
    img, (label,) = report.display_slice(ct.data[None, z], [seg.data[z]], "CT")
    return img, label


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, cols = np.nonzero(mask)
    return float(rows.mean()), float(cols.mean())


@pytest.mark.parametrize("orientation", list(AFFINES))
def test_right_anterior_marker_is_drawn_top_left(tmp_path, orientation):
    img, label = _displayed(*_marked_case(tmp_path, AFFINES[orientation]))
    h, w = img.shape
    ra, la = np.nonzero(img == 400), np.nonzero(img == LEFT_ANTERIOR)
    assert ra[0].size and la[0].size
    assert ra[0].max() < h / 2 and ra[1].max() < w / 2, "patient's right-anterior must be top-left"
    # a transposed slice would keep right-anterior top-left too; the second marker tells them apart
    assert la[0].max() < h / 2 and la[1].min() > w / 2, "patient's left-anterior must be top-right"
    assert np.array_equal(label == 1, img == 400) and np.array_equal(label == 2, img == LEFT_ANTERIOR)


@pytest.mark.parametrize("resave", [False, True], ids=["as shipped (RAS)", "re-saved LPS"])
def test_real_ct_liver_is_drawn_on_the_image_left(tmp_path, resave):
    ct_path, liver_path = FIXTURE / "ct.nii.gz", FIXTURE / "liver.nii.gz"
    if resave:  # the same patient stored the DICOM way: voxel x and y reversed, affine to match
        for src in (ct_path, liver_path):
            im = nib.load(str(src))
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [im.shape[0] - 1, im.shape[1] - 1]
            nib.save(nib.Nifti1Image(np.asanyarray(im.dataobj)[::-1, ::-1], im.affine @ flip), tmp_path / src.name)
        ct_path, liver_path = tmp_path / "ct.nii.gz", tmp_path / "liver.nii.gz"
        assert nib.aff2axcodes(nib.load(str(ct_path)).affine) == ("L", "P", "S")
    img, liver = _displayed(ct_path, liver_path)
    _, col = _centroid(liver > 0)
    assert col < liver.shape[1] / 2, f"liver centroid at column {col:.1f} of {liver.shape[1]}: not on the left"
    assert liver.shape == img.shape


def test_rgb_photos_are_not_flipped():
    photo = np.zeros((3, 20, 30), np.uint8)
    photo[:, :5, :5] = 255  # top-left of the photo
    mask = np.zeros((20, 30), np.uint8)
    mask[:5, :5] = 1
    img, (shown,) = report.display_slice(photo, [mask], "RGB")
    assert img.shape == (20, 30, 3) and np.array_equal(img, photo.transpose(1, 2, 0))
    assert np.array_equal(shown, mask)


def _drawn_figure(monkeypatch, tmp_path, image, label, modality):
    got = {}
    monkeypatch.setattr(report, "_save", lambda fig, path: got.setdefault("fig", fig))
    names = ["background", "liver"]
    res = {"per_case": [{"case": "c0", "per_class": {"background": {"dice": 1.0}, "liver": {"dice": 0.5}}}]}
    report.overlays({"c0": (3, image, label, label)}, res, names, tmp_path / "o.png", modality=modality)
    return got["fig"]


def test_overlays_draw_ct_radiologically_with_letters(monkeypatch, tmp_path):
    image = np.arange(20 * 30, dtype=np.int16).reshape(1, 20, 30) - 100
    label = np.zeros((20, 30), np.uint8)
    label[15:, 25:] = 1  # largest Y and X: the patient's right-anterior
    fig = _drawn_figure(monkeypatch, tmp_path, image, label, "CT")
    for ax in fig.axes:
        assert ax.images[0].origin == "upper"
        assert np.array_equal(ax.images[0].get_array(), np.clip(image[0], -100, 400)[::-1, ::-1])
        at = {t.get_text(): t.get_position() for t in ax.texts}
        assert set(at) == {"R", "L", "A", "P"}
        assert at["R"][0] < 0.1 and at["L"][0] > 0.9 and abs(at["R"][1] - 0.5) < 1e-9
        assert at["A"][1] > 0.9 and at["P"][1] < 0.1 and abs(at["A"][0] - 0.5) < 1e-9
    overlay = np.ma.filled(fig.axes[1].images[1].get_array(), 0)
    assert overlay[:5, :5].all() and not overlay[5:].any() and not overlay[:, 5:].any(), \
        "the right-anterior label must be drawn top-left"


def test_overlays_draw_rgb_as_stored_without_letters(monkeypatch, tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, (3, 20, 30), dtype=np.uint8)
    label = np.zeros((20, 30), np.uint8)
    label[:5, :5] = 1
    fig = _drawn_figure(monkeypatch, tmp_path, photo, label, "RGB")
    for ax in fig.axes:
        assert ax.images[0].origin == "upper" and not ax.texts
        assert np.array_equal(ax.images[0].get_array(), photo.transpose(1, 2, 0))
    overlay = np.ma.filled(fig.axes[1].images[1].get_array(), 0)
    assert overlay[:5, :5].all() and overlay.sum() == 25
