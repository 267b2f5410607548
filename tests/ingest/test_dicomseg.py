"""The ``dicomseg`` kind: CT DICOM series with DICOM Segmentation masks. The SEG files are written
with highdicom from series written with pydicom (both folder layouts, two phases of one geometry,
frames whose per-frame references all name one slice, a reformat in the series folder, FRACTIONAL,
LABELMAP, several SEG files, ``--segment``, each bad input); the real tace-1720 case in the
shared_data suite."""

import shutil
import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from hpc_seg.cli import main
from hpc_seg.ingest.nifti_io import to_canonical
from hpc_seg.storage.store import open_store
from tests.conftest import case_arrays
from tests.ingest.dicom_fixtures import expected_ras_affine, phantom_ct, series_geometry, write_series

AXIAL = series_geometry()
CORONAL = series_geometry(row=(1, 0, 0), col=(0, 0, -1), spacing=(2.5, 0.8), dz=0.7)  # slices along y
ARTERIAL_GAIN = 80  # HU the arterial phase adds in the liver: the phase a case was read from is told by it


def _phase(folder, hu, geo=AXIAL, prefix="image", series_uid=None):
    """A CT series written with pydicom; returns its UID and its datasets in slice order (k)."""
    names = [f"{prefix}_{i:03d}.dcm" for i in range(hu.shape[0])]
    uid = write_series(folder, (hu + 1024).astype(np.int16), geo, names=names, series_uid=series_uid)
    return uid, [pydicom.dcmread(folder / n) for n in names]


def _code(name):
    from pydicom.sr.codedict import codes

    return {"liver": codes.SCT.Liver, "neoplasm": codes.SCT.Neoplasm, "tissue": codes.SCT.Tissue}[name]


def _seg(path, sources, segments, kind="BINARY"):
    """A SEG (highdicom) of ``segments`` [(label, property type, (k, rows, cols) mask or fraction)],
    frame k on ``sources[k]``."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    descs = [hd.seg.SegmentDescription(
        segment_number=n, segment_label=label, segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=_code(prop), algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n, (label, prop, _) in enumerate(segments, start=1)]
    stack = np.stack([m for *_, m in segments], axis=-1)
    if kind == "LABELMAP":
        pixels = (stack.astype(bool) * np.arange(1, len(segments) + 1)).max(-1).astype(np.uint8)
    else:
        pixels = stack.astype(np.float32 if kind == "FRACTIONAL" else np.uint8)
    extra = {"max_fractional_value": 255} if kind == "FRACTIONAL" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixels, segmentation_type=kind, segment_descriptions=descs,
            series_instance_uid=generate_uid(), series_number=90, sop_instance_uid=generate_uid(), instance_number=1,
            manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1",
            **extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _edit(path, change):
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _refs_to_one_slice(ds):
    """Every frame's referenced source image rewritten to the first one, as the real file has them."""
    first = None
    for frame in ds.PerFrameFunctionalGroupsSequence:
        for derivation in frame.DerivationImageSequence:
            for source in derivation.SourceImageSequence:
                first = first or source.ReferencedSOPInstanceUID
                source.ReferencedSOPInstanceUID = first


def _expected(liver, tumour, geo=AXIAL):
    """Labels (k, rows, cols) as the store holds them (canonical Z, Y, X), written out independently."""
    lab = np.zeros(liver.shape, np.uint8)
    lab[liver], lab[tumour] = 1, 2
    return to_canonical(nib.Nifti1Image(lab.transpose(2, 1, 0), expected_ras_affine(geo)), "x").data


def _meta(store, case):
    return dict(open_store(store)["cases"][case].attrs["hpc_seg"])


def _arterial(hu, liver):
    art = hu.copy()
    art[liver] += ARTERIAL_GAIN
    return art


