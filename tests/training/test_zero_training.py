"""ZeRO 1/2/3 on 2 CPU ranks reduce the loss; fp16 loss scaling; golden DeepSpeed JSON."""

import json
import subprocess
from pathlib import Path

import pytest

from hpc_seg.config import load_config
from hpc_seg.distributed.ds_config import deepspeed_config
from tests.runs import BIN, ROOT, env, records, run_train

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_reduces_loss(tmp_path, store, stage):
    # ZeRO-3 with activation checkpointing: parameters are gathered by the modules' hooks in the
    # recomputation too (and its overlap_comm is DeepSpeed's default, True)
    ckpt = [f"train.activation_checkpointing={'true' if stage == 3 else 'false'}"]
    r = run_train(tmp_path / "run", store, [f"deepspeed.zero_stage={stage}", "train.max_steps=16",
                                            "train.lr=0.01", "checkpoint.every_steps=8", "train.val_every_steps=8",
                                            *ckpt])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [rec["loss"] for rec in records(tmp_path / "run", "train")]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "step00000016").iterdir())
    assert "rank_state_00000.pt" in files and "rank_state_00001.pt" in files
    assert any("optim_states" in f for f in files)
    vals = records(tmp_path / "run", "val")
    assert vals and vals[-1]["mean_iou"] is not None


def test_fp16_dynamic_loss_scaling_or_clear_refusal(tmp_path, store):
    """fp16 runs where the accelerator has it (GPU; CPUs with AVX512-FP16/AMX), else is refused
    up front with the reason — never a crash deep inside DeepSpeed."""
    import torch
    from deepspeed.accelerator import get_accelerator

    r = run_train(tmp_path / "run", store, ["deepspeed.zero_stage=2", "deepspeed.precision=fp16",
                                            "deepspeed.initial_scale_power=30", "train.max_steps=8",
                                            "train.val_every_steps=0", "checkpoint.every_steps=0"])
    if torch.float16 in get_accelerator().supported_dtypes():
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        recs = records(tmp_path / "run", "train")
        # 2^30 overflows fp16 gradients at once: the scaler skips those steps and lowers the scale
        assert recs[-1]["skipped_steps"] > 0 and recs[-1]["loss_scale"] < 2 ** 30
    else:
        assert r.returncode != 0
        assert "deepspeed.precision=fp16 is not supported on this cpu device" in r.stderr + r.stdout


def test_bf16_zero2_trains(tmp_path, store):
    r = run_train(tmp_path / "run", store, ["deepspeed.zero_stage=2", "deepspeed.precision=bf16",
                                            "train.max_steps=12", "train.lr=0.01", "train.val_every_steps=0",
                                            "checkpoint.every_steps=0"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [rec["loss"] for rec in records(tmp_path / "run", "train")]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])


def test_deepspeed_json_golden():
    cfg = load_config("tiny_cpu.yaml", ["deepspeed.precision=fp16", "train.grad_accum=2"])
    got = deepspeed_config(cfg, world_size=2)
    golden = GOLDEN / "ds_config_tiny_cpu_fp16_ws2.json"
    assert got == json.loads(golden.read_text())
    assert got["train_batch_size"] == cfg.data.batch_size * 2 * 2


def test_nproc_starts_local_ranks_after_preparing_in_one_process(tmp_path, phantom_dir):
    """`hpc-seg train --nproc 2` on a store that does not exist yet: prepared once, then 2 ranks."""
    store, run = tmp_path / "fresh.zarr", tmp_path / "run"
    sets = [f"data.store={store}", f"data.source={phantom_dir}", "data.kind=lits", "data.size=[32,32]",
            "data.batch_size=2", "data.num_workers=0", "train.max_steps=3", "train.val_every_steps=0",
            "train.val_max_cases=1", "checkpoint.every_steps=0"]
    cmd = [str(BIN / "hpc-seg"), "train", "--config", "tiny_cpu.yaml", "--run-dir", str(run), "--nproc", "2",
           *[a for s in sets for a in ("--set", s)]]
    r = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    ranks = sorted(json.loads(p.read_text())["world_size"] for p in (run / "ranks").glob("rank*.json"))
    assert ranks == [2, 2] and json.loads((run / "final.json").read_text())["step"] == 3
