import nibabel as nib
import numpy as np

from hpc_seg.ingest.phantom import HU, generate_case


def test_phantom_contents_and_orientation_variety():
    orientations, tumour_counts = set(), []
    for seed in range(8):
        c = generate_case((64, 64, 16), seed=seed)
        assert c.volume.dtype == np.int16 and c.label.dtype == np.uint8
        assert set(np.unique(c.label)) <= {0, 1, 2}
        liver = c.volume[c.label == 1]
        assert abs(np.median(liver) - HU["liver"]) < 25  # ~60 HU with noise/vessels
        assert (c.volume == -1024).any()  # outside the scan's field of view
        assert (c.volume > 400).any()  # bone
        if (c.label == 2).any():
            assert ((c.label == 2) <= (c.label > 0)).all()
        tumour_counts.append(c.n_tumours)
        orientations.add(nib.aff2axcodes(c.affine))
        zooms = np.sqrt((c.affine[:3, :3] ** 2).sum(0))
        assert zooms[2] > zooms[0]  # anisotropic: thick slices
    assert len(orientations) > 2
    assert 0 in tumour_counts and max(tumour_counts) > 0


def test_phantom_no_tumour_requested():
    c = generate_case((48, 48, 12), seed=5, tumours=0)
    assert not (c.label == 2).any() and (c.label == 1).any()


def test_phantom_deterministic():
    a, b = generate_case((32, 32, 8), seed=9), generate_case((32, 32, 8), seed=9)
    assert np.array_equal(a.volume, b.volume) and np.array_equal(a.affine, b.affine)
