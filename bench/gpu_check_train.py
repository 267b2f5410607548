"""The training parts of bench/gpu_check.py: the shipped recipe in fp16 (train, resume, export, evaluate,
predict) and in bf16 under a SLURM-like environment, stopped by SIGUSR2. Checks: docs/gpu-acceptance.md."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from gpu_check_core import (HYSTERESIS, INITIAL_SCALE_POWER, IOU_TOLERANCE, LAST_K, LOSS_SCALE_WINDOW,
                            MIN_LOSS_SCALE, RESUME_STEPS, SKIPPED_LIMIT, STEPS, Run, child_env, expected_loss_scale,
                            finite, hpc, latest_tag, of_type, r4, reap, records, sh, spawn)


def recipe_sets(run: Run, precision: str, steps: int, extra: tuple = ()) -> list[str]:
    sets = [f"data.store={run.work / 'store.zarr'}", f"train.max_steps={steps}", "train.val_max_cases=1",
            "train.log_every_steps=1", "train.warmup_steps=1", f"deepspeed.precision={precision}",
            f"deepspeed.initial_scale_power={INITIAL_SCALE_POWER}",  # 2^12: the first steps are not all skipped
            f"deepspeed.hysteresis={HYSTERESIS}", f"deepspeed.loss_scale_window={LOSS_SCALE_WINDOW}",
            f"deepspeed.min_loss_scale={MIN_LOSS_SCALE}"]  # the scaler expected_loss_scale() models (the defaults)
    if run.toy:
        sets += ["model.size=tiny", "model.overrides={depth: 2}", "data.size=[64,64]", "data.batch_size=4",
                 "data.num_workers=2", "train.lr=1.0e-3"]
    sets += list(extra)
    return [a for s in sets for a in ("--set", s)]


def expected_device(run: Run) -> str:
    return "cpu" if run.toy else "cuda:0"


PROBE = r"""
import json, sys
import torch
from hpc_seg.cli import main
args = sys.argv[1:]  # predict MODEL IMAGE --out OUT
rc = main(args)
used = torch.cuda.is_available() and torch.cuda.max_memory_allocated() > 0
try:
    import nibabel as nib
    shape_ok = nib.load(args[2]).shape == nib.load(args[args.index("--out") + 1]).shape
except Exception as exc:
    shape_ok = f"{type(exc).__name__}: {exc}"
