"""``predict`` on what clinics hold: a DICOM series folder (reformats and SEG objects beside it left
out, compressed syntaxes, several series), DICOM-SEG out read back with highdicom, a folder of cases
with volumes.csv, and the one-line refusals (NIfTI → DICOM-SEG, an existing output, not a CT)."""

import csv
import json
import shutil

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from hpc_seg import __version__
from hpc_seg.cli import main
from tests.conftest import FIXTURES
from tests.evaluation.conftest import CT
from tests.ingest.dicom_fixtures import nifti_as_series, series_geometry, write_series

@pytest.fixture(scope="module")
def model(exports):
    return exports / "m.safetensors"  # tests/evaluation/conftest.py


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """The real CT as an axial DICOM series, and its NIfTI prediction's reference."""
    d = tmp_path_factory.mktemp("series")
    uid, _ = nifti_as_series(CT, d / "ct")
    return d / "ct", uid


def _labels(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _predict(*args):
    return main(["predict", *map(str, args), "--cpu"])


def test_dicom_series_in_gives_the_nifti_prediction(model, series, tmp_path, capsys):
    folder, uid = series
    assert _predict(model, CT, "--out", tmp_path / "from_nifti.nii.gz") == 0
    assert _predict(model, folder, "--out", tmp_path / "from_dicom.nii.gz") == 0
    a, b = nib.load(str(tmp_path / "from_nifti.nii.gz")), nib.load(str(tmp_path / "from_dicom.nii.gz"))
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(nib.as_closest_canonical(b).dataobj))
    assert np.allclose(nib.as_closest_canonical(b).affine, a.affine, atol=1e-3)  # same place in the patient
    la = np.asarray(a.dataobj)
    assert 0 < (la > 0).mean() < 0.5, "a uniform prediction would hide a flipped grid"
    assert not np.array_equal(la, la[::-1]) and not np.array_equal(la, la[:, ::-1])  # flips would show
    info = json.loads((tmp_path / "from_dicom.nii.gz.json").read_text())
    assert info["series_uid"] == uid and info["spacing_mm"] == [3.0, 3.0, 3.0] and info["model_sha256"]
    counts = np.bincount(np.asarray(a.dataobj).ravel(), minlength=3)
    assert info["liver_ml"] == pytest.approx((counts[1] + counts[2]) * 27 / 1000, abs=1e-3)
    assert info["tumour_ml"] == pytest.approx(counts[2] * 27 / 1000, abs=1e-3)
    assert "wrote" in capsys.readouterr().out


