"""Benchmark scripts run end to end at toy size, so that they cannot rot."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
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
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-8000:]
    res = json.loads(out.read_text())
    ms = res["model_states_bf16_adam_2_ranks"]
    assert set(ms) == {"zero0", "zero1", "zero2", "zero3"}
    for k in ("zero0", "zero2", "zero3"):  # DeepSpeed matches the ZeRO paper's accounting
        assert abs(ms[k]["ratio_measured_vs_formula"] - 1) < 0.05, (k, ms[k])
    assert res["step_time_1_rank"]["ratio_deepspeed_vs_pytorch"] > 0 and res["scaling"]["speedup_2_vs_1"] > 0


def _gpu_scale_module():
    spec = importlib.util.spec_from_file_location("gpu_scale", ROOT / "bench" / "gpu_scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_scale_script_runs_at_toy_size(tmp_path):
    """Breadth first: one row of each configuration that matters, each with the planner's prediction,
    FLOPs and the project's buffer rule; larger batches while the budget lasts; JSON and PNG."""
    out = tmp_path / "gs.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--toy", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--budget-s", "300"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["complete"] and res["toy"]
    first = [row for row in res["rows"] if row["batch"] == 2]
    assert [row["name"] for row in first] == ["12l_zero2_ckpt", "24l_zero3_ckpt", "12l_planner", "12l_pytorch_fp32"]
    ok = [row for row in res["rows"] if row["status"] == "ok"]
    assert len(ok) == len(res["rows"]) == 6, [(row["key"], row["status"], row.get("error")) for row in res["rows"]]
    for row in ok:
        assert row["samples_per_s"] > 0 and row["timed_steps"] == 2 and row["skipped_in_timed"] == 0
        assert row["predicted_bytes"] > 0 and row["train_flops_per_sample"] > 0  # planner and FLOPs beside each
        assert row["buffers_match_params"] is True
        assert row["precision"] == ("fp32" if row["engine"] == "pytorch" else "bf16")  # bf16 stands in for fp16
    by = {row["key"]: row for row in ok}
    assert by["12l_zero2_ckpt/b2"]["zero_stage"] == 2 and by["24l_zero3_ckpt/b2"]["zero_stage"] == 3
    assert by["24l_zero3_ckpt/b2"]["activation_checkpointing"] and by["24l_zero3_ckpt/b2"]["depth"] == 4
    rec = by["12l_planner/b2"]["planner_recommendation"]
    assert by["12l_planner/b2"]["zero_stage"] == rec["zero_stage"] and rec["bytes"] <= rec["gpu_memory_bytes"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_gpu_scale_stops_adding_rows_when_the_budget_is_spent(tmp_path):
    out = tmp_path / "gs.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_scale.py"), "--toy", "--out", str(out),
                        "--work", str(tmp_path / "work"), "--budget-s", "0"],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and all(row["status"] == "skipped (budget)" for row in rows)


def test_gpu_scale_24l_row_is_vit_large():
    """The 24-layer row is transunet_24l.yaml's model at its real width (ViT-L/16: 1024 wide), not ViT-B."""
    import torch

    gs = _gpu_scale_module()
    cfg = gs.config_for("24l_zero3_ckpt", 16, toy=False)
    assert (cfg.model.size, gs.depth_of(cfg), cfg.deepspeed.zero_stage, cfg.train.activation_checkpointing) == \
        ("r50-vit-l16", 24, 3, True)
    assert list(cfg.data.size) == [512, 512] and cfg.data.batch_size == 16
    with torch.device("meta"):
        params = sum(p.numel() for p in gs.build(cfg).parameters())
    assert 300e6 < params < 350e6, params  # 325 M (ViT-B width would give ≈ 190 M at 24 layers)
    assert gs.config_for("12l_zero2_ckpt", 16, toy=False).model.size == "r50-vit-b16"


def _gpu_check(tmp_path, args: str, timeout: int):
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OUT": str(out), "GPU_CHECK_ARGS": args,
           "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=timeout, env=env)
    lines = r.stdout.strip().splitlines()
    return r, lines, out, tmp


def _assert_out_is_small(out: Path, tmp: Path):
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    assert all(p.stat().st_size <= 16 * 1024 ** 2 for p in files)
    assert all(len(p.relative_to(out).parts) <= 3 for p in out.rglob("*"))  # ≤ 2 folders deep
    assert not list(tmp.iterdir()), list(tmp.iterdir())  # the scratch (and the children's TMPDIR) removed


