"""Partially labelled data end to end: a run trained on LiTS-kind cases plus a liver-only
TotalSegmentator CT, scored on a two-class store of the same task (tumour counted as liver) and
refused on a store of another task."""

import json
import math
import shutil

import pytest

from hpc_seg.cli import main
from hpc_seg.ingest.convert import convert
from hpc_seg.ingest.split import write_split
from tests.conftest import FIXTURES
from tests.runs import records, run_train

SETS = ["data.size=[48,48]", "train.max_steps=8", "train.val_every_steps=4", "checkpoint.every_steps=0",
        "deepspeed.zero_stage=1", "data.oversample=0.0"]


@pytest.fixture(scope="module")
def mixed_run(phantom_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("partial")
    store = base / "mixed.zarr"
    assert convert("lits", phantom_dir, store, show_progress=False).ok
    shutil.copytree(FIXTURES / "totalseg-ct", base / "ts" / "s0001")
    assert convert("totalseg", base / "ts", store, show_progress=False).ok
    split = write_split(store, 0.15, 0.3, 0)
    assert sum(len(v) for v in split.values()) == 7
    run = base / "run"
    r = run_train(run, store, SETS, nproc=1)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return run, base


def test_training_on_mixed_annotations_lowers_the_training_loss(mixed_run):
    """8 steps of batch 2 learn the training objective on mixed full/liver-only labels: the mean loss
    of the last 3 steps is below that of the first 3 by at least 0.04 (measured drops with
    train.seed 0/1/2/3: 0.082/0.117/0.126/0.128; seed 0, this run, is deterministic on the CPU).
    Too short to show in validation, so this is not checked: the validation mean IoU does not rise
    (0.0 at steps 4 and 8 with seed 0, a constant 0.476 with seeds 1-3)."""
    run, _ = mixed_run
    losses = [r["loss"] for r in records(run, "train")]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.04, (first, last, losses)


def test_evaluate_on_two_class_store_scores_whole_liver(mixed_run, tmp_path):
    run, base = mixed_run
    two = base / "ts2.zarr"
    convert("totalseg", base / "ts", two, show_progress=False)
    assert main(["evaluate", str(run), "--data", str(two), "--split", "all", "--out", str(tmp_path / "ev"),
                 "--tag", "latest", "--cpu"]) == 0
    res = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert res["store_classes"] == ["background", "liver"]
    assert "tumour counted as liver" in res["note"]
    row = res["per_case"][0]["per_class"]
    assert row["tumour"]["dice"] is None and row["liver+tumour"]["dice"] is not None
    assert res["per_class"]["tumour"]["support"] == 0


def test_evaluate_on_another_task_is_refused_naming_both(mixed_run, synthetic_rgb, tmp_path, capsys):
    run, base = mixed_run
    kv = base / "kv.zarr"
    convert("kvasir", synthetic_rgb, kv, show_progress=False)
    assert main(["evaluate", str(run), "--data", str(kv), "--split", "all", "--out", str(tmp_path / "ev"),
                 "--tag", "latest", "--cpu"]) != 0
    err = capsys.readouterr().err
    assert "polyp" in err and "tumour" in err
    assert not (tmp_path / "ev").exists()
