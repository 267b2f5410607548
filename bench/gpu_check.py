"""One-call GPU acceptance of the path users run: numeric checks, one verdict (docs/gpu-acceptance.md).

Every check is a number against a stated limit; ``OUT/gpu_check.json`` holds
``{"verdict": "PASS"|"FAIL", "checks": {name: {"ok", "value", "limit", ...}}, ...}`` and is rewritten
atomically after every check and every part, so a run cut short still says what it established
(``complete: false``; a check not yet decided counts as failed). One line per check is printed as it
is decided; the LAST line printed is the verdict (``gpu_check: PASS (N checks)`` or
``gpu_check: FAIL: name, name``); the exit status is 0 on PASS, 1 on FAIL, 2 on bad arguments.

Parts (``--parts``, comma-separated; each has a time budget, all together a global one):

* ``collectives`` — every function of ``hpc_seg.utils.collectives`` on CUDA and CPU tensors in a real
  NCCL group of one (own process).
* (data) — ``hpc-seg phantom`` + ``hpc-seg prepare``, started at once in the background whenever
  ``fp16`` or ``bf16`` is selected.
* ``fp16`` — the shipped ``transunet_12l.yaml`` recipe (TransUNet-12L, 512², batch 16, fp16, ZeRO-2,
  activation checkpointing, channels_last, its loader workers) for 20 steps with validation and a
  checkpoint, ``--resume latest`` for 2 more, ``export``, ``evaluate`` and ``predict``.
* ``bf16`` — the same recipe in bf16 with ``train.channels_last: false`` (the other layout) under a
  SLURM-like environment (``SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=1``, ``CUDA_VISIBLE_DEVICES=0``),
  stopped by SIGUSR2.
* ``scale`` — ``bench/gpu_scale.py`` within its budget (rows stop when it is spent).

Everything is written under ``--work`` (scratch; ``bench/gpu_check.sh`` makes one outside ``OUT`` and
removes it); ``OUT`` gets only gpu_check.json, gpu_check.log (bounded tails of the command logs),
gpu_scale.json and gpu_scale.png.

``--toy`` runs the same on the CPU at toy size (tiny TransUNet, 64², batch 4); each GPU-only check
then has a CPU stand-in, stated in its entry (``stand_in``): bf16 for fp16, the device the run had for
CUDA, the local-rank mapping with one device.

    python bench/gpu_check.py --out /tmp/gc --toy
    OUT=$OUT bash bench/gpu_check.sh            # on the GPU machine (the device command)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("collectives", "fp16", "bf16", "scale")
# seconds; the GPU run must fit 5 minutes with the wheel installation (bench/gpu_check.sh)
BUDGETS_S = {"collectives": 25, "data": 45, "fp16": 125, "bf16": 50, "scale": 75}
TOTAL_S = 275
TOY_BUDGETS_S = {"collectives": 90, "data": 120, "fp16": 330, "bf16": 150, "scale": 150}  # 2 shared cores
TOY_TOTAL_S = 720
STEPS, RESUME_STEPS = 20, 22  # loss checks need >= 20 logged steps
SKIPPED_LIMIT = 10
IOU_TOLERANCE = 0.02
LAST_K = 5
TMP_DIR: str | None = None  # the children's TMPDIR (set in main)
SOCKET_SAFE_LEN = 60  # AF_UNIX paths are limited to 107 bytes; multiprocessing adds ~40 under TMPDIR
LOG_TAIL_OK, LOG_TAIL_FAIL, LOG_CAP = 3000, 8000, 4 * 1024 * 1024

# name: (part, limit, CPU stand-in under --toy or None where the check means the same on the CPU)
CHECKS: dict[str, tuple[str, str, str | None]] = {
    "collectives": ("collectives", "every hpc_seg.utils.collectives function returns the expected value on CPU "
                    "and CUDA tensors in an NCCL group of one",
                    "a gloo group of one, CPU tensors only (no CUDA here)"),
    "data_prepared": ("data", "hpc-seg phantom and hpc-seg prepare exit 0 within their budget", None),
    "fp16_train_exit": ("fp16", f"hpc-seg train (transunet_12l recipe, fp16, {STEPS} steps) exits 0 within its "
                        "budget", "bf16 for fp16 (DeepSpeed's CPU accelerator has no fp16 here)"),
    "loss_falling": ("fp16", f">= {STEPS} logged steps, every loss finite, mean of the last {LAST_K} < mean of the "
                     f"first {LAST_K}", "bf16 for fp16"),
    "fp16_skipped_steps": ("fp16", f"skipped_steps (overflow-skipped optimizer steps) <= {SKIPPED_LIMIT} over "
                           f"{STEPS} steps, deepspeed.initial_scale_power=12",
                           "bf16 for fp16: bf16 has no loss scaler, skipped_steps must still be <= the limit"),
    "fp16_loss_scale_settled": ("fp16", f"loss_scale of the last {LAST_K} train records equal to the last one, and "
                                f"no step skipped within them", f"bf16 has no loss scale: no step skipped within "
                                f"the last {LAST_K} records and their losses finite"),
    "loader_after_startup": ("fp16", "'loader_start' record time >= 'startup' record time (CUDA/NCCL and engine "
                             "up first), with the recipe's loader workers (>= 2, the same count in both records)",
                             "gloo start-up on the CPU; data.num_workers=2"),
    "buffers_match_params_channels_last": ("fp16", "startup record: buffers_match_params true, channels_last true "
                                           "(the recipe's layout), precision fp16", "bf16 for fp16"),
    "resume_step": ("fp16", "'resume' record step == the saved checkpoint step, and train records continue past it",
                    None),
    "evaluate_on_cuda": ("fp16", "hpc-seg evaluate metrics.json device is cuda",
                         "the device the run had (the training startup record's device type: cpu)"),
    "predict_on_cuda": ("fp16", "hpc-seg predict allocated CUDA memory (torch.cuda.max_memory_allocated > 0) and "
                        "wrote a label volume of the input's shape",
                        "the device the run had (cpu: no CUDA memory), output of the input's shape"),
    "export_matches_validation": ("fp16", f"|evaluate mean IoU of the exported latest checkpoint (val cases, no TTA, "
                                  f"no post-processing) - in-training validation mean IoU at the same step| <= "
                                  f"{IOU_TOLERANCE}", "bf16 engine weights vs fp32 export on the CPU"),
    "slurm_localid": ("bf16", "under SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=1 CUDA_VISIBLE_DEVICES=0 the "
                         "training job starts (a train record) on device cuda:0",
                         "the same variables without CUDA_VISIBLE_DEVICES: the job starts on device cpu"),
    "sigusr2_checkpoint_exit_75": ("bf16", "SIGUSR2 to the running hpc-seg train: a checkpoint at or after the "
                                   "signalled step, a 'stop' record (signal), the 'latest' pointer on it, exit 75",
                                   None),
    "buffers_match_params_nchw": ("bf16", "startup record: buffers_match_params true, channels_last false, "
                                  "precision bf16", None),
    "scale_rows": ("scale", "bench/gpu_scale.py wrote gpu_scale.json with >= 1 row ok and no row in error "
                   "(out-of-memory rows are reported, not errors)", "tiny TransUNet rows on the CPU, bf16 for fp16"),
}


def check_parts(name: str) -> set[str]:
    part = CHECKS[name][0]
    return {"fp16", "bf16"} if part == "data" else {part}


# ---------------------------------------------------------------------------- the run's state
class Run:
    """The report, its atomic rewrites, the summary log, the per-check lines."""

    def __init__(self, out: Path, work: Path, toy: bool, parts: list[str], inject: set[str], total_s: float,
                 budgets: dict):
        self.out, self.work, self.toy, self.parts, self.inject = out, work, toy, parts, inject
        self.t0 = time.time()
        self.deadline = self.t0 + total_s
        self.lock = threading.Lock()
        self.log_path = out / "gpu_check.log"
        self.log_bytes = 0
        self.expected = [n for n in CHECKS if check_parts(n) & set(parts)]
        self.report = {"verdict": "FAIL", "complete": False, "checks": {}, "pending": list(self.expected),
                       "toy": toy, "parts_run": parts, "inject_failure": sorted(inject), "budget_s": total_s,
                       "budgets_s": budgets, "parts": {}, "started": self.t0}
        self.log_path.write_text(f"gpu_check.log: tails of the command logs ({'toy' if toy else 'GPU'} run)\n")

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        with self.lock:
            failing = [n for n, c in self.report["checks"].items() if not c["ok"]]
            self.report["pending"] = [n for n in self.expected if n not in self.report["checks"]]
            failing += ["harness"] if self.report.get("harness_error") else []
            self.report["verdict"] = "PASS" if not failing and not self.report["pending"] else "FAIL"
            self.report["wall_s"] = round(time.time() - self.t0, 1)
            write_json_atomic(self.out / "gpu_check.json", self.report)

    def decide(self, name: str, ok: bool, value) -> bool:
        part, limit, stand_in = CHECKS[name]
        entry = {"ok": bool(ok), "value": value, "limit": limit, "part": part}
        if self.toy and stand_in:
            entry["stand_in"] = stand_in
        if name in self.inject:
            entry.update(ok=False, injected=True)
        with self.lock:
            self.report["checks"][name] = entry
        print(f"  {'ok  ' if entry['ok'] else 'FAIL'} {name}: {short(value)}"
              + (" [injected failure]" if name in self.inject else ""), flush=True)
        self.save()
        return entry["ok"]

    def undecided(self, part_names: set[str], why: str) -> None:
        for name in self.expected:
            if name not in self.report["checks"] and CHECKS[name][0] in part_names:
                self.decide(name, False, f"not decided: {why}")

    def add_log(self, title: str, log: Path, failed: bool) -> None:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            text = "(no log)"
        cap = LOG_TAIL_FAIL if failed else LOG_TAIL_OK
        tail = text if len(text) <= cap else "[…]" + text[-cap:]
        block = f"\n===== {title} ({'FAILED' if failed else 'ok'}) =====\n{tail}\n"
        with self.lock:
            if self.log_bytes + len(block) > LOG_CAP:
                return
            self.log_bytes += len(block)
            with open(self.log_path, "a") as f:
                f.write(block)

    def note(self, text: str) -> None:
        with self.lock, open(self.log_path, "a") as f:
            f.write(text + "\n")


def write_json_atomic(path: Path, obj) -> None:
    """Temporary file in the same folder, fsync, rename: a reader never sees half a report."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def short(value, width: int = 150) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def child_env(extra: dict | None = None, drop: tuple[str, ...] = ()) -> dict:
    env = {k: v for k, v in os.environ.items() if not any(k == d or (d.endswith("*") and k.startswith(d[:-1]))
                                                          for d in drop)}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env["TMPDIR"] = TMP_DIR or env.get("TMPDIR", "/tmp")  # temporary files of the children stay in the scratch
    env.update(extra or {})
    return env


