"""The crop rule a cascade's stage 2 sees: the organ's 3D box grown by a fraction of its extent."""

import numpy as np

from hpc_seg.preprocessing.crop import class_mask, crop_box, organ_box


def test_box_margin_clip_and_jitter():
    mask = np.zeros((20, 50, 60), bool)
    mask[5:15, 10:30, 20:40] = True
    box = organ_box(mask)
    assert box == ((5, 15), (10, 30), (20, 40)) and organ_box(np.zeros((2, 2, 2), bool)) is None
    z, y, x = crop_box(box, mask.shape, 0.25)  # 2.5, 5 and 5 voxels added on each side
    assert (z.start, z.stop, y.start, y.stop, x.start, x.stop) == (2, 18, 5, 35, 15, 45)
    z, y, x = crop_box(box, mask.shape, 1.0)  # clipped to the volume
    assert (z.start, z.stop, y.start, y.stop, x.start, x.stop) == (0, 20, 0, 50, 0, 60)
    rng = np.random.default_rng(0)
    cuts = {tuple((s.start, s.stop) for s in crop_box(box, mask.shape, 0.25, 0.1, rng)) for _ in range(50)}
    assert len(cuts) > 10  # jitter moves the edges ...
    for cut in cuts:  # ... by at most a tenth of the extent beyond the margin
        (z0, z1), (y0, y1), (x0, x1) = cut
        assert 1 <= z0 <= 4 and 16 <= z1 <= 19 and 3 <= y0 <= 7 and 33 <= y1 <= 37
    assert crop_box(box, mask.shape, 0.25) == crop_box(box, mask.shape, 0.25, 0.1, None)  # no rng: no jitter


def test_class_mask_by_name():
    labels = np.array([[[0, 1, 2, 1]]])
    assert class_mask(labels, ["background", "liver", "tumour"], ["liver", "tumour"]).tolist() == [[[False, True, True, True]]]
    assert class_mask(labels, ["background", "liver", "tumour"], ["tumour"]).sum() == 1
