"""DICOM in: a series reader (order by position, HU, spacing, LPS→RAS) and the two DICOM kinds,
3D-IRCADb (generated with pydicom: several tumour folders, shuffled names, non-axial orientation,
a zipped copy) and CHAOS (generated, and the real chaos-ct in the shared_data suite); bad series."""

import shutil
import zipfile

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from hpc_seg.cli import main
from hpc_seg.ingest.convert import convert
from tests.conftest import case_arrays
from hpc_seg.ingest.dicom_io import load_dicom_ct
from hpc_seg.ingest.nifti_io import to_canonical
from hpc_seg.storage.store import open_store
from tests.ingest.dicom_fixtures import expected_ras_affine, phantom_ct, series_geometry, write_series

CORONAL = series_geometry(row=(1, 0, 0), col=(0, 0, -1), spacing=(2.5, 0.8), dz=0.7)  # slices along y


def _ircadb_patient(folder, geo=CORONAL, seed=0):
    hu, liver, t1, t2 = phantom_ct(seed=seed)
    k = hu.shape[0]
    rng = np.random.default_rng(seed)
    order = rng.permutation(k)  # file names and instance numbers unrelated to positions
    names = [f"image_{n}" for n in order]
    inst = [int(n) + 1 for n in rng.permutation(k)]
    write_series(folder / "PATIENT_DICOM", (hu + 1024).astype(np.int16), geo, names=names, instance_numbers=inst)
    for name, mask in (("liver", liver), ("livertumor01", t1), ("livertumor02", t2), ("bone", hu > 2000)):
        write_series(folder / "MASKS_DICOM" / name, (mask * 255).astype(np.int16), geo, names=names,
                     instance_numbers=inst, intercept=0.0)
    return hu, liver, t1, t2


def _zip_dir(folder, name):
    with zipfile.ZipFile(folder / f"{name}.zip", "w") as z:
        for p in sorted((folder / name).rglob("*")):
            z.write(p, p.relative_to(folder))
    shutil.rmtree(folder / name)


def test_series_reader_orders_by_position_and_builds_the_affine(tmp_path):
    hu, *_ = phantom_ct()
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16), CORONAL,
                 names=[f"x{n:03d}" for n in np.random.default_rng(1).permutation(hu.shape[0])])
    canon, series = load_dicom_ct(tmp_path / "s")
    img, slices = series.image, series.slices
    assert series.left_out == []
    assert [s.position for s in slices] == sorted(s.position for s in slices)
    assert np.allclose(img.affine, expected_ras_affine(CORONAL))
    expected = to_canonical(nib.Nifti1Image(hu.transpose(2, 1, 0), expected_ras_affine(CORONAL)), "x")
    assert np.array_equal(canon.data, expected.data)  # HU = stored + intercept, RAS (Z, Y, X)
    assert np.allclose(sorted(canon.spacing), [0.7, 0.8, 2.5])


def test_ircadb_folders_zip_and_structures(tmp_path, capsys):
    src = tmp_path / "3Dircadb1"
    hu, liver, t1, t2 = _ircadb_patient(src / "3Dircadb1.1")
    _ircadb_patient(src / "3Dircadb1.2")
    _zip_dir(src / "3Dircadb1.2", "PATIENT_DICOM")
    _zip_dir(src / "3Dircadb1.2", "MASKS_DICOM")  # as distributed
    assert main(["convert", "ircadb", str(src), str(tmp_path / "ir.zarr")]) == 0
    assert "ircadb_0001: ignored structures: bone" in capsys.readouterr().err
    a_img, a_lab = case_arrays(tmp_path / "ir.zarr", "ircadb_0001")
    b_img, b_lab = case_arrays(tmp_path / "ir.zarr", "ircadb_0002")
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab)  # zipped = unzipped
    assert int((a_lab == 2).sum()) == int((t1 | t2).sum()) and int((a_lab >= 1).sum()) == int((liver | t1 | t2).sum())
    assert abs(a_img[0][a_lab == 1].mean() - 110) < 3 and abs(a_img[0][a_lab == 2].mean() - 30) < 3
    meta = dict(open_store(tmp_path / "ir.zarr")["cases"]["ircadb_0001"].attrs["hpc_seg"])
    assert meta["structures_ignored"] == ["bone"] and "livertumor02" in meta["structures_used"]