def sh(run: Run, title: str, cmd: list, timeout: float, cwd: Path, env: dict | None = None) -> dict:
    """Run one command in its own process group (killed whole on timeout); output to its own log,
    whose tail goes into OUT/gpu_check.log."""
    log = run.work / "logs" / f"{title}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = min(timeout, run.left())
    if timeout < 2:
        return {"rc": "skipped (budget spent)", "seconds": 0.0}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd,
                             env=env or child_env(), start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(p)
            rc = f"timeout after {timeout:.0f} s"
    r = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    run.add_log(f"{title} rc={rc} {r['seconds']} s", log, rc != 0)
    return r


def kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        p.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def hpc(*args) -> list:
    return [sys.executable, "-m", "hpc_seg", *map(str, args)]


def records(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    out = []
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a kill
    return out


def of_type(recs: list[dict], kind: str) -> list[dict]:
    return [r for r in recs if r.get("type") == kind]


def finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def r4(v):
    return round(v, 4) if finite(v) else v


# ---------------------------------------------------------------------------- collectives
def collectives_part() -> dict:
    """In-process (own process): a real group of one rank; each function on each device."""
    import torch
    import torch.distributed as dist

    from hpc_seg.utils import collectives as coll

    cuda = torch.cuda.is_available()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group(coll.backend_name(), rank=0, world_size=1)
    devices = ["cpu"] + (["cuda"] if cuda else [])
    checks = {
        "all_reduce_sum": lambda d: coll.all_reduce(torch.ones(3, device=d), "sum").tolist() == [1.0] * 3,
        "all_reduce_max": lambda d: coll.all_reduce(torch.tensor([2.0], device=d), "max").item() == 2.0,
        "broadcast": lambda d: coll.broadcast(torch.arange(4, device=d)).tolist() == [0, 1, 2, 3],
        "all_max": lambda d: coll.all_max(5.0) == 5.0,
        "broadcast_object": lambda d: coll.broadcast_object({"tag": "step00000010"}) == {"tag": "step00000010"},
        "all_gather_object": lambda d: coll.all_gather_object([1, 2]) == [[1, 2]],
        "barrier": lambda d: coll.barrier() is None,
        "metrics_all_reduce": lambda d: _metrics_ok(d),
    }
    out = {"backend": str(dist.get_backend()), "devices": devices, "results": {}}
    for name, fn in checks.items():
        for d in devices:
            try:
                out["results"][f"{name}[{d}]"] = "ok" if fn(d) else "wrong value"
            except Exception as exc:  # recorded, not raised: this is what the check is for
                out["results"][f"{name}[{d}]"] = f"{type(exc).__name__}: {exc}"[:300]
    dist.destroy_process_group()
    return out


def _metrics_ok(device: str) -> bool:
    import torch

    from hpc_seg.metrics import SegmentationMetrics

    m = SegmentationMetrics(3, ["background", "liver", "tumour"])
    m.update(torch.randn(2, 3, 8, 8, device=device), torch.randint(0, 3, (2, 8, 8), device=device), case_ids=["a", "b"])
    before = m.confusion.clone()
    m.all_reduce()  # CPU counts over the group's backend (NCCL on the GPU)
    return bool((m.confusion == before).all())


def run_collectives(run: Run, budget: float) -> dict:
    title = "collectives"
    sh(run, title, [sys.executable, __file__, "--out", run.work, "--part", "collectives"], budget, run.work)
    text = (run.work / "logs" / f"{title}.log").read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.startswith("{")]
    if not lines:
        run.decide("collectives", False, "no result line (see gpu_check.log)")
        return {}
    res = json.loads(lines[-1])
    bad = {k: v for k, v in res["results"].items() if v != "ok"}
    expect = ["cpu", "cuda"] if not run.toy else ["cpu"]
    ok = not bad and res["devices"] == expect
    run.decide("collectives", ok, {"backend": res["backend"], "devices": res["devices"],
                                   "passed": len(res["results"]) - len(bad), "failed": bad or None})
    return res