print("gpu_check_probe " + json.dumps({"rc": rc, "device": "cuda" if used else "cpu", "shape_ok": shape_ok,
      "cuda_max_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}), flush=True)
sys.exit(rc)
"""


# ---------------------------------------------------------------------------- fp16
def fp16_part(run: Run, budget: float) -> dict:
    """The recipe in fp16 (toy: bf16): train, resume, export, evaluate, predict."""
    t_end = time.time() + budget
    left = (lambda: t_end - time.time())
    precision = "bf16" if run.toy else "fp16"
    rd, info = run.work / "run-fp16", {"precision": precision}
    cfg = ["--config", "transunet_12l.yaml", "--run-dir", rd]
    every = [f"train.val_every_steps={STEPS}", f"checkpoint.every_steps={STEPS}",
             "train.channels_last=true"]  # the recipe's layout, stated: the bf16 part runs the other

    tr = info["train"] = sh(run, "fp16-train", hpc("train", *cfg, *recipe_sets(run, precision, STEPS, every)),
                            left() - 40, run.work)
    recs1 = records(rd)
    train = of_type(recs1, "train")
    fp16_train_checks(run, tr, train, precision)
    fp16_startup_checks(run, recs1, precision, info)
    if train:
        info["train_figures"] = {k: train[-1].get(k) for k in ("samples_per_s", "samples_per_s_cumulative",
                                                               "peak_mem_gb", "loss_scale", "skipped_steps")}
    saved = [r["step"] for r in of_type(recs1, "checkpoint")]
    if tr["rc"] != 0 or not saved:
        run.undecided({"fp16"}, f"the first training run failed (rc {tr['rc']}, checkpoints {saved})")
        return info
    resume = hpc("train", *cfg, "--resume", "latest", *recipe_sets(run, precision, RESUME_STEPS, every))
    recs = fp16_resume_check(run, resume, rd, len(recs1), saved[-1], info, left)
    model, step = fp16_export(run, rd, info, left)
    if model is None:
        return info
    fp16_evaluate_checks(run, model, step, recs, info, left)
    fp16_predict_check(run, model, info, left)
    return info


def fp16_train_checks(run: Run, tr: dict, train: list[dict], precision: str) -> None:
    """The first run's exit, its loss curve and its loss scaler."""
    run.decide("fp16_train_exit", tr["rc"] == 0, {**tr, "train_records": len(train)})
    losses = [r.get("loss") for r in train]
    all_finite = all(map(finite, losses))
    first = sum(losses[:LAST_K]) / LAST_K if all_finite and len(losses) >= 2 * LAST_K else None
    last = sum(losses[-LAST_K:]) / LAST_K if first is not None else None
    run.decide("loss_falling", len(losses) >= STEPS and first is not None and last < first,
               {"steps": len(losses), f"first{LAST_K}_mean": r4(first), f"last{LAST_K}_mean": r4(last),
                "non_finite": sum(not finite(v) for v in losses)})
    if not train:
        for n in ("fp16_skipped_steps", "fp16_loss_scale_settled"):
            run.decide(n, False, "no train record in metrics.jsonl")
        return
    skipped = train[-1].get("skipped_steps")
    run.decide("fp16_skipped_steps", isinstance(skipped, int) and skipped <= SKIPPED_LIMIT,
               {"skipped_steps": skipped, "steps": train[-1].get("step"), "limit": SKIPPED_LIMIT})
    loss_scale_check(run, train, precision)


def loss_scale_check(run: Run, train: list[dict], precision: str) -> None:
    """fp16: the last loss scale is what DeepSpeed's scaler gives after that many overflows, and none of the
    last LAST_K steps overflowed. bf16 (the toy's stand-in): none skipped, losses finite."""
    tail = train[-(LAST_K + 1):]  # the record before the last LAST_K steps too: a skip at any of them shows
    skips = [r.get("skipped_steps") for r in tail]
    no_skip = len(tail) == LAST_K + 1 and all(isinstance(k, int) for k in skips) and len(set(skips)) == 1
    last = train[-1]
    if precision == "fp16":
        k, scale = last.get("skipped_steps"), last.get("loss_scale")
        want = expected_loss_scale(k) if isinstance(k, int) else None
        in_window = isinstance(last.get("step"), int) and last["step"] < LOSS_SCALE_WINDOW
        ok = no_skip and in_window and finite(scale) and scale == want
        run.decide("fp16_loss_scale_settled", ok, {"loss_scale": scale, "expected": want, "skipped_steps": k,
                                                   "step": last.get("step"), f"skipped_steps_last{LAST_K + 1}": skips})
    else:
        losses_ok = all(finite(r.get("loss")) for r in tail)
        run.decide("fp16_loss_scale_settled", no_skip and losses_ok,
                   {"loss_scale": "none (bf16)", f"skipped_steps_last{LAST_K + 1}": skips, "losses_finite": losses_ok})


def fp16_startup_checks(run: Run, recs: list[dict], precision: str, info: dict) -> None:
    """Loader workers start after the engine; the buffer rule holds in the NHWC layout."""
    starts, loaders = of_type(recs, "startup"), of_type(recs, "loader_start")
    st = starts[0] if starts else None
    if st and loaders:
        ls = loaders[0]
        workers = ls.get("workers")
        times_ok = finite(st.get("time")) and finite(ls.get("time"))
        delta = ls["time"] - st["time"] if times_ok else None
        ok = (times_ok and delta >= 0 and isinstance(workers, int) and workers >= 2
              and st.get("loader_workers") == workers)
        run.decide("loader_after_startup", ok, {"loader_start_minus_startup_s": r4(delta), "workers": workers,
                                                "startup_loader_workers": st.get("loader_workers")})
    else:
        run.decide("loader_after_startup", False, f"missing record(s): {'startup ' if not st else ''}"
                                                  f"{'loader_start' if not loaders else ''}".strip())
    if st:
        ok = st.get("buffers_match_params") is True and st.get("channels_last") is True and \
            st.get("precision") == precision
        run.decide("buffers_match_params_channels_last", ok, {k: st.get(k) for k in ("buffers_match_params",
                                                              "channels_last", "precision", "device")})
        info["startup"] = st
    else:
        run.decide("buffers_match_params_channels_last", False, "no 'startup' record in metrics.jsonl")


def fp16_resume_check(run: Run, cmd: list, rd: Path, n_before: int, saved_step: int, info: dict,
                      left: Callable[[], float]) -> list[dict]:
    """``--resume latest`` continues from the saved step; returns every record of both runs."""
    rs = info["resume"] = sh(run, "fp16-resume", cmd, left() - 30, run.work)
    recs = records(rd)
    later = recs[n_before:]
    resumed = of_type(later, "resume")
    after = [r["step"] for r in of_type(later, "train")]
    ok = rs["rc"] == 0 and bool(resumed) and resumed[0].get("step") == saved_step and bool(after) and \
        max(after) > saved_step
    run.decide("resume_step", ok, {"rc": rs["rc"], "saved_step": saved_step,
                                   "resume_record_step": resumed[0].get("step") if resumed else None,
                                   "last_train_step": max(after) if after else None})
    return recs


def fp16_export(run: Run, rd: Path, info: dict, left: Callable[[], float]) -> tuple[Path | None, int | None]:
    """``export --tag latest``; returns the model file (None when the export failed) and the step it holds."""
    model = run.work / "model-fp16.safetensors"
    ex = info["export"] = sh(run, "fp16-export", hpc("export", rd, "--out", model, "--tag", "latest"),
                             left() - 20, run.work)
    tag = latest_tag(rd)
    step = int(tag[4:]) if tag and tag.startswith("step") and tag[4:].isdigit() else None
    if ex["rc"] != 0 or not model.is_file():
        run.undecided({"fp16"}, f"export failed (rc {ex['rc']})")
        return None, step
    return model, step


def fp16_evaluate_checks(run: Run, model: Path, step: int | None, recs: list[dict], info: dict,
                         left: Callable[[], float]) -> None:
    """``evaluate`` runs on the training device and matches in-training validation at the exported step."""
    ev_dir = run.work / "eval-fp16"
    ev = info["evaluate"] = sh(run, "fp16-evaluate", hpc("evaluate", model, "--data", run.work / "store.zarr",
                                                         "--split", "val", "--limit", "1", "--out", ev_dir,
                                                         "--no-tta", "--no-postprocess", "--save-predictions"),
                               left() - 12, run.work)
    m = json.loads((ev_dir / "metrics.json").read_text()) if (ev_dir / "metrics.json").is_file() else None
    want = "cpu" if run.toy else "cuda"
    if m is None:
        run.decide("evaluate_on_cuda", False, f"no metrics.json (evaluate rc {ev['rc']})")
        run.decide("export_matches_validation", False, f"no metrics.json (evaluate rc {ev['rc']})")
        return
    dev = str(m.get("device"))
    run.decide("evaluate_on_cuda", dev.split(":")[0] == want and ev["rc"] == 0,
               {"device": dev, "expected": want, "rc": ev["rc"], "volumes_per_s": r4(m.get("volumes_per_s"))})
    vals = [r for r in of_type(recs, "val") if r.get("step") == step]
    export_iou_check(run, vals[-1] if vals else None, m, step)


def export_iou_check(run: Run, val: dict | None, m: dict, step: int | None) -> None:
    """Per-class IoU, evaluate vs in-training validation, over the classes defined (not None) on both sides:
    a mean over the defined classes alone would jump when a stray voxel defines a class on one side only."""
    if val is None:
        run.decide("export_matches_validation", False, f"no 'val' record at the exported step {step}")
        return
    ev = {n: c.get("iou") for n, c in (m.get("per_class") or {}).items()}
    va = {n: val.get(f"iou_{n}") for n in ev}
    both = [n for n in ev if finite(ev[n]) and finite(va[n])]
    diffs = {n: abs(ev[n] - va[n]) for n in both}
    worst = max(diffs.values()) if diffs else None
    value = {"step": step, "classes_compared": both, "max_abs_diff": r4(worst),
             "abs_diff": {n: r4(d) for n, d in diffs.items()},
             "not_compared": {n: f"validation {r4(va[n])}, evaluate {r4(ev[n])}" for n in ev if n not in both},
             "validation_iou": {n: r4(va[n]) for n in ev}, "evaluate_iou": {n: r4(ev[n]) for n in ev},
             "tolerance": IOU_TOLERANCE}
    if not both:
        value["max_abs_diff"] = f"no class has an IoU on both sides (classes {list(ev)})"
    run.decide("export_matches_validation", worst is not None and worst <= IOU_TOLERANCE, value)


def fp16_predict_check(run: Run, model: Path, info: dict, left: Callable[[], float]) -> None:
    """``predict`` under PROBE, which reports the CUDA memory it allocated and the output's shape."""
    want = "cpu" if run.toy else "cuda"
    pr_out = run.work / "pred.nii.gz"
    pr = info["predict"] = sh(run, "fp16-predict", [sys.executable, "-c", PROBE, "predict", model,
                                                    run.work / "phantom" / "volume-0.nii.gz", "--out", pr_out],
                              left(), run.work)
    text = (run.work / "logs" / "fp16-predict.log").read_text(errors="replace")
    probe = [json.loads(line.split(" ", 1)[1]) for line in text.splitlines() if line.startswith("gpu_check_probe ")]
    if probe:
        p = probe[-1]
        run.decide("predict_on_cuda", p["rc"] == 0 and p["device"] == want and p["shape_ok"] is True,
                   {**p, "expected": want})
    else:
        run.decide("predict_on_cuda", False, f"no probe line (rc {pr['rc']})")


# ---------------------------------------------------------------------------- bf16
def bf16_part(run: Run, budget: float) -> dict:
    """The recipe in bf16, NCHW layout, under a SLURM-like environment, stopped by SIGUSR2."""
    t_end = min(time.time() + budget, run.deadline)
    rd = run.work / "run-bf16"
    cmd = hpc("train", "--config", "transunet_12l.yaml", "--run-dir", rd,
              *recipe_sets(run, "bf16", 100000, ("train.channels_last=false", "train.val_every_steps=100000",
                                                 "checkpoint.every_steps=0")))
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "1"}
    if not run.toy:
        slurm["CUDA_VISIBLE_DEVICES"] = "0"
    env = child_env(slurm, drop=("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                                 "MASTER_PORT", "SLURM_*"))
    info = {"env": slurm}
    log = run.work / "logs" / "bf16-slurm-sigusr2.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f, run.running("bf16-slurm-sigusr2", t_end - time.time()) as entry:
        f.write(f"$ {' '.join(f'{k}={v}' for k, v in slurm.items())} {' '.join(map(str, cmd))}\n")
        f.flush()
        p = spawn(cmd, f, run.work, env)
        if p is None:
            return {**info, "rc": "skipped (gpu_check.py is stopping)"}
        with run.lock:
            entry["pgid"] = p.pid
        run.save()
        try:
            rc, sig_step = _signal_and_wait(run, p, rd, t_end, t0, info)
        finally:
            reap(p)  # whatever is left of its group
    info["rc"], info["seconds"] = rc, round(time.perf_counter() - t0, 1)
    run.add_log(f"bf16-slurm-sigusr2 rc={rc} {info['seconds']} s", log, rc != 75)
    recs = records(rd)
    bf16_startup_checks(run, recs, rc)
    bf16_sigusr2_check(run, rd, recs, rc, sig_step)
    return info


def _signal_and_wait(run: Run, p: subprocess.Popen, rd: Path, t_end: float, t0: float,
                     info: dict) -> tuple[int | str, int | None]:
    """SIGUSR2 once the job has logged a step, then its exit status; returns (rc, the signalled step)."""
    sig_step = None
    wait_until = t_end - (15 if run.toy else 25)  # time left for the save
    while time.time() < wait_until and p.poll() is None:
        train = of_type(records(rd), "train")
        if train:
            sig_step = train[-1]["step"]
            break
        time.sleep(0.5)
    if sig_step is not None:
        try:
            sig_pid = int(json.loads((rd / "ranks" / "rank0.json").read_text())["pid"])
        except (OSError, ValueError, KeyError):
            sig_pid = p.pid
        try:
            os.kill(sig_pid, signal.SIGUSR2)
        except ProcessLookupError:  # it ended on its own: rc and records say how
            pass
        info["signal"] = {"pid": sig_pid, "at_step": sig_step, "at_s": round(time.perf_counter() - t0, 1)}
    try:
        rc = p.wait(timeout=max(t_end - time.time(), 1)) if sig_step is not None else \
            (p.poll() if p.poll() is not None else "no train record in time")
    except subprocess.TimeoutExpired:
        rc = "timeout after the signal"
    return rc, sig_step


def bf16_startup_checks(run: Run, recs: list[dict], rc) -> None:
    """The SLURM local-rank mapping picks the one visible device; the buffer rule holds in NCHW."""
    st = (of_type(recs, "startup") or [None])[0]
    train = of_type(recs, "train")
    if not st:
        why = f"no 'startup' record (rc {rc}; see gpu_check.log)"
        run.decide("slurm_localid", False, why)
        run.decide("buffers_match_params_nchw", False, why)
        return
    run.decide("slurm_localid", st.get("device") == expected_device(run) and bool(train),
               {"device": st.get("device"), "expected": expected_device(run), "env_source": st.get("env_source"),
                "local_rank": st.get("local_rank"), "world_size": st.get("world_size"),
                "train_records": len(train)})
    ok = (st.get("buffers_match_params") is True and st.get("channels_last") is False
          and st.get("precision") == "bf16")
    run.decide("buffers_match_params_nchw", ok, {k: st.get(k) for k in ("buffers_match_params", "channels_last",
                                                                         "precision")})


def bf16_sigusr2_check(run: Run, rd: Path, recs: list[dict], rc, sig_step: int | None) -> None:
    """SIGUSR2 leaves a checkpoint at or after the signalled step, the pointer on it, and exit 75."""
    ckpts = [r["step"] for r in of_type(recs, "checkpoint")]
    stops = [r.get("reason") for r in of_type(recs, "stop")]
    tag = latest_tag(rd)
    ok = (rc == 75 and sig_step is not None and bool(ckpts) and ckpts[-1] >= sig_step and "signal" in stops
          and tag is not None and (rd / "checkpoints" / tag).is_dir() and tag.endswith(f"{ckpts[-1]:08d}"))
    run.decide("sigusr2_checkpoint_exit_75", ok, {"rc": rc, "signalled_at_step": sig_step,
                                                  "checkpoint_step": ckpts[-1] if ckpts else None,
                                                  "stop_reasons": stops, "latest": tag})
