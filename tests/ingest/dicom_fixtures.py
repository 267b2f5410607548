"""Writing small real DICOM series with pydicom (CT images and binary masks) for the tests."""

from __future__ import annotations

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def series_geometry(row=(1.0, 0.0, 0.0), col=(0.0, 1.0, 0.0), spacing=(0.8, 0.7), dz=2.5,
                    origin=(-100.0, -80.0, 40.0)):
    row, col = np.asarray(row, float), np.asarray(col, float)
    return {"row": row, "col": col, "normal": np.cross(row, col), "spacing": spacing, "dz": dz,
            "origin": np.asarray(origin, float)}


def expected_ras_affine(geo) -> np.ndarray:
    """The affine of the (column, row, slice-in-position-order) array, written out independently."""
    a = np.eye(4)
    a[:3, 0] = geo["row"] * geo["spacing"][1]
    a[:3, 1] = geo["col"] * geo["spacing"][0]
    a[:3, 2] = geo["normal"] * geo["dz"]
    a[:3, 3] = geo["origin"]
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ a


def write_series(folder, planes: np.ndarray, geo, names=None, instance_numbers=None, series_uid=None,
                 slope=1.0, intercept=-1024.0, unsigned=False, frame_uid="1.2.3.4", image_type=None):
    """``planes``: (k, rows, cols) stored values, slice k at origin + k·dz·normal (LPS). Returns the
    SeriesInstanceUID."""
    folder.mkdir(parents=True, exist_ok=True)
    k, rows, cols = planes.shape
    series_uid = series_uid or generate_uid()
    names = names or [f"image_{i}" for i in range(k)]
    instance_numbers = instance_numbers or list(range(1, k + 1))
    for i in range(k):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series_uid, "1.2.3"
        ds.FrameOfReferenceUID, ds.SeriesNumber = frame_uid, 3
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "P1", "Test^Patient", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20260101", "120000", "1", "A1", ""
        ds.Manufacturer = "test"
        if image_type:
            ds.ImageType = image_type
        ds.Modality, ds.InstanceNumber = "CT", instance_numbers[i]
        ds.Rows, ds.Columns = rows, cols
        ds.ImageOrientationPatient = [float(v) for v in (*geo["row"], *geo["col"])]
        ds.ImagePositionPatient = [float(v) for v in geo["origin"] + i * geo["dz"] * geo["normal"]]
        ds.PixelSpacing = [float(geo["spacing"][0]), float(geo["spacing"][1])]
        ds.SliceThickness = float(geo["dz"])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0 if unsigned else 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = planes[i].astype(np.uint16 if unsigned else np.int16).tobytes()
        pydicom.dcmwrite(folder / names[i], ds, enforce_file_format=True)
    return series_uid


AXIAL_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nifti_as_series(nifti_path, folder, **kw):
    """A real NIfTI CT (RAS-oriented, axial) written as an axial DICOM series of the same voxels and
    geometry: DICOM column c runs to the patient's left (RAS x falls), row r to posterior (RAS y falls)."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(nifti_path)))
    data = np.asarray(img.dataobj)
    sx, sy, sz = (float(v) for v in img.header.get_zooms()[:3])
    corner = AXIAL_RAS_TO_LPS @ img.affine @ [data.shape[0] - 1, data.shape[1] - 1, 0, 1]
    geo = series_geometry(spacing=(sy, sx), dz=sz, origin=corner[:3])
    planes = np.stack([data[::-1, ::-1, k].T for k in range(data.shape[2])])
    return write_series(folder, (planes + 1024).astype(np.int16), geo, **kw), geo


def phantom_ct(k=12, rows=40, cols=48, seed=0):
    """HU volume (k, rows, cols) with a liver block and two tumours; and those masks."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(0, 8, (k, rows, cols)) - 900
    body = np.zeros((k, rows, cols), bool)
    body[:, 4:-4, 4:-4] = True
    hu[body] = rng.normal(40, 8, body.sum())
    liver = np.zeros_like(body)
    liver[2:10, 8:28, 10:36] = True
    hu[liver] = rng.normal(110, 8, liver.sum())
    t1 = np.zeros_like(body)
    t1[4:7, 12:18, 14:20] = True
    t2 = np.zeros_like(body)
    t2[6:9, 20:25, 28:33] = True
    hu[t1 | t2] = rng.normal(30, 8, (t1 | t2).sum())
    return np.rint(hu).astype(np.int16), liver, t1, t2