def test_both_layouts_reference_picks_the_phase_and_frames_go_by_position(tmp_path, capsys):
    """Case A: a folder per phase, a coronal reformat inside the venous folder (same UID), the SEG in
    the case folder, referencing the venous phase, its per-frame references all naming one slice.
    Case B (coronal slices): both phases and the SEG mixed in one folder, the SEG on the arterial phase."""
    src = tmp_path / "src"
    hu, liver, t1, t2 = phantom_ct()
    tumour = t1 | t2
    art_uid, _ = _phase(src / "A" / "arterial", _arterial(hu, liver & ~tumour))
    ven_uid, venous = _phase(src / "A" / "venous", hu)
    write_series(src / "A" / "venous", np.zeros((1, 12, 48), np.int16), CORONAL, names=["zz_reformat.dcm"],
                 series_uid=ven_uid, image_type=["DERIVED", "SECONDARY", "REFORMATTED"])
    seg_a = _seg(src / "A" / "seg.dcm", venous, [("Liver", "liver", liver), ("Tumor", "neoplasm", tumour)])
    _edit(seg_a, _refs_to_one_slice)
    _, b_venous = _phase(src / "B", hu, CORONAL, prefix="venous")
    b_art_uid, b_arterial = _phase(src / "B", _arterial(hu, liver & ~tumour), CORONAL, prefix="arterial")
    _seg(src / "B" / "seg.dcm", b_arterial, [("Segment 1", "liver", liver), ("Segment 2", "neoplasm", tumour)])
    _edit(src / "B" / "seg.dcm", _refs_to_one_slice)

    assert main(["convert", "dicomseg", str(src), str(tmp_path / "s.zarr")]) == 0
    err = capsys.readouterr().err
    for case, geo, liver_hu in (("A", AXIAL, 110), ("B", CORONAL, 110 + ARTERIAL_GAIN)):
        img, lab = case_arrays(tmp_path / "s.zarr", case)
        assert np.array_equal(lab, _expected(liver, tumour, geo)), case  # every frame on its own slice
        assert abs(img[0][lab == 1].mean() - liver_hu) < 3, case  # the phase the SEG references
        assert abs(img[0][lab == 2].mean() - 30) < 3
    assert _meta(tmp_path / "s.zarr", "A")["series_uid"] == ven_uid
    assert _meta(tmp_path / "s.zarr", "B")["series_uid"] == b_art_uid
    a_line = next(line for line in err.splitlines() if line.strip().startswith("A:"))
    assert f"left out series {art_uid}" in a_line and "zz_reformat.dcm: ImageOrientationPatient" in a_line
    assert "REFORMATTED" in a_line
    b_line = next(line for line in err.splitlines() if line.strip().startswith("B:"))
    assert "seg.dcm" not in b_line and "no Segmentation references it" in b_line  # the venous phase, not the SEG


def test_fractional_and_several_seg_files_merge_tumour_over_liver(tmp_path, capsys):
    """A FRACTIONAL liver (0.8 inside, 0.4 in a halo: below half) and a BINARY tumour file in a SEG
    folder beside the series; a tumour part outside the liver stays tumour; an unmapped segment is
    reported and left out."""
    hu, liver, t1, t2 = phantom_ct()
    _, sources = _phase(tmp_path / "src" / "p1" / "ct", hu)
    halo = np.zeros_like(liver)
    halo[1:11, 6:30, 8:38] = True
    halo &= ~liver
    outside = np.zeros_like(liver)
    outside[3:5, 30:34, 38:42] = True  # beyond the liver's columns
    _seg(tmp_path / "src" / "p1" / "segs" / "liver.dcm", sources,
         [("Liver", "liver", liver * 0.8 + halo * 0.4)], kind="FRACTIONAL")
    _seg(tmp_path / "src" / "p1" / "segs" / "lesions.dcm", sources,
         [("HCC", "tissue", t1 | t2 | outside), ("Spleen", "tissue", hu > 2000)])

    assert main(["convert", "dicomseg", str(tmp_path / "src"), str(tmp_path / "s.zarr")]) == 0
    assert "p1: ignored segment 2 'Spleen' of lesions.dcm" in capsys.readouterr().err
    _, lab = case_arrays(tmp_path / "s.zarr", "p1")
    assert np.array_equal(lab, _expected(liver, t1 | t2 | outside))
    meta = _meta(tmp_path / "s.zarr", "p1")
    assert [(s["type"], [g["class"] for g in s["segments"]]) for s in meta["segmentations"]] == \
        [("BINARY", ["tumour"]), ("FRACTIONAL", ["liver"])]
    assert meta["segments_ignored"] == ["segment 2 'Spleen' of lesions.dcm"]


