"""Volumes in ml and lesion counts on hand-made label maps (26-connectivity, whole liver = liver + tumour)."""

import numpy as np
import pytest

from hpc_seg.ingest.dicom_seg import class_of_segment
from hpc_seg.metrics.volumes import case_volumes, components

CLASSES = ["background", "liver", "tumour"]


def test_volumes_burden_and_lesions():
    lab = np.zeros((10, 400, 400), np.uint8)  # at 0.5 mm a 200 mm field of view: a CT's
    lab[1:9, 2:18, 2:18] = 1  # 8·16·16 = 2048 voxels of liver
    lab[2:4, 3:5, 3:5] = 2  # lesion A: 8 voxels
    lab[4, 5, 5] = 2  # touches A by a corner only: the same lesion under 26-connectivity
    lab[6:8, 10:14, 10:14] = 2  # lesion B: 32 voxels
    v = case_volumes(lab, (2.0, 0.5, 0.5), CLASSES)  # 0.5 mm³ per voxel
    assert v["lesions"] == 2
    assert v["tumour_ml"] == pytest.approx(41 * 0.5 / 1000, abs=1e-4)
    assert v["liver_ml"] == pytest.approx(2048 * 0.5 / 1000, abs=1e-4)  # the whole liver, tumour included
    assert v["tumour_burden"] == pytest.approx(41 / 2048, abs=1e-5)
    assert v["volumes_ml"] == {"liver": pytest.approx((2048 - 41) * 0.5 / 1000, abs=1e-4), "tumour": pytest.approx(41 * 0.5 / 1000, abs=1e-4)}
    assert components(lab == 2)[1] == 2
    from scipy import ndimage

    assert ndimage.label(lab == 2)[1] == 3  # what 6-connectivity would count: the rule matters


def test_no_liver_and_other_class_sets():
    empty = case_volumes(np.zeros((2, 300, 300), np.uint8), (1, 1, 1), CLASSES)
    assert empty["liver_ml"] == 0 and empty["tumour_burden"] is None and empty["lesions"] == 0
    liver_only = case_volumes(np.ones((2, 300, 300), np.uint8), (1, 1, 1), ["background", "liver"])
    assert liver_only["liver_ml"] == pytest.approx(180.0) and "lesions" not in liver_only


def test_no_millilitres_from_a_spacing_no_ct_has():
    lab = np.zeros((33, 64, 64), np.uint8)
    lab[5:20, 10:40, 10:40] = 1
    lab[8:10, 20:24, 20:24] = 2
    stale = case_volumes(lab, (5.0, 0.664, 0.664), CLASSES)  # lits-tiny's header: a 42 mm field of view
    assert stale["spacing_plausible"] is False and stale["field_of_view_mm"] == [42.5, 42.5]
    assert stale["liver_ml"] is None and stale["tumour_ml"] is None and stale["volumes_ml"]["liver"] is None
    assert stale["tumour_burden"] == pytest.approx(32 / (15 * 30 * 30), abs=1e-5) and stale["lesions"] == 1
    assert case_volumes(lab, (5.0, 5.3, 5.3), CLASSES)["spacing_plausible"] is True  # its true spacing


@pytest.mark.parametrize("label,meaning,cls", [("Liver", "", "liver"), ("ManualROI_Tumor", "", "tumour"),
                                               ("Segment 1", "Neoplasm", "tumour"), ("HCC", "", "tumour"),
                                               ("lesion 3", "", "tumour"), ("Spleen", "Spleen", None),
                                               ("Liver vessels", "", None), ("liver cyst", "", None),
                                               ("Whole liver", "Liver", "liver"), ("Delivery", "", None)])
def test_segments_map_to_classes_by_label_or_property(label, meaning, cls):
    assert class_of_segment(label, meaning) == cls