def test_bad_dicom_series_each_named_rest_converted(tmp_path, capsys):
    src = tmp_path / "src"
    for n in range(1, 7):
        _ircadb_patient(src / f"p.{n}", seed=n)
    ct = lambda n: src / f"p.{n}" / "PATIENT_DICOM"  # noqa: E731
    hu, *_ = phantom_ct(seed=9)
    write_series(tmp_path / "other", (hu + 1024).astype(np.int16), CORONAL)  # another series
    shutil.copy(next((tmp_path / "other").iterdir()), ct(2) / "stray")
    files = sorted(ct(3).iterdir(), key=lambda p: float(__import__("pydicom").dcmread(p).ImagePositionPatient[1]))
    files[5].unlink()  # a missing slice in the middle
    import pydicom

    ds = pydicom.dcmread(next(ct(4).iterdir()))
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.1, -0.995]
    ds.save_as(next(ct(4).iterdir()))
    ds = pydicom.dcmread(next(ct(5).iterdir()))
    ds.PixelSpacing = [2.5, 0.9]
    ds.save_as(next(ct(5).iterdir()))
    shutil.rmtree(src / "p.6" / "MASKS_DICOM" / "liver" )  # no liver mask
    assert main(["convert", "ircadb", str(src), str(tmp_path / "bad.zarr")]) == 1
    err = capsys.readouterr().err
    assert "ircadb_0001" not in err.split("skipped cases")[-1]
    for n, words in ((2, "series mixed"), (3, "gap in slice positions"), (4, "ImageOrientationPatient"),
                     (5, "PixelSpacing"), (6, "no 'liver' mask")):
        line = next(line for line in err.splitlines() if line.strip().startswith(f"ircadb_{n:04d}:"))
        assert words in line and f"p.{n}" in line, line
    assert open_store(tmp_path / "bad.zarr")["cases"]["ircadb_0001"].attrs["hpc_seg"]["complete"]


def _chaos_patient(folder, reverse=True, seed=0):
    hu, liver, _, _ = phantom_ct(seed=seed)
    k = hu.shape[0]
    axial = series_geometry(dz=2.0)
    inst = list(range(k, 0, -1)) if reverse else list(range(1, k + 1))  # as in CHAOS: position falls with the number
    names = [f"i{n - 1:04d},0000b.dcm" for n in inst]
    write_series(folder / "DICOM_anon", (hu + 1000).astype(np.int16), axial, names=names, instance_numbers=inst,
                 intercept=-1000.0)
    (folder / "Ground").mkdir()
    for z in range(k):  # mask file k belongs to DICOM file k by name
        Image.fromarray((liver[z] * 255).astype(np.uint8)).save(folder / "Ground" / f"liver_GT_{inst[z] - 1:03d}.png")
    return hu, liver


def test_chaos_layout_pairs_masks_by_file_and_bad_masks(tmp_path, capsys):
    src = tmp_path / "Train_Sets" / "CT"
    hu, liver = _chaos_patient(src / "1")
    _chaos_patient(src / "2", seed=2)
    _chaos_patient(src / "3", seed=3)
    (src / "2" / "Ground" / "liver_GT_003.png").unlink()  # mask count ≠ image count
    soft = np.zeros((40, 48), np.uint8)
    soft[10:20, 10:20], soft[20:30, 10:20] = 128, 255  # an anti-aliased / probability mask
    Image.fromarray(soft).save(src / "3" / "Ground" / "liver_GT_004.png")
    assert main(["convert", "chaos", str(tmp_path / "Train_Sets"), str(tmp_path / "c.zarr")]) == 1
    err = capsys.readouterr().err
    assert "11 mask slices for 12 image slices" in err and "not binary" in err
    img, lab = case_arrays(tmp_path / "c.zarr", "chaos_1")
    assert int(lab.sum()) == int(liver.sum())
    assert img[0][lab == 1].mean() == pytest.approx(hu[liver].mean())  # each mask on its own slice
    assert open_store(tmp_path / "c.zarr").attrs["hpc_seg"]["classes"] == ["background", "liver"]


@pytest.mark.shared_data
def test_real_chaos_ct(tmp_path):
    from tests.conftest import shared_path

    r = convert("chaos", shared_path("chaos-ct"), tmp_path / "chaos.zarr", show_progress=False)
    assert r.ok and r.converted == ["chaos_chaos-ct"]
    img, lab = case_arrays(tmp_path / "chaos.zarr", "chaos_chaos-ct")
    assert img.shape == (1, 78, 512, 512) and set(np.unique(lab)) == {0, 1}
    liver_hu = img[0][lab == 1].mean()
    assert 120 < liver_hu < 160  # contrast-enhanced liver: masks paired with their own slices
    assert img[0][lab[::-1] == 1].mean() < 80  # the reversed pairing would not be liver


def test_undecodable_compressed_series_is_a_clear_error(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless

    from hpc_seg.errors import InputDataError

    hu, *_ = phantom_ct(k=3)
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16), CORONAL)
    for p in (tmp_path / "s").iterdir():
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not really a codestream"])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)
    with pytest.raises(InputDataError, match="cannot decode pixel data .*JPEG 2000.*Decompress the series"):
        load_dicom_ct(tmp_path / "s")


