"""Preemption-safe checkpoints: kill -9 and resume is bit-identical; other world sizes; signals;
damaged checkpoints; non-finite losses."""

import json
import os
import signal
from pathlib import Path

import torch

from hpc_seg.training.trainer import EXIT_DIVERGED, EXIT_PREEMPTED
from tests.runs import final_weights, records, run_train, start_train, wait_for

# TransUNet (dropout: the torch RNG matters) in deterministic fp32, ZeRO-2, 2 ranks
EXACT = ["model.name=transunet", "model.size=tiny", "deepspeed.zero_stage=2", "train.deterministic=true",
         "train.max_steps=40", "checkpoint.every_steps=5", "train.val_every_steps=10", "data.num_workers=1"]


def latest_step(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip()[4:])
    except (OSError, ValueError):
        return 0


def test_kill9_then_resume_is_bit_identical(tmp_path, store):
    ref = run_train(tmp_path / "ref", store, EXACT)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    run = tmp_path / "killed"
    proc = start_train(run, store, EXACT)
    assert wait_for(lambda: latest_step(run) >= 5 or proc.poll() is not None), "no checkpoint appeared"
    pid = json.loads((run / "ranks" / "rank1.json").read_text())["pid"]
    os.kill(pid, signal.SIGKILL)  # a rank dies mid-run
    proc.wait(timeout=120)
    assert proc.returncode != 0, "the run finished before it could be killed"
    killed_at = latest_step(run)
    assert 5 <= killed_at < 40

    res = run_train(run, store, EXACT, resume="latest")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    resumed = records(run, "resume")
    assert resumed and resumed[-1]["step"] == killed_at

    tag_a, a = final_weights(tmp_path / "ref")
    tag_b, b = final_weights(run)
    assert tag_a == tag_b == "step00000040"
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_resume_on_other_world_size(tmp_path, store):
    run = tmp_path / "run"
    sets = ["deepspeed.zero_stage=2", "train.max_steps=6", "checkpoint.every_steps=6", "train.val_every_steps=0"]
    r = run_train(run, store, sets)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    more = ["deepspeed.zero_stage=2", "train.max_steps=10", "checkpoint.every_steps=10", "train.val_every_steps=0"]
    r = run_train(run, store, more, nproc=1, resume="latest")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = records(run, "resume")[-1]
    assert (res["step"], res["saved_world_size"], res["world_size"]) == (6, 2, 1)
    assert "universal" in res["from"]
    after = [rec for rec in records(run, "train") if rec["step"] > 6]
    assert [rec["step"] for rec in after] == [7, 8, 9, 10]
    assert all(rec["loss"] == rec["loss"] for rec in after)  # finite, not NaN
    assert final_weights(run)[0] == "step00000010"


def test_signal_to_rank0_saves_all_shards_and_exits_75(tmp_path, store):
    run = tmp_path / "run"
    proc = start_train(run, store, ["deepspeed.zero_stage=2", "train.max_steps=100000", "checkpoint.every_steps=0",
                                    "train.val_every_steps=0"])
    assert wait_for(lambda: len(records(run, "train")) >= 3 or proc.poll() is not None)
    os.kill(json.loads((run / "ranks" / "rank0.json").read_text())["pid"], signal.SIGUSR2)  # as SLURM would
    out, _ = proc.communicate(timeout=120)
    stop = records(run, "stop")
    assert stop and stop[-1]["reason"] == "signal", out[-3000:]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{stop[-1]['step']:08d}"
    files = {p.name for p in (run / "checkpoints" / tag).iterdir()}
    assert {"rank_state_00000.pt", "rank_state_00001.pt"} <= files
    assert sum("optim_states" in f for f in files) == 2  # every rank's ZeRO shard
    # single process: the exit status itself
    one = tmp_path / "one"
    p1 = start_train(one, store, ["train.max_steps=100000", "checkpoint.every_steps=0", "train.val_every_steps=0"],
                     nproc=1)
    assert wait_for(lambda: len(records(one, "train")) >= 2 or p1.poll() is not None)
    p1.send_signal(signal.SIGTERM)
    p1.communicate(timeout=120)
    assert p1.returncode == EXIT_PREEMPTED


def test_damaged_checkpoint_falls_back_to_previous(tmp_path, store):
    run = tmp_path / "run"
    sets = ["train.max_steps=6", "checkpoint.every_steps=3", "checkpoint.keep_last=3", "train.val_every_steps=0"]
    assert run_train(run, store, sets, nproc=1).returncode == 0
    shard = run / "checkpoints" / "step00000006" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    r = run_train(run, store, ["train.max_steps=8", "checkpoint.every_steps=0", "train.val_every_steps=0"],
                  nproc=1, resume="latest")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step00000006 is damaged" in r.stderr
    res = records(run, "resume")[-1]
    assert res["step"] == 3 and res["from"].endswith("step00000003")


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, store):
    run = tmp_path / "run"
    r = run_train(run, store, ["train.lr=1e30", "train.grad_clip=0", "train.schedule=constant",
                               "train.max_steps=200", "checkpoint.every_steps=1", "train.max_bad_steps=3",
                               "train.val_every_steps=0", "checkpoint.keep_last=2"], nproc=1)
    assert r.returncode == EXIT_DIVERGED, r.stdout[-2000:] + r.stderr[-2000:]
    assert "consecutive non-finite losses" in r.stdout + r.stderr
    stop = records(run, "stop")[-1]
    assert "non-finite" in stop["reason"]
    tag = (run / "checkpoints" / "latest").read_text().strip()
    from hpc_seg.distributed.checkpoint import CheckpointManager

    assert CheckpointManager(run / "checkpoints", 0, 1).verify(tag) is None
