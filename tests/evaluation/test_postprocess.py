"""Liver post-processing is chosen by class name: a model whose classes contain ``liver`` gets it
(tumour handled when they contain ``tumour``), with the indices looked up by name; any other task
gets none, whatever its number of classes."""

import numpy as np
import pytest
import torch

from hpc_seg.evaluation.evaluate import _score_case
from hpc_seg.evaluation.inference import postprocess
from hpc_seg.metrics import SegmentationMetrics
from hpc_seg.preprocessing.plan import PreprocessingPlan


def two_blobs(value: int, shape=(4, 8, 8)) -> np.ndarray:
    """A 4×4×4 block of ``value`` and one voxel of it far away: two 3D components, 64 and 1 voxels."""
    labels = np.zeros(shape, np.uint8)
    labels[:4, :4, :4] = value
    labels[3, 7, 7] = value
    return labels


class LabelEcho(torch.nn.Module):
    """Logits whose argmax is the input's value: the prediction equals the (label-valued) image."""

    def __init__(self, classes: int):
        super().__init__()
        self.register_buffer("values", torch.arange(classes, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return -10 * (x - self.values) ** 2


def predicted_voxels(classes: tuple[str, ...], labels: np.ndarray) -> dict[str, int]:
    """``evaluate._score_case`` with post-processing on, on a case whose image is ``labels``:
    the number of voxels predicted per class."""
    plan = PreprocessingPlan(kind="test", modality="CT", classes=classes, channels=1, split_seed=0, train_cases=1,
                             train_digest="", mode="2d", size=labels.shape[1:])
    names = list(classes)
    metrics = SegmentationMetrics(len(names), names)
    case = {"image": labels[None].astype(np.int16), "label": labels}
    index = {"cases": {"c": {"stats": {"spacing": [1.0, 1.0, 1.0]}}}}
    figures, _ = _score_case(case, "c", LabelEcho(len(names)), plan, metrics, np.arange(len(names)), index,
                             {"classes": names}, torch.device("cpu"), None, False, True, None)
    return {n: figures["per_class"][n]["voxels_pred"] for n in names}


def test_a_three_class_task_without_liver_is_not_liver_post_processed():
    # (background, kidney, cyst) has three classes, as LiTS: the rule must not go by the count
    assert predicted_voxels(("background", "kidney", "cyst"), two_blobs(1))["kidney"] == 65


def test_a_two_class_liver_plan_is_post_processed():
    assert predicted_voxels(("background", "liver"), two_blobs(1))["liver"] == 64


def test_lits_keeps_the_largest_liver_with_its_tumour():
    labels = two_blobs(1)
    labels[1, 1, 1] = 2  # tumour inside the liver: kept
    labels[0, 7, 0] = 2  # tumour apart from it: dropped with the stray liver voxel
    got = predicted_voxels(("background", "liver", "tumour"), labels)
    assert (got["liver"], got["tumour"]) == (63, 1)


def test_indices_come_from_the_names():
    labels = two_blobs(2)  # liver at index 2
    labels[1, 1, 1] = 1  # tumour (index 1) inside it
    labels[0, 7, 0] = 1  # tumour outside: dropped
    labels[3, 0, 7] = 3  # another class: left as it is
    out = postprocess(labels, ("background", "tumour", "liver", "kidney"))
    assert (out == 2).sum() == 63 and (out == 1).sum() == 1 and out[3, 7, 7] == 0 and out[3, 0, 7] == 3


@pytest.mark.parametrize("classes", [("background", "polyp"), ("background", "kidney", "cyst"),
                                     ("background", "tumour")])
def test_classes_without_liver_come_back_unchanged(classes):
    labels = two_blobs(1)
    assert postprocess(labels, classes) is labels