@pytest.mark.slow
def test_gpu_check_toy_rehearsal_passes(tmp_path):
    """The one-call GPU acceptance, rehearsed on the CPU (bf16 for fp16, tiny TransUNet): every check
    decided and passed, the verdict the last line, OUT small, no scratch left behind."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    gc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gc)
    r, lines, out, tmp = _gpu_check(tmp_path, "--toy", 900)
    log = out / "gpu_check.log"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (log.read_text()[-6000:] if log.is_file() else "")
    assert lines[-1] == f"gpu_check: PASS ({len(gc.CHECKS)} checks)", lines[-5:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["verdict"] == "PASS" and res["complete"] and res["toy"] and not res["pending"]
    assert set(res["checks"]) == set(gc.CHECKS)
    for name, c in res["checks"].items():
        assert c["ok"] is True and "value" in c and c["limit"], (name, c)
        assert ("stand_in" in c) == (gc.CHECKS[name][2] is not None), name  # each GPU-only check states its stand-in
        assert any(line.split()[:2] == ["ok", f"{name}:"] for line in lines), name  # one line per check
    assert res["checks"]["resume_step"]["value"]["resume_record_step"] == gc.STEPS
    assert res["checks"]["slurm_localid"]["value"]["device"] == "cpu"
    assert res["checks"]["sigusr2_checkpoint_exit_75"]["value"]["rc"] == 75
    assert all(res["parts"][p]["wall_s"] > 0 for p in gc.PARTS)
    scale = json.loads((out / "gpu_scale.json").read_text())
    assert any(row["status"] == "ok" and row["predicted_bytes"] > 0 for row in scale["rows"])
    assert (out / "gpu_check.log").stat().st_size > 0
    _assert_out_is_small(out, tmp)


def test_gpu_check_injected_failure_fails_the_verdict(tmp_path):
    """--inject-failure: exit status non-zero (through gpu_check.sh), the verdict line names the check."""
    r, lines, out, tmp = _gpu_check(tmp_path, "--toy --parts collectives --inject-failure collectives", 300)
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    assert lines[-1] == "gpu_check: FAIL: collectives", lines[-5:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["verdict"] == "FAIL" and res["complete"] and set(res["checks"]) == {"collectives"}
    c = res["checks"]["collectives"]
    assert c["ok"] is False and c["injected"] is True and c["value"]["failed"] is None  # it ran and passed
    _assert_out_is_small(out, tmp)


def test_gpu_check_refuses_an_unknown_check_name(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path / "o"),
                        "--inject-failure", "no_such_check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no_such_check" in r.stderr
    assert not (tmp_path / "o").exists()


def _live_in_groups(groups: set[int]) -> list[tuple[int, int, str]]:
    """(pid, pgid, state) of every process, zombies excepted, whose process group is one of ``groups``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended while we looked
        state, pgid = fields[0], int(fields[2])
        if pgid in groups and state not in ("Z", "X"):
            found.append((int(stat.parent.name), pgid, state))
    return found