# ---------------------------------------------------------------------------- data
def prepare_data(run: Run, budget: float) -> dict:
    t_end = time.time() + budget
    shape = ["64", "64", "12"] if run.toy else ["512", "512", "24"]
    r = sh(run, "phantom", hpc("phantom", run.work / "phantom", "--cases", "4", "--shape", *shape), budget, run.work)
    if r["rc"] == 0:
        r = sh(run, "prepare", hpc("prepare", "phantom", run.work / "phantom", run.work / "store.zarr", "--val", "0.25",
                                   "--test", "0.25", "--workers", "2" if run.toy else "4", "--quiet"),
               t_end - time.time(), run.work)
    return r


# ---------------------------------------------------------------------------- training parts
def recipe_sets(run: Run, precision: str, steps: int, extra: tuple = ()) -> list[str]:
    sets = [f"data.store={run.work / 'store.zarr'}", f"train.max_steps={steps}", "train.val_max_cases=1",
            "train.log_every_steps=1", "train.warmup_steps=1", f"deepspeed.precision={precision}",
            "deepspeed.initial_scale_power=12"]  # 2^12: timed steps are not all overflow-skipped
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
    train, starts, loaders = of_type(recs1, "train"), of_type(recs1, "startup"), of_type(recs1, "loader_start")
    run.decide("fp16_train_exit", tr["rc"] == 0, {**tr, "train_records": len(train)})
    losses = [r.get("loss") for r in train]
    all_finite = all(map(finite, losses))
    first = sum(losses[:LAST_K]) / LAST_K if all_finite and len(losses) >= 2 * LAST_K else None
    last = sum(losses[-LAST_K:]) / LAST_K if first is not None else None
    run.decide("loss_falling", len(losses) >= STEPS and first is not None and last < first,
               {"steps": len(losses), f"first{LAST_K}_mean": r4(first), f"last{LAST_K}_mean": r4(last),
                "non_finite": sum(not finite(v) for v in losses)})
    if train:
        skipped = train[-1].get("skipped_steps")
        run.decide("fp16_skipped_steps", isinstance(skipped, int) and skipped <= SKIPPED_LIMIT,
                   {"skipped_steps": skipped, "steps": train[-1].get("step"), "limit": SKIPPED_LIMIT})
        tail = train[-LAST_K:]
        skips = [r.get("skipped_steps") for r in tail]
        stable = len(tail) == LAST_K and len(set(skips)) == 1 and skips[0] is not None
        if precision == "fp16":
            scales = [r.get("loss_scale") for r in tail]
            ok = stable and all(finite(s) for s in scales) and len(set(scales)) == 1
            run.decide("fp16_loss_scale_settled", ok, {"loss_scale_last": scales, "skipped_steps_last": skips})
        else:
            ok = stable and all(finite(r.get("loss")) for r in tail)
            run.decide("fp16_loss_scale_settled", ok, {"loss_scale": "none (bf16)", "skipped_steps_last": skips,
                                                       "losses_finite": all(finite(r.get("loss")) for r in tail)})
    else:
        for n in ("fp16_skipped_steps", "fp16_loss_scale_settled"):
            run.decide(n, False, "no train record in metrics.jsonl")
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
    if train:
        info["train_figures"] = {k: train[-1].get(k) for k in ("samples_per_s", "samples_per_s_cumulative",
                                                               "peak_mem_gb", "loss_scale", "skipped_steps")}
    saved = [r["step"] for r in of_type(recs1, "checkpoint")]
    if tr["rc"] != 0 or not saved:
        run.undecided({"fp16"}, f"the first training run failed (rc {tr['rc']}, checkpoints {saved})")
        return info

    # resume
    rs = info["resume"] = sh(run, "fp16-resume", hpc("train", *cfg, "--resume", "latest",
                                                     *recipe_sets(run, precision, RESUME_STEPS, every)),
                             left() - 30, run.work)
    recs = records(rd)
    later = recs[len(recs1):]
    resumed = of_type(later, "resume")
    after = [r["step"] for r in of_type(later, "train")]
    ok = rs["rc"] == 0 and bool(resumed) and resumed[0].get("step") == saved[-1] and bool(after) and \
        max(after) > saved[-1]
    run.decide("resume_step", ok, {"rc": rs["rc"], "saved_step": saved[-1],
                                   "resume_record_step": resumed[0].get("step") if resumed else None,
                                   "last_train_step": max(after) if after else None})

    # export → evaluate → predict
    model = run.work / "model-fp16.safetensors"
    ex = info["export"] = sh(run, "fp16-export", hpc("export", rd, "--out", model, "--tag", "latest"),
                             left() - 20, run.work)
    pointer = rd / "checkpoints" / "latest"
    tag = pointer.read_text().strip() if pointer.is_file() else None
    step = int(tag[4:]) if tag and tag.startswith("step") and tag[4:].isdigit() else None
    if ex["rc"] != 0 or not model.is_file():
        run.undecided({"fp16"}, f"export failed (rc {ex['rc']})")
        return info
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
    else:
        dev = str(m.get("device"))
        run.decide("evaluate_on_cuda", dev.split(":")[0] == want and ev["rc"] == 0,
                   {"device": dev, "expected": want, "rc": ev["rc"], "volumes_per_s": r4(m.get("volumes_per_s"))})
        vals = [r for r in of_type(recs, "val") if r.get("step") == step]
        vi, ei = (vals[-1].get("mean_iou") if vals else None), m.get("mean_iou")
        diff = abs(vi - ei) if finite(vi) and finite(ei) else None
        run.decide("export_matches_validation", diff is not None and diff <= IOU_TOLERANCE,
                   {"step": step, "validation_mean_iou": r4(vi), "evaluate_mean_iou": r4(ei), "abs_diff": r4(diff),
                    "tolerance": IOU_TOLERANCE})
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
    return info