def test_dicom_seg_out_read_back_with_highdicom(model, series, tmp_path):
    folder, uid = series
    assert _predict(model, folder, "--out", tmp_path / "ref.nii.gz") == 0
    assert _predict(model, folder, "--out", tmp_path / "pred.dcm") == 0
    ref = _labels(tmp_path / "ref.nii.gz")  # (col, row, slice) of the series' own grid
    seg = hd.seg.segread(tmp_path / "pred.dcm")
    assert seg.SegmentationType == "BINARY" and seg.Modality == "SEG"
    assert [(d.SegmentNumber, d.SegmentLabel) for d in seg.SegmentSequence] == [(1, "liver"), (2, "tumour")]
    liver, tumour = seg.SegmentSequence
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"
    algo = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmVersion == __version__ and "unet_aspp" in algo.AlgorithmName
    assert seg.SoftwareVersions == __version__ and seg.Manufacturer == "hpc-seg"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
    files = sorted(folder.iterdir())
    sop = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    assert {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == set(sop)
    order = sorted(sop, key=lambda u: float(pydicom.dcmread(sop[u]).ImagePositionPatient[2]))
    back = seg.get_pixels_by_source_instance(order, segment_numbers=[1, 2], combine_segments=True,
                                            relabel=False, assert_missing_frames_are_empty=True)
    assert np.array_equal(back, ref.transpose(2, 1, 0))  # (slice, row, col): the NIfTI prediction's voxels
    present = sum(int((ref[..., k] == c).any()) for k in range(ref.shape[2]) for c in (1, 2))
    assert seg.NumberOfFrames == present  # only frames that hold a segment


def test_reformat_seg_and_compressed_slices_beside_the_series(model, series, tmp_path, capsys):
    folder, uid = series
    assert _predict(model, folder, "--out", tmp_path / "plain.nii.gz") == 0
    mixed = tmp_path / "mixed"
    shutil.copytree(folder, mixed)
    coronal = series_geometry(row=(1, 0, 0), col=(0, 0, -1))
    write_series(mixed, np.zeros((1, 30, 122), np.int16), coronal, names=["reformat"], series_uid=uid,
                 image_type=["DERIVED", "SECONDARY", "REFORMATTED"])
    assert _predict(model, folder, "--out", tmp_path / "seg.dcm") == 0
    shutil.copy(tmp_path / "seg.dcm", mixed / "seg.dcm")  # a SEG object in the series folder
    from pydicom.uid import JPEGLSLossless, RLELossless

    for i, f in enumerate(sorted(p for p in mixed.iterdir() if p.name.startswith("image_"))[:6]):
        ds = pydicom.dcmread(f)
        ds.compress(RLELossless if i % 2 else JPEGLSLossless)  # decoders installed: read like the rest
        ds.save_as(f)
    capsys.readouterr()
    assert _predict(model, mixed, "--out", tmp_path / "mixed.nii.gz") == 0
    err = capsys.readouterr().err
    assert "left out reformat: ImageOrientationPatient" in err and "REFORMATTED" in err
    assert "left out seg.dcm: not an image slice (Segmentation Storage)" in err
    assert np.array_equal(_labels(tmp_path / "mixed.nii.gz"), _labels(tmp_path / "plain.nii.gz"))
    from hpc_seg.evaluation.predict import read_input

    assert np.array_equal(read_input(mixed).canon.data, read_input(folder).canon.data)  # decoded voxel for voxel


def test_several_series_need_a_choice(model, series, tmp_path, capsys):
    folder, uid = series
    both = tmp_path / "both"
    shutil.copytree(folder, both)
    other = write_series(tmp_path / "b", np.full((4, 20, 20), 24, np.int16), series_geometry())
    shutil.copy(next((tmp_path / "b").iterdir()), both / "stray")  # one file of another series
    assert _predict(model, both, "--out", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert "2 DICOM series mixed in one folder" in err and "--series UID" in err and len(err.strip().splitlines()) == 1
    assert _predict(model, both, "--out", tmp_path / "x.nii.gz", "--series", "1.2.999") == 2
    err = capsys.readouterr().err
    assert "no series 1.2.999 here; series present:" in err and f"{uid} (#3, 30 files)" in err and f"{other} (#3, 1 file)" in err
    assert not (tmp_path / "x.nii.gz").exists()
    assert _predict(model, both, "--out", tmp_path / "x.nii.gz", "--series", uid) == 0
    assert np.array_equal(_labels(tmp_path / "x.nii.gz"), _labels_of(model, folder, tmp_path))


def _labels_of(model, folder, tmp_path):
    assert _predict(model, folder, "--out", tmp_path / "ref_series.nii.gz", "--overwrite") == 0
    return _labels(tmp_path / "ref_series.nii.gz")


def test_one_line_refusals_write_nothing(model, tmp_path, capsys):
    out = tmp_path / "p.dcm"
    assert _predict(model, CT, "--out", out) == 2
    err = capsys.readouterr().err
    assert "a DICOM-SEG needs a DICOM series as input" in err and str(CT) in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not (tmp_path / "p.dcm.json").exists()
    labels = nib.load(str(FIXTURES / "totalseg-ct" / "liver.nii.gz"))
    assert _predict(model, FIXTURES / "totalseg-ct" / "liver.nii.gz", "--out", tmp_path / "l.nii.gz") == 2
    assert "do not look like a CT in Hounsfield units" in capsys.readouterr().err
    existing = tmp_path / "exists.nii.gz"
    nib.save(labels, str(existing))
    before = existing.read_bytes()
    assert _predict(model, CT, "--out", existing) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and existing.read_bytes() == before
    assert _predict(model, CT, "--out", existing, "--overwrite") == 0 and existing.read_bytes() != before


def test_a_folder_of_cases(model, series, tmp_path, capsys):
    folder, _ = series
    cases = tmp_path / "in"
    cases.mkdir()
    shutil.copy(CT, cases / "alpha.nii.gz")
    shutil.copytree(folder, cases / "bravo")  # a DICOM series folder
    (cases / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    (cases / "notes.txt").write_text("not a case")
    out = tmp_path / "out"
    assert _predict(model, cases, "--out", out, "--format", "dicom-seg") == 1
    text = capsys.readouterr()
    assert "2 predicted, 0 already done" in text.out and "1 failed" in text.out
    assert "broken: " in text.err and "cannot read NIfTI" in text.err and "notes.txt" in text.err
    assert "alpha: NIfTI input: written as NIfTI" in text.err
    assert (out / "alpha.nii.gz").is_file() and (out / "bravo.dcm").is_file()
    rows = {r["case"]: r for r in csv.DictReader((out / "volumes.csv").open())}
    assert list(rows) == ["alpha", "bravo", "broken"]
    assert "cannot read NIfTI" in rows["broken"]["error"] and rows["broken"]["liver_ml"] == ""
    assert rows["alpha"]["liver_ml"] == rows["bravo"]["liver_ml"] != ""  # the same CT, NIfTI and DICOM
    assert float(rows["alpha"]["liver_ml"]) == json.loads((out / "alpha.nii.gz.json").read_text())["liver_ml"]
    assert "[1/3] alpha: done" in text.err and "[3/3] broken: failed" in text.err  # lines off a terminal
    mtime = (out / "alpha.nii.gz").stat().st_mtime_ns
    (cases / "broken.nii.gz").unlink()
    assert _predict(model, cases, "--out", out, "--format", "dicom-seg") == 0
    assert "0 predicted, 2 already done" in capsys.readouterr().out
    assert (out / "alpha.nii.gz").stat().st_mtime_ns == mtime
    assert _predict(model, cases, "--out", out, "--overwrite") == 0
    assert "2 predicted" in capsys.readouterr().out and (out / "alpha.nii.gz").stat().st_mtime_ns != mtime


def test_anonymised_series_and_odd_folders(model, series, tmp_path, capsys):
    """Type 2 attributes an anonymiser removed are no reason to refuse a DICOM-SEG; a folder holding
    only SEG objects, a localizer series beside the CT, a multi-frame object: each said in one line."""
    folder, uid = series
    anon = tmp_path / "anon"
    shutil.copytree(folder, anon)
    for f in anon.iterdir():
        ds = pydicom.dcmread(f)
        for key in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate", "StudyTime", "AccessionNumber"):
            delattr(ds, key)
        ds.save_as(f)
    assert _predict(model, anon, "--out", tmp_path / "anon.dcm") == 0
    assert hd.seg.segread(tmp_path / "anon.dcm").SegmentationType == "BINARY"
    only_seg = tmp_path / "only_seg"
    only_seg.mkdir()
    shutil.copy(tmp_path / "anon.dcm", only_seg / "seg.dcm")
    capsys.readouterr()
    assert _predict(model, only_seg, "--out", tmp_path / "x.nii.gz") == 2
    err = capsys.readouterr().err
    assert "no single-frame image slices (left out: seg.dcm: not an image slice" in err and len(err.splitlines()) == 1
    scout = tmp_path / "with_scout"
    shutil.copytree(folder, scout)
    write_series(scout, np.full((1, 30, 30), 24, np.int16), series_geometry(), names=["scout"],
                 image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    assert _predict(model, scout, "--out", tmp_path / "scout.nii.gz") == 0
    assert "a localizer" in capsys.readouterr().err
    assert np.array_equal(_labels(tmp_path / "scout.nii.gz"), _labels_of(model, folder, tmp_path))
    ds = pydicom.dcmread(next(scout.glob("image_*")))
    ds.NumberOfFrames = 2
    ds.save_as(scout / "enhanced")
    assert _predict(model, scout, "--out", tmp_path / "scout.nii.gz", "--overwrite") == 0
    assert "enhanced: multi-frame object (2 frames" in capsys.readouterr().err


def test_output_names_checked_before_the_model_runs(model, series, tmp_path, capsys):
    folder, _ = series
    for out, extra, words in ((tmp_path / "pred", [], "a nifti output ends in .nii.gz or .nii"),
                              (tmp_path / "x.dcm", ["--format", "nifti"], "a nifti output ends in"),
                              (tmp_path / "x.nii.gz", ["--format", "dicom-seg"], "a dicom-seg output ends in .dcm"),
                              (tmp_path, [], "is a folder"), (CT, ["--overwrite"], "is the input itself")):
        assert _predict(model, folder if out != CT else CT, "--out", out, *extra) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.splitlines()) == 1, err
    one = tmp_path / "one.dcm"
    shutil.copy(next(folder.iterdir()), one)
    assert _predict(model, one, "--out", tmp_path / "y.nii.gz") == 2
    assert "one DICOM file is one slice: pass the folder" in capsys.readouterr().err


def test_folder_output_never_inside_its_input_or_from_another_model(model, series, tmp_path, capsys):
    cases = tmp_path / "cases"
    cases.mkdir()
    shutil.copy(CT, cases / "alpha.nii.gz")
    before = (cases / "alpha.nii.gz").read_bytes()
    assert _predict(model, cases, "--out", cases) == 2
    assert "is the input folder" in capsys.readouterr().err and (cases / "alpha.nii.gz").read_bytes() == before
    assert _predict(model, cases, "--out", cases / "pred") == 0  # inside: fine, and not a case on the rerun
    assert _predict(model, cases, "--out", cases / "pred") == 0
    assert "0 predicted, 1 already done" in capsys.readouterr().out
    assert _predict(model, cases, "--out", cases / "pred", "--tta") == 1  # other settings: not silently kept
    err = capsys.readouterr().err
    assert "alpha: alpha.nii.gz was made with other tta (tta=False); --overwrite redoes it" in err
    rows = list(csv.DictReader((cases / "pred" / "volumes.csv").open()))
    assert [r["case"] for r in rows] == ["alpha"] and "made with other tta" in rows[0]["error"]