def test_labelmap_seg_is_read(tmp_path):
    hu, liver, t1, t2 = phantom_ct()
    _, sources = _phase(tmp_path / "src" / "lm", hu)
    seg = _seg(tmp_path / "src" / "lm" / "labelmap.dcm", sources,
               [("liver", "liver", liver & ~(t1 | t2)), ("tumour", "neoplasm", t1 | t2)], kind="LABELMAP")
    assert str(pydicom.dcmread(seg).SOPClassUID) == "1.2.840.10008.5.1.4.1.1.66.7"  # Label Map Segmentation
    assert main(["convert", "dicomseg", str(tmp_path / "src" / "lm"), str(tmp_path / "s.zarr")]) == 0
    _, lab = case_arrays(tmp_path / "s.zarr", "lm")
    assert np.array_equal(lab, _expected(liver, t1 | t2))


def test_segment_option_maps_labels_on_convert_and_prepare(tmp_path, capsys):
    hu, liver, t1, t2 = phantom_ct()
    _, sources = _phase(tmp_path / "c1" / "ct", hu)
    _seg(tmp_path / "c1" / "seg.dcm", sources,
         [("ROI A", "tissue", liver), ("ROI B", "tissue", t1), ("Mass", "tissue", t2)])
    src, store = str(tmp_path / "c1"), str(tmp_path / "s.zarr")
    assert main(["convert", "dicomseg", src, store, "--segment", "mass=background"]) == 1
    err = capsys.readouterr().err
    assert "no segment of its SEG files maps to a class (segment 1 'ROI A' of seg.dcm" in err
    assert "c1" not in open_store(store)["cases"]
    assert main(["convert", "dicomseg", src, store]) == 0  # by their words, only "Mass" is a class: tumour
    assert np.array_equal(case_arrays(store, "c1")[1], _expected(np.zeros_like(liver), t2))
    assert "c1: ignored segment 1 'ROI A' of seg.dcm (no class; --segment LABEL=CLASS maps it)" in \
        capsys.readouterr().err
    shutil.rmtree(store)
    assert main(["prepare", "dicomseg", src, store, "--val", "0", "--test", "0", "--segment", "ROI A=liver",
                 "--segment", "roi b=tumour", "--segment", "Mass=background"]) == 0
    _, lab = case_arrays(store, "c1")
    assert np.array_equal(lab, _expected(liver, t1))  # the words' tumour "Mass" left out, ROI B taken
    assert "ignored segment 3 'Mass' of seg.dcm" in capsys.readouterr().err
    assert main(["convert", "dicomseg", src, store, "--segment", "ROI A=spleen"]) == 2
    assert "unknown class spleen" in capsys.readouterr().err
    assert main(["convert", "lits", src, store, "--segment", "ROI A=liver"]) == 2
    assert "--segment applies to the kinds reading segment labels (dicomseg), not to 'lits'" in capsys.readouterr().err
    assert main(["prepare", "dicomseg", src, store, "--slurm", "--segment", "ROI A=liver"]) == 2
    assert "prepare without --slurm" in capsys.readouterr().err


