"""bench/peers_nnunet.py: nnU-Net v2's raw format written from hpc-seg stores, checked by nnunetv2's
own dataset integrity check, and its files read back onto the store's grid voxel for voxel."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hpc_seg.ingest.catalog import Store

ROOT = Path(__file__).resolve().parents[2]


def _module():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("peers_nnunet", ROOT / "bench" / "peers_nnunet.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def rgb_store(synthetic_rgb, tmp_path_factory):
    """The generated RGB images (tests/conftest.py), prepared as a Kvasir-SEG store."""
    from hpc_seg.ingest.prepare import prepare

    out = tmp_path_factory.mktemp("stores") / "rgb.zarr"
    assert prepare("kvasir", synthetic_rgb, out, workers=1, show_progress=False).report.ok
    return out


def _verify(folder: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


@pytest.mark.parametrize("which", ["ct", "rgb"])
def test_raw_dataset_passes_nnunets_integrity_check_and_reads_back(which, phantom_store, rgb_store, tmp_path):
    nnu = _module()
    store = Store.open(phantom_store if which == "ct" else rgb_store)
    cases = store.case_ids[:4]
    folder = nnu.write_raw(store, cases, tmp_path / "raw", 509, "toy")
    meta = json.loads((folder / "dataset.json").read_text())
    assert folder.name == "Dataset509_Toy" and meta["numTraining"] == 4
    assert meta["labels"] == {name: i for i, name in enumerate(store.info["classes"])}
    assert meta["file_ending"] == (".nii.gz" if which == "ct" else ".png")
    assert len(meta["channel_names"]) == store.info["channels"]
    _verify(folder)
    for cid in cases:  # the labels as nnU-Net reads its files, back on the store's (Z, Y, X) grid
        back = nnu.read_prediction(folder / "labelsTr", cid, meta["file_ending"])
        assert np.array_equal(back, store.root["cases"][cid]["label"][...]), cid
        assert "." not in nnu.case_key(cid)


def test_ct_geometry_is_the_stores_canonical_affine(phantom_store, tmp_path):
    import nibabel as nib

    nnu = _module()
    store = Store.open(phantom_store)
    cid = store.case_ids[0]
    nnu.write_case(store, cid, tmp_path, None, "k")
    img = nib.load(tmp_path / "k_0000.nii.gz")
    g = store.root["cases"][cid]
    assert np.allclose(img.affine, g.attrs["hpc_seg"]["affine_canonical"])
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), g["image"][0])
    spacing = store.index["cases"][cid]["stats"]["spacing"]  # (z, y, x)
    assert np.allclose(img.header.get_zooms(), spacing[::-1])


def test_splits_make_fold_0_the_hpc_seg_split(tmp_path):
    nnu = _module()
    (tmp_path / "Dataset509_Toy").mkdir()
    nnu.write_splits(tmp_path, 509, "toy", ["a.1", "b"], ["c"])
    assert json.loads((tmp_path / "Dataset509_Toy" / "splits_final.json").read_text()) == [
        {"train": ["c_a_1", "c_b"], "val": ["c_c"]}]
