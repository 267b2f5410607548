"""Each kind of bad input: a clear message naming the file, exit != 0, nothing else lost."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hpc_seg.cli import main
from tests.conftest import case_arrays


@pytest.fixture()
def lits_dir(phantom_dir, tmp_path):
    d = tmp_path / "lits"
    d.mkdir()
    for n in (0, 1):
        for kind in ("volume", "segmentation"):
            shutil.copy(phantom_dir / f"{kind}-{n}.nii.gz", d)
    return d


def run_convert(capsys, dataset, src, out):
    code = main(["convert", dataset, str(src), str(out), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_case_reported(code, text, filename, words, out):
    assert code == 1, text
    assert filename in text, text
    assert any(w in text for w in words), text
    image, label = case_arrays(out, "lits_0000")  # the good case was converted all the same
    assert image.size and label.size


def save(img_or_arr, affine, path, dtype=None):
    arr = np.asarray(img_or_arr, dtype=dtype)
    nib.save(nib.Nifti1Image(arr, affine), path)


def test_truncated_nifti(lits_dir, tmp_path, capsys):
    p = lits_dir / "volume-1.nii.gz"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "volume-1.nii.gz", ["corrupt", "truncated"], tmp_path / "o.zarr")


def test_garbage_nifti(lits_dir, tmp_path, capsys):
    (lits_dir / "segmentation-1.nii.gz").write_bytes(b"not a nifti at all")
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "segmentation-1.nii.gz", ["cannot read"], tmp_path / "o.zarr")


def test_shape_mismatch(lits_dir, tmp_path, capsys):
    vol = nib.load(lits_dir / "volume-1.nii.gz")
    save(np.zeros((10, 10, 4)), vol.affine, lits_dir / "segmentation-1.nii.gz", np.uint8)
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "segmentation-1.nii.gz", ["shape"], tmp_path / "o.zarr")


def test_affine_mismatch(lits_dir, tmp_path, capsys):
    seg = nib.load(lits_dir / "segmentation-1.nii.gz")
    aff = seg.affine.copy()
    aff[0, 3] += 5.0
    save(np.asarray(seg.dataobj), aff, lits_dir / "segmentation-1.nii.gz", np.uint8)
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "segmentation-1.nii.gz", ["affine"], tmp_path / "o.zarr")


@pytest.mark.parametrize("values,word", [((0, 1, 3), "outside"), ((0, 0.5, 1), "non-integer")])
def test_bad_label_values(lits_dir, tmp_path, capsys, values, word):
    seg = nib.load(lits_dir / "segmentation-1.nii.gz")
    arr = np.asarray(seg.dataobj).astype(np.float32)
    arr[0, 0, 0], arr[0, 0, 1], arr[0, 0, 2] = values
    save(arr, seg.affine, lits_dir / "segmentation-1.nii.gz", np.float32)
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "segmentation-1.nii.gz", [word], tmp_path / "o.zarr")


def test_nan_voxels(lits_dir, tmp_path, capsys):
    vol = nib.load(lits_dir / "volume-1.nii.gz")
    arr = np.asarray(vol.dataobj).astype(np.float32)
    arr[3, 3, 3], arr[4, 4, 4] = np.nan, np.inf
    save(arr, vol.affine, lits_dir / "volume-1.nii.gz", np.float32)
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "volume-1.nii.gz", ["NaN/inf"], tmp_path / "o.zarr")


def test_volume_without_segmentation(lits_dir, tmp_path, capsys):
    (lits_dir / "segmentation-1.nii.gz").unlink()
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "volume-1.nii.gz", ["no matching segmentation"], tmp_path / "o.zarr")


@pytest.mark.parametrize("dataset", ["lits", "msd", "kvasir"])
def test_empty_or_wrong_layout_dir(tmp_path, capsys, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    code, text = run_convert(capsys, dataset, empty, tmp_path / "o.zarr")
    assert code == 2 and str(empty) in text and ("expected" in text or "no " in text)
    assert not (tmp_path / "o.zarr").exists()  # nothing created


def test_missing_input_dir(tmp_path, capsys):
    code, text = run_convert(capsys, "lits", tmp_path / "nowhere", tmp_path / "o.zarr")
    assert code == 2 and "nowhere" in text and "not found" in text


def test_output_exists_and_is_not_ours(lits_dir, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "thesis.tex").write_text("do not delete")
    code, text = run_convert(capsys, "lits", lits_dir, out)
    assert code == 2 and "precious" in text and "refusing" in text
    assert (out / "thesis.tex").read_text() == "do not delete"
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    f = tmp_path / "afile.zarr"
    f.write_text("x")
    code, text = run_convert(capsys, "lits", lits_dir, f)
    assert code == 2 and f.read_text() == "x"


def test_other_dataset_store_refused(lits_dir, synthetic_rgb, tmp_path, capsys):
    out = tmp_path / "o.zarr"
    assert run_convert(capsys, "lits", lits_dir, out)[0] == 0
    code, text = run_convert(capsys, "kvasir", synthetic_rgb, out)
    assert code == 2 and "may join it only" in text and "lits" in text


def test_unreadable_jpeg_and_mask_size(synthetic_rgb, tmp_path, capsys):
    kv = tmp_path / "kv"
    shutil.copytree(synthetic_rgb, kv)
    names = sorted(p.name for p in (kv / "images").iterdir())
    (kv / "images" / names[0]).write_bytes(b"\xff\xd8\xff garbage")
    Image.new("L", (100, 80)).save(kv / "masks" / names[1])
    code, text = run_convert(capsys, "kvasir", kv, tmp_path / "kv.zarr")
    assert code == 1
    assert names[0] in text and "cannot read image" in text
    assert names[1] in text and "mask size" in text
    assert "6 converted" in text


def test_4d_nifti(lits_dir, tmp_path, capsys):
    vol = nib.load(lits_dir / "volume-1.nii.gz")
    save(np.zeros((8, 8, 4, 2)), vol.affine, lits_dir / "volume-1.nii.gz", np.int16)
    code, text = run_convert(capsys, "lits", lits_dir, tmp_path / "o.zarr")
    assert_case_reported(code, text, "volume-1.nii.gz", ["3D"], tmp_path / "o.zarr")
