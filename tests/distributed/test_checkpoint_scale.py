"""Resume checks the saved config against the current one; checkpoints are verified in shares by
every rank and the tag rank 0 chose is the one all ranks load; ZeRO-Offload runs DeepSpeed's CPU Adam."""

import json
import shutil

import pytest

from hpc_seg.config import load_config
from hpc_seg.distributed.checkpoint import CheckpointManager
from hpc_seg.training.resume_check import compare
from tests.runs import records, run_train

QUICK = ["train.max_steps=4", "checkpoint.every_steps=2", "train.val_every_steps=0", "deepspeed.zero_stage=1"]


def test_compare_rules():
    from hpc_seg.config import to_dict

    base = to_dict(load_config(None, []))
    other = to_dict(load_config(None, ["model.size=small", "train.max_steps=900", "train.log_every_steps=3",
                                       "deepspeed.precision=bf16"]))
    refused, warned, rest = compare(base, other)
    assert any(r.startswith("model.size") for r in refused) and any(r.startswith("deepspeed.precision") for r in refused)
    assert warned == ["train.max_steps: 200 → 900 (moves the end of the learning-rate schedule)"]
    assert rest == ["train.log_every_steps: 10 → 3"]


def test_resume_refuses_shape_changes_and_warns_on_course_changes(tmp_path, store):
    run = tmp_path / "run"
    r = run_train(run, store, QUICK, nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    manifest = CheckpointManager.manifest(run / "checkpoints", "step00000004")
    assert manifest["config"]["train"]["max_steps"] == 4 and len(manifest["files"]) >= 4
    bad = run_train(run, store, QUICK + ["model.size=small", "train.max_steps=6"], nproc=1, resume="latest")
    assert bad.returncode == 2 and "model.size: 'tiny' → 'small'" in bad.stderr and "Traceback" not in bad.stderr
    ok = run_train(run, store, QUICK + ["train.max_steps=6"], nproc=1, resume="latest")
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    assert "moves the end of the learning-rate schedule" in ok.stderr
    resume = records(run, "resume")[-1]
    assert resume["step"] == 4 and resume["config_changes"]["warned"][0].startswith("train.max_steps")


def test_damaged_latest_is_skipped_by_all_ranks_alike(tmp_path, store):
    run = tmp_path / "run"
    r = run_train(run, store, QUICK, nproc=2)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    root = run / "checkpoints"
    names = sorted(CheckpointManager.manifest(root, "step00000004")["files"])
    victim = root / "step00000004" / names[1]  # verified by rank 1 (round-robin share)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other checksum
    victim.write_bytes(bytes(data))
    res = run_train(run, store, QUICK + ["train.max_steps=6"], nproc=2, resume="latest")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "step00000004 is damaged" in res.stdout + res.stderr
    resumes = records(run, "resume")
    assert resumes[-1]["step"] == 2  # both ranks fell back to the same previous checkpoint


@pytest.mark.slow
def test_zero_offload_runs_cpu_adam(tmp_path, store):
    """ZeRO-2 + offload_optimizer with DeepSpeed's CPU Adam (JIT-built on first use) on 1 CPU rank."""
    run = tmp_path / "off"
    r = run_train(run, store, ["train.max_steps=3", "checkpoint.every_steps=0", "train.val_every_steps=0",
                               "deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true"], nproc=1, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert records(run, "train")[-1]["step"] == 3
    with pytest.raises(Exception, match="DeepSpeed refuses other optimizers"):
        load_config(None, ["deepspeed.zero_stage=2", "deepspeed.offload_optimizer=true", "train.optimizer=sgd"])
    shutil.rmtree(run)


def test_disk_full_while_checkpointing_keeps_latest(tmp_path, store):
    """A size-limited tmpfs as run directory: the first checkpoint fits, the second does not."""
    import subprocess

    from tests.runs import final_weights

    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True)  # CI runs as root
    try:
        run = mnt / "run"
        r = run_train(run, store, ["train.max_steps=6", "checkpoint.every_steps=2", "train.val_every_steps=0",
                                   "deepspeed.zero_stage=0", "checkpoint.keep_last=5"], nproc=1)
        assert r.returncode == 4, r.stdout[-2000:] + r.stderr[-2000:]
        assert "writing checkpoint step00000004 failed" in r.stderr and "'latest' still points to step00000002" \
            in r.stderr and "Traceback" not in r.stderr
        root = run / "checkpoints"
        assert (root / "latest").read_text().strip() == "step00000002"
        assert not (root / "tmp-step00000004").exists() and not (root / "step00000004").exists()
        tag, weights = final_weights(run)  # verified and loadable
        assert tag == "step00000002" and weights
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