def _wait_for_running(report: Path, p: subprocess.Popen, title: str, timeout: float) -> tuple[dict, dict]:
    """The report and its ``running`` entry for ``title`` once that command has started (has a pgid)."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        try:
            rep = json.loads(report.read_text())
        except (OSError, ValueError):
            rep = {}
        entry = next((e for e in rep.get("running", []) if e.get("title") == title and e.get("pgid")), None)
        if entry:
            return rep, entry
        time.sleep(0.2)
    raise AssertionError(f"no running '{title}' entry within {timeout} s (rc {p.poll()})")


def test_gpu_check_sigterm_mid_run_leaves_a_fail_verdict_and_no_children(tmp_path):
    """SIGTERM to gpu_check.py while the toy fp16 training runs (with its loader workers): every child's
    process group is killed, the report is complete and FAIL, the FAIL verdict is the last line."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OUT": str(out), "GPU_CHECK_ARGS": "--toy --parts fp16",
           "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    p = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        rep, entry = _wait_for_running(out / "gpu_check.json", p, "fp16-train", 300)
        for _ in range(750):  # up to 150 s for the loader workers: a group of more than its leader
            if len(_live_in_groups({entry["pgid"]})) >= 3 or p.poll() is not None:
                break
            time.sleep(0.2)
        members = _live_in_groups({entry["pgid"]})
        os.kill(rep["pid"], signal.SIGTERM)
        stdout, stderr = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    lines = stdout.strip().splitlines()
    assert p.returncode not in (0, None), stdout[-3000:] + stderr[-3000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["verdict"] == "FAIL" and res["complete"] and res["signals"][0] == "SIGTERM", res
    failing = [n for n, c in res["checks"].items() if not c["ok"]]
    assert lines[-1] == f"gpu_check: FAIL: {', '.join(failing + ['harness'])}", lines[-5:]
    assert res["checks"]["loss_falling"]["value"].startswith("not decided: gpu_check.py was stopped")
    assert [e["title"] for e in res["interrupted"]] == ["fp16-train"] and not res["running"]
    assert entry["pgid"] in res["child_groups"] and len(members) >= 2, members  # the leader and its workers
    groups = set(res["child_groups"])
    for _ in range(50):  # SIGKILLed processes vanish at once; allow the scheduler a moment
        if not _live_in_groups(groups):
            break
        time.sleep(0.1)
    assert not _live_in_groups(groups), _live_in_groups(groups)
    _assert_out_is_small(out, tmp)


def test_gpu_check_sh_reports_fail_when_the_driver_is_killed(tmp_path):
    """SIGKILL to gpu_check.py (no handler can run): gpu_check.sh patches its report to a complete FAIL with
    the exit status, kills what is left of the run's process groups and prints the FAIL verdict last."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OUT": str(out), "GPU_CHECK_ARGS": "--toy --parts collectives",
           "PYTHON": sys.executable, "TMPDIR": str(tmp)}
    p = subprocess.Popen(["bash", str(ROOT / "bench" / "gpu_check.sh")], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        rep, entry = _wait_for_running(out / "gpu_check.json", p, "collectives", 120)
        os.kill(rep["pid"], signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGKILL, stdout[-3000:] + stderr[-3000:]
    assert stdout.strip().splitlines()[-1] == "gpu_check: FAIL: collectives, harness", stdout[-1000:]
    res = json.loads((out / "gpu_check.json").read_text())
    assert res["verdict"] == "FAIL" and res["complete"] and res["harness_exit_code"] == 128 + signal.SIGKILL
    assert res["pending"] == ["collectives"] and entry["pgid"] in res["child_groups"]
    assert not _live_in_groups(set(res["child_groups"])), _live_in_groups(set(res["child_groups"]))


def test_gpu_check_loss_scale_formula_matches_deepspeed():
    """fp16_loss_scale_settled's expected scale, against DeepSpeed's own DynamicLossScaler as the runs
    configure it (2**12, hysteresis 2, window 1000, no consecutive hysteresis), over overflow patterns."""
    script = r"""
import json, os, random, socket, sys
sys.path.insert(0, sys.argv[1])
import deepspeed
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
import gpu_check_core as core
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
bad = []
patterns = [[True] * 12, [False] * 22, [True, False, True], [False, True] + [False] * 20]
rng = random.Random(0)
patterns += [[rng.random() < q for _ in range(22)] for q in (0.1, 0.3, 0.5) for _ in range(20)]
for pat in patterns:
    sc = DynamicLossScaler(init_scale=2.0 ** core.INITIAL_SCALE_POWER, scale_window=core.LOSS_SCALE_WINDOW,
                           min_scale=core.MIN_LOSS_SCALE, delayed_shift=core.HYSTERESIS, consecutive_hysteresis=False)
    k = 0
    for overflow in pat:
        if overflow and k == 13:  # 2**12 / 2**12 = the minimum: one more overflow raises by design
            break
        sc.update_scale(overflow)
        k += overflow
        if sc.loss_scale != core.expected_loss_scale(k):
            bad.append([pat, k, sc.loss_scale, core.expected_loss_scale(k)])
print(json.dumps({"patterns": len(patterns), "bad": bad[:5]}))
"""
    r = subprocess.run([sys.executable, "-c", script, str(ROOT / "bench")], capture_output=True, text=True,
                       timeout=180, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["patterns"] == 64 and not res["bad"], res


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


@pytest.mark.shared_data
def test_tumour_recipe_bench_toy(tmp_path):
    """The cascade recipe end to end at a few steps per stage: a CT left out of training (lits-tiny),
    both stages trained without it, the cascade and stage 1 alone scored on it; a rerun only re-scores."""
    shared_path("lits-tiny"), shared_path("tace-1720"), shared_path("ircadb-01")
    out = tmp_path / "t.json"
    cmd = [sys.executable, str(ROOT / "bench" / "tumour_recipe.py"), "--heldout", "lits:../shared/data/lits-tiny",
           "--work", str(tmp_path / "w"), "--out", str(out), "--set", "train.max_steps=4",
           "--set", "cascade.stage2.train.max_steps=3", "--set", "checkpoint.every_steps=0"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert not any("lits-tiny" in p for p in res["trained_on"]) and len(res["trained_on"]) == 6
    assert res["stages"]["stage1"]["steps"] == 4 and res["stages"]["stage2"]["steps"] == 3
    case = next(iter(res["cascade"][0]["cases"].values()))
    assert case["lesions"]["reference"] >= 1 and 0.0 <= case["whole_liver_dice"] <= 1.0
    assert set(res["pooled"]) == {"cascade", "stage1_alone"} and res["pooled"]["cascade"]["reference_lesions"] >= 1
    assert case["volumes_ml"]["liver_ml"]["reference"] is None  # lits-tiny's stale header: no millilitres