def _bad_cases(src, hu, liver, tumour):
    """One case per bad input, each with what its report line must say."""
    segs = [("Liver", "liver", liver), ("Tumor", "neoplasm", tumour)]
    out = {}
    for name in ("good", "orientation", "spacing", "off_slice", "absent", "no_frames"):
        uid, sources = _phase(src / name / "ct", hu)
        out[name] = _seg(src / name / "seg.dcm", sources, segs)
    _edit(out["orientation"], lambda ds: setattr(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0],
                                                 "ImageOrientationPatient", [1, 0, 0, 0, 0.6, -0.8]))
    _edit(out["spacing"], lambda ds: setattr(ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0],
                                             "PixelSpacing", [0.9, 0.7]))
    _edit(out["off_slice"], lambda ds: setattr(ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0],
                                               "ImagePositionPatient", [-100.0, -80.0, 40.0 + 2.5 * 3.5]))
    _edit(out["absent"], lambda ds: setattr(ds.ReferencedSeriesSequence[0], "SeriesInstanceUID", "1.2.3.999"))

    def no_frames(ds):
        del ds.PixelData
        ds.NumberOfFrames, ds.PerFrameFunctionalGroupsSequence = 0, []
    _edit(out["no_frames"], no_frames)
    uid, _ = _phase(src / "size" / "ct", hu)
    _, narrow = _phase(src.parent / "elsewhere", hu[:, :, :44], series_uid=uid)  # same UID, 44 columns
    out["size"] = _seg(src / "size" / "seg.dcm", narrow, [(n, p, m[:, :, :44]) for n, p, m in segs])
    _, venous = _phase(src / "no_reference" / "venous", hu)
    _phase(src / "no_reference" / "arterial", hu)
    out["no_reference"] = _seg(src / "no_reference" / "seg.dcm", venous, segs)
    _edit(out["no_reference"], lambda ds: delattr(ds, "ReferencedSeriesSequence"))
    return out, {"orientation": "ImageOrientationPatient [1.0, 0.0, 0.0, 0.0, 0.6, -0.8]",
                 "spacing": "PixelSpacing [0.9, 0.7]", "size": "frames 40×44 pixels, slices 40×48",
                 "off_slice": "frame 2 at [-100.0, -80.0, 48.75] mm lies on no slice", "absent":
                 "references series 1.2.3.999, which is not in", "no_frames": "Segmentation without frames",
                 "no_reference": "names no series (no ReferencedSeriesSequence) and the case holds 2"}


def test_bad_inputs_each_named_and_skipped_rest_converted(tmp_path, capsys):
    hu, liver, t1, t2 = phantom_ct()
    paths, says = _bad_cases(tmp_path / "src", hu, liver, t1 | t2)
    assert main(["convert", "dicomseg", str(tmp_path / "src"), str(tmp_path / "s.zarr")]) == 1
    err = capsys.readouterr().err.split("skipped cases")[-1]
    lines = {line.split(":")[0].strip(): line for line in err.splitlines()[1:]}
    assert sorted(lines) == sorted(says)
    for name, words in says.items():
        assert f"{paths[name]}: " in lines[name] and words in lines[name], lines[name]
    assert "geometry differs from its CT series" in lines["spacing"]
    assert list(open_store(tmp_path / "s.zarr")["cases"]) == ["good"]
    assert np.array_equal(case_arrays(tmp_path / "s.zarr", "good")[1], _expected(liver, t1 | t2))


@pytest.mark.shared_data
def test_real_tace_case_liver_and_tumour(tmp_path, capsys):
    """tace-1720: two BINARY SEG files (liver 31 frames, tumour 10) in the case folder beside the
    series folder; every frame's referenced instance is one slice, so only positions place them."""
    from tests.conftest import shared_path

    store = tmp_path / "tace.zarr"
    assert main(["convert", "dicomseg", str(shared_path("tace-1720")), str(store)]) == 0
    assert "tace-1720: left out dicom-00001.dcm: ImageOrientationPatient" in capsys.readouterr().err
    img, lab = case_arrays(store, "tace-1720")
    assert img.shape == (1, 52, 512, 512)
    assert int((lab == 2).sum()) == 31858
    assert int((lab >= 1).any((1, 2)).sum()) == 31  # the liver's 31 frames, each on one slice
    assert 563744 <= int((lab >= 1).sum()) <= 563744 + 31858  # the liver frames' voxels, tumour over them
    liver_hu = img[0][lab == 1]
    assert abs(liver_hu.mean() - 91) < 3 and liver_hu.std() < 25  # liver tissue: a slice off gives 71 or 78 HU
    meta = _meta(store, "tace-1720")
    assert meta["series_uid"] == "1801040320200103051513090319.1720.3.4"
    assert [(s["file"].rsplit("_", 1)[-1], s["frames"], s["segments"][0]["class"]) for s in meta["segmentations"]] \
        == [("Liver.dcm", 31, "liver"), ("Tumor.dcm", 10, "tumour")]
