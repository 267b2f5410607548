"""Benchmark scripts run end to end at toy size, so that they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import shared_path

ROOT = Path(__file__).resolve().parents[2]


def test_data_loading_bench_toy(tmp_path):
    out = tmp_path / "dl.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "data_loading.py"), "--cases", "2", "--size", "64",
                        "--depth", "12", "--samples", "20", "--whole-samples", "2", "--rounds", "1",
                        "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res["ratios"]) >= {"zarr_vs_a_whole_nii_gz", "zarr_vs_c_mmap_nii", "bytes_zarr_vs_nii"}
    assert all(v > 0 for v in res["samples_per_s"].values())
    assert res["conversion"]["speedup_2_vs_1"] > 0


def test_model_stats_bench_toy(tmp_path):
    out = tmp_path / "m.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "model_stats.py"), "--sizes", "tiny", "--res", "64",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(row["params"] < 1_000_000 and row["gflops_64"] > 0 for row in rows)


def test_engine_bench_quick(tmp_path, phantom_store):
    out = tmp_path / "e.json"
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "engine.py"), "--quick", "--out", str(out),
                        "--store", str(phantom_store)], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    ms = res["model_states_bf16_adam_2_ranks"]
    assert set(ms) == {"zero0", "zero1", "zero2", "zero3"}
    for k in ("zero0", "zero2", "zero3"):  # DeepSpeed matches the ZeRO paper's accounting
        assert abs(ms[k]["ratio_measured_vs_formula"] - 1) < 0.05, (k, ms[k])
    assert res["step_time_1_rank"]["ratio_deepspeed_vs_pytorch"] > 0 and res["scaling"]["speedup_2_vs_1"] > 0


def test_gpu_scale_script_runs_at_toy_size(tmp_path):
    out = tmp_path / "gs.json"
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--toy", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    modes = {row["mode"] for row in res["rows"] if row["status"] == "ok"}
    assert modes == {"pytorch_fp32", "ds_fp16_z2", "ds_fp16_z3", "ds_fp16_z2_ckpt", "ds_fp16_z3_ckpt"}
    assert all(row["samples_per_s"] > 0 for row in res["rows"] if row["status"] == "ok")
    assert all(row["predicted_bytes"] > 0 and row["train_flops_per_sample"] > 0
               for row in res["rows"] if row["status"] == "ok")  # planner prediction and FLOPs beside each row
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_check_runs_end_to_end_at_toy_size(tmp_path):
    """The one-call GPU acceptance script, rehearsed on the CPU (bf16 for fp16, tiny TransUNet)."""
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu", "OUT": str(tmp_path / "out"),
           "GPU_CHECK_ARGS": "--toy", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, timeout=900,
                       env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    parts = res["parts"]
    assert parts["collectives"]["ok"] and parts["collectives"]["backend"] == "gloo"
    fp = parts["fp16"]
    for step in ("train", "resume", "export", "evaluate", "predict"):
        assert fp[step]["rc"] == 0, (step, fp[step])
    assert fp["resumed_from_step"] == 4 and fp["metrics"]["samples_per_s"] > 0
    assert parts["bf16"]["train"]["rc"] == 0 and parts["scale"]["rc"] == 0 and parts["scale"]["rows_ok"] > 0
    scale = json.loads((tmp_path / "out" / "gpu_scale.json").read_text())
    row = next(r for r in scale["rows"] if r["status"] == "ok")
    assert row["predicted_bytes"] > 0 and row["train_flops_per_sample"] > 0


def test_checkpoint_time_bench_toy(tmp_path):
    out = tmp_path / "ct.json"
    env = {**__import__("os").environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "checkpoint_time.py"), "--toy", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["bytes"] > 0 and 0 < res["save_seconds"] < res["signal_delay_s"] and res["margin_s"] > 0


def test_object_store_bench_toy(tmp_path):
    """Against its own local S3 server: 2 requests per 2.5D sample without cache (the k adjacent
    image slices coalesced into one ranged GET + the label slice), none once shards are cached."""
    out = tmp_path / "os.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "object_store.py"), "--cases", "2", "--size", "64",
                        "--depth", "12", "--samples", "20", "--work", str(tmp_path / "work"), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    modes = json.loads(out.read_text())["modes"]
    assert modes["s3"]["requests_per_sample"] == 2.0 and modes["s3"]["bytes_per_sample"] > 0
    assert modes["s3_cache_warm"]["requests_per_sample"] == 0 and modes["s3_cache_warm"]["open_bytes"] == 0


@pytest.mark.shared_data
def test_liver_selection_bench_toy(tmp_path):
    """The selection study end to end at 3 steps per candidate: two runs, four scores, a decision."""
    shared_path("lits-tiny"), shared_path("lits-117"), shared_path("totalseg-ct")
    out = tmp_path / "sel.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "liver_selection.py"), "--work", str(tmp_path / "w"),
                        "--out", str(out), "--set", "train.max_steps=3", "--set", "checkpoint.every_steps=0"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert set(res["candidates"]) == {"shipped", "transunet"}
    for c in res["candidates"].values():
        assert 0.0 <= c["val_whole_liver_dice"] <= 1.0 and 0.0 <= c["val_whole_liver_dice_tta"] <= 1.0
    assert res["decision"]["recipe"] in res["candidates"] and isinstance(res["decision"]["tta"], bool)
    assert res["rule"].startswith("written down and committed before")