def bf16_part(run: Run, budget: float) -> dict:
    """The recipe in bf16, NCHW layout, under a SLURM-like environment, stopped by SIGUSR2."""
    t_end = time.time() + budget
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
    with open(log, "w") as f:
        f.write(f"$ {' '.join(f'{k}={v}' for k, v in slurm.items())} {' '.join(map(str, cmd))}\n")
        f.flush()
        p = subprocess.Popen([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=run.work, env=env,
                             start_new_session=True)
        sig_step = sig_pid = None
        wait_until = min(t_end, run.deadline) - (15 if run.toy else 25)  # time left for the save
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
            rc = p.wait(timeout=max(min(t_end, run.deadline) - time.time(), 1)) if sig_step is not None else \
                (p.poll() if p.poll() is not None else "no train record in time")
        except subprocess.TimeoutExpired:
            rc = "timeout after the signal"
        if p.poll() is None:
            kill_group(p)
    info["rc"], info["seconds"] = rc, round(time.perf_counter() - t0, 1)
    run.add_log(f"bf16-slurm-sigusr2 rc={rc} {info['seconds']} s", log, rc != 75)
    recs = records(rd)
    st = (of_type(recs, "startup") or [None])[0]
    train = of_type(recs, "train")
    if st:
        run.decide("slurm_localid", st.get("device") == expected_device(run) and bool(train),
                   {"device": st.get("device"), "expected": expected_device(run), "env_source": st.get("env_source"),
                    "local_rank": st.get("local_rank"), "world_size": st.get("world_size"),
                    "train_records": len(train)})
        ok = (st.get("buffers_match_params") is True and st.get("channels_last") is False
              and st.get("precision") == "bf16")
        run.decide("buffers_match_params_nchw", ok, {k: st.get(k) for k in ("buffers_match_params", "channels_last",
                                                                             "precision")})
    else:
        why = f"no 'startup' record (rc {rc}; see gpu_check.log)"
        run.decide("slurm_localid", False, why)
        run.decide("buffers_match_params_nchw", False, why)
    ckpts = [r["step"] for r in of_type(recs, "checkpoint")]
    stops = [r.get("reason") for r in of_type(recs, "stop")]
    pointer = rd / "checkpoints" / "latest"
    tag = pointer.read_text().strip() if pointer.is_file() else None
    ok = (rc == 75 and sig_step is not None and bool(ckpts) and ckpts[-1] >= sig_step and "signal" in stops
          and tag is not None and (rd / "checkpoints" / tag).is_dir() and tag.endswith(f"{ckpts[-1]:08d}"))
    run.decide("sigusr2_checkpoint_exit_75", ok, {"rc": rc, "signalled_at_step": sig_step,
                                                  "checkpoint_step": ckpts[-1] if ckpts else None,
                                                  "stop_reasons": stops, "latest": tag})
    return info


def scale_part(run: Run, budget: float) -> dict:
    out_json = run.out / "gpu_scale.json"
    cmd = [sys.executable, ROOT / "bench" / "gpu_scale.py", "--out", out_json, "--work", run.work / "scale",
           "--budget-s", f"{max(budget - (25 if run.toy else 15), 5):.0f}"] + (["--toy"] if run.toy else [])
    r = sh(run, "scale", cmd, budget, run.work)
    if not out_json.is_file():
        run.decide("scale_rows", False, f"no gpu_scale.json (rc {r['rc']})")
        return r
    doc = json.loads(out_json.read_text())
    counts: dict[str, int] = {}
    for row in doc.get("rows", []):
        counts[row["status"].split(" ")[0]] = counts.get(row["status"].split(" ")[0], 0) + 1
    errors = [f"{row['name']}/b{row['batch']}: {row.get('error_type')}" for row in doc.get("rows", [])
              if row["status"] == "error"]
    run.decide("scale_rows", counts.get("ok", 0) >= 1 and not errors,
               {"rows": counts, "errors": errors or None, "rc": r["rc"]})
    return {**r, "rows": counts}


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.log and gpu_scale.json/png")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    ap.add_argument("--toy", action="store_true", help="CPU rehearsal at toy size (stand-ins for GPU-only checks)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--inject-failure", action="append", default=[], choices=list(CHECKS), metavar="NAME",
                    help="make this check fail (tests the failing path); repeatable")
    ap.add_argument("--budget-s", type=float, default=None, help=f"global time budget (default: {TOTAL_S}, "
                    f"toy {TOY_TOTAL_S})")
    ap.add_argument("--budgets", default="", metavar="PART=S,...", help="per-part budgets in seconds replacing "
                    f"the defaults (e.g. fp16=150,bf16=60; defaults {BUDGETS_S}, toy {TOY_BUDGETS_S})")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in-process
    args = ap.parse_args(argv)
    if args.part == "collectives":
        print(json.dumps(collectives_part()), flush=True)
        return 0
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts: unknown {unknown} (choose from {','.join(PARTS)})")
    budgets = dict(TOY_BUDGETS_S if args.toy else BUDGETS_S)
    for item in filter(None, args.budgets.split(",")):
        key, _, val = item.partition("=")
        if key not in budgets or not val.replace(".", "", 1).isdigit():
            ap.error(f"--budgets: '{item}' is not PART=SECONDS with PART one of {', '.join(budgets)}")
        budgets[key] = float(val)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check.")) if own_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    global TMP_DIR
    TMP_DIR = str(work / "tmp")  # short enough for AF_UNIX socket paths (DataLoader workers share tensors there)
    if len(TMP_DIR) > SOCKET_SAFE_LEN:
        TMP_DIR = tempfile.mkdtemp(prefix="gpu_check.", dir="/tmp")  # removed at the end like the scratch
    os.makedirs(TMP_DIR, exist_ok=True)
    os.environ["TMPDIR"], tempfile.tempdir = TMP_DIR, None  # this process's imports (deepspeed) write there too
    run = Run(out, work, args.toy, parts, set(args.inject_failure),
              args.budget_s or (TOY_TOTAL_S if args.toy else TOTAL_S), budgets)
    try:
        drive(run, parts, budgets)
    except BaseException as exc:  # the verdict line must still come
        run.report["harness_error"] = "".join(traceback.format_exception(exc))[-3000:]
        run.note(run.report["harness_error"])
        run.undecided({CHECKS[n][0] for n in CHECKS}, f"gpu_check.py itself failed: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(TMP_DIR, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    run.undecided({CHECKS[n][0] for n in CHECKS}, "its part did not decide it")
    run.report["complete"] = True
    run.save()
    rep = run.report
    failing = [n for n, c in rep["checks"].items() if not c["ok"]] + (["harness"] if rep.get("harness_error") else [])
    run.note(f"\nverdict: {rep['verdict']} ({len(rep['checks'])} checks, {rep['wall_s']} s); failing: "
             f"{', '.join(failing) or '-'}")
    print(f"gpu_check: PASS ({len(rep['checks'])} checks)" if rep["verdict"] == "PASS" else
          f"gpu_check: FAIL: {', '.join(failing)}", flush=True)
    return 0 if rep["verdict"] == "PASS" else 1


def drive(run: Run, parts: list[str], budgets: dict) -> None:
    import torch

    run.report.update(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                      torch=torch.__version__, cuda=torch.version.cuda, python=sys.version.split()[0])
    try:
        import deepspeed

        run.report["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # the training parts say what this costs
        run.report["deepspeed"] = f"not importable: {type(exc).__name__}: {exc}"
    run.save()
    print(f"gpu_check: {run.report['device']}, torch {torch.__version__}, parts {','.join(parts)}"
          f"{' (toy: CPU stand-ins)' if run.toy else ''}, budget {run.report['budget_s']:.0f} s", flush=True)
    data: dict = {}
    data_ok = False
    if {"fp16", "bf16"} & set(parts):  # CPU work, in the background while the collectives run
        def prep():
            t0 = time.perf_counter()
            data.update(prepare_data(run, budgets["data"]))
            data["wall_s"] = round(time.perf_counter() - t0, 1)
        prep_thread = threading.Thread(target=prep, daemon=True)
        prep_thread.start()
    else:
        prep_thread = None
    for part in parts:
        if part in ("fp16", "bf16") and prep_thread is not None:
            prep_thread.join(max(run.left(), 0))
            prep_thread_done = not prep_thread.is_alive()
            run.report["parts"]["data"] = data
            data_ok = prep_thread_done and data.get("rc") == 0
            run.decide("data_prepared", data_ok, {"rc": data.get("rc", "still running"), "seconds": data.get("wall_s")})
            prep_thread = None
        if part in ("fp16", "bf16") and not data_ok:
            run.undecided({part}, "no prepared data")
            continue
        budget = min(budgets[part], run.left())
        print(f"gpu_check: part {part} (budget {budget:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            if budget < 5:
                raise TimeoutError("the global budget is spent")
            info = {"collectives": run_collectives, "fp16": fp16_part, "bf16": bf16_part,
                    "scale": scale_part}[part](run, budget)
        except Exception as exc:  # one part's failure must not cost the others' results
            info = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
            run.note(f"part {part} raised:\n{info['traceback']}")
        run.undecided({part}, f"part {part} ended early ({info.get('error', 'see gpu_check.log')})")
        run.report["parts"][part] = {**info, "wall_s": round(time.perf_counter() - t0, 1), "budget_s": round(budget)}
        run.save()


if __name__ == "__main__":
    sys.exit(main())