def test_reformat_beside_the_slices_is_left_out_and_reported(tmp_path, capsys):
    """A coronal reformat under the CT's SeriesInstanceUID (as scanners add, and tace-1720 has): the axial
    majority is converted, the reformat named in the report, for every DICOM kind (here ircadb)."""
    src = tmp_path / "src"
    hu, liver, t1, t2 = _ircadb_patient(src / "3Dircadb1.1", geo=series_geometry())
    ct = src / "3Dircadb1.1" / "PATIENT_DICOM"
    uid = str(__import__("pydicom").dcmread(next(ct.iterdir())).SeriesInstanceUID)
    write_series(ct, np.zeros((1, 12, 48), np.int16), CORONAL, names=["zz_reformat"], series_uid=uid,
                 image_type=["DERIVED", "SECONDARY", "REFORMATTED"])
    assert main(["convert", "ircadb", str(src), str(tmp_path / "ir.zarr")]) == 0
    err = capsys.readouterr().err
    assert "ircadb_0001: ignored structures: bone; left out zz_reformat: ImageOrientationPatient" in err
    assert "REFORMATTED" in err
    img, lab = case_arrays(tmp_path / "ir.zarr", "ircadb_0001")
    assert img.shape[1] == hu.shape[0] and int((lab == 2).sum()) == int((t1 | t2).sum())


def test_no_orientation_shared_by_most_files_is_refused(tmp_path):
    from hpc_seg.errors import InputDataError

    hu, *_ = phantom_ct(k=4)
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16)[:2], series_geometry(), series_uid="1.2.5")
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16)[:2], CORONAL, names=["c0", "c1"], series_uid="1.2.5")
    with pytest.raises(InputDataError, match="no orientation is shared by most files"):
        load_dicom_ct(tmp_path / "s")


@pytest.mark.shared_data
def test_real_tace_series_keeps_the_axial_slices():
    """tace-1720: 52 axial slices and one coronal reformat with the same SeriesInstanceUID; two SEG
    objects in the case folder around it."""
    from tests.conftest import shared_path

    canon, series = load_dicom_ct(shared_path("tace-1720"))
    assert canon.data.shape == (52, 512, 512) and len(series.slices) == 52
    assert canon.spacing[0] == pytest.approx(5.0) and canon.spacing[1] == pytest.approx(0.744, abs=1e-3)
    names = sorted(x.split(":")[0] for x in series.left_out)
    assert names == ["31_EQP_Ax5.00mm_ManualROI_Liver.dcm", "31_EQP_Ax5.00mm_ManualROI_Tumor.dcm", "dicom-00001.dcm"]
    assert "REFORMATTED" in next(x for x in series.left_out if x.startswith("dicom-00001"))


def test_gantry_tilt_is_refused_not_sheared(tmp_path):
    import pydicom

    from hpc_seg.errors import InputDataError

    hu, *_ = phantom_ct()
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16), series_geometry())
    for f in (tmp_path / "s").iterdir():  # each slice 0.4 mm further along y than the last: a tilted gantry
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.4 * (z - 40.0) / 2.5, z]
        ds.save_as(f)
    with pytest.raises(InputDataError, match=r"not stacked along their normal: .* 4\.4 mm off in-plane .*gantry tilt"):
        load_dicom_ct(tmp_path / "s")


def test_drifting_slice_spacing_and_duplicates_are_refused(tmp_path):
    import pydicom

    from hpc_seg.errors import InputDataError

    hu, *_ = phantom_ct(k=24)
    write_series(tmp_path / "s", (hu + 1024).astype(np.int16), series_geometry(dz=5.0))
    files = sorted((tmp_path / "s").iterdir(), key=lambda f: float(pydicom.dcmread(f).ImagePositionPatient[2]))
    for k, f in enumerate(files[12:]):  # the second half at 4.6 mm: every step within 10 %, the stack not
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], 40.0 + 12 * 5.0 + k * 4.6]
        ds.save_as(f)
    with pytest.raises(InputDataError, match="slice spacing is not regular"):
        load_dicom_ct(tmp_path / "s")
    write_series(tmp_path / "d", (hu + 1024).astype(np.int16)[:6], series_geometry())
    shutil.copy(tmp_path / "d" / "image_2", tmp_path / "d" / "image_2_copy")
    ds = pydicom.dcmread(tmp_path / "d" / "image_2_copy")
    ds.SOPInstanceUID = "1.2.3.99"
    ds.save_as(tmp_path / "d" / "image_2_copy")
    with pytest.raises(InputDataError, match="duplicated slice: image_2 and image_2_copy share position"):
        load_dicom_ct(tmp_path / "d")
