"""The state and the plumbing of bench/gpu_check.py: the check table, the report, commands in process groups.

The parts (bench/gpu_check_parts.py, bench/gpu_check_train.py) decide checks through ``Run``; the driver
(bench/gpu_check.py) owns the verdict and the signal handlers. Every command is started by ``spawn``: the
leader of a new process group (``process_group=0``) in the caller's session, so that ``killpg`` ends it and
everything it started, and a device command's end still reaches it (a new session would outlive it).
Layout, limits and budgets: docs/gpu-acceptance.md.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("collectives", "fp16", "bf16", "scale")
# seconds; the GPU run must fit 5 minutes with the wheel installation (bench/gpu_check.sh). The parts
# run one after another (the data beside the collectives): 25 + 145 + 70 + 35 = TOTAL_S
BUDGETS_S = {"collectives": 25, "data": 45, "fp16": 145, "bf16": 70, "scale": 35}
TOTAL_S = 275
TOY_BUDGETS_S = {"collectives": 90, "data": 120, "fp16": 330, "bf16": 150, "scale": 150}  # 2 shared cores
TOY_TOTAL_S = 720
STEPS, RESUME_STEPS = 20, 22  # loss checks need >= 20 logged steps
SKIPPED_LIMIT = 10
IOU_TOLERANCE = 0.02
LAST_K = 5
# DeepSpeed's DynamicLossScaler as the runs configure it (passed explicitly by gpu_check_train.recipe_sets).
# Without consecutive_hysteresis the scale never rises before LOSS_SCALE_WINDOW overflow-free steps; the
# first HYSTERESIS - 1 overflows only use up hysteresis, every later one halves the scale (not below MIN).
INITIAL_SCALE_POWER, HYSTERESIS, LOSS_SCALE_WINDOW, MIN_LOSS_SCALE = 12, 2, 1000, 1.0


def expected_loss_scale(skipped: int) -> float:
    """The fp16 loss scale after ``skipped`` overflow-skipped steps, within the first LOSS_SCALE_WINDOW steps."""
    return max(MIN_LOSS_SCALE, 2.0 ** INITIAL_SCALE_POWER / 2.0 ** max(0, skipped - (HYSTERESIS - 1)))

TMP_DIR: str | None = None  # the children's TMPDIR; gpu_check.main sets it to a folder in the scratch
SOCKET_SAFE_LEN = 60  # AF_UNIX paths are limited to 107 bytes; multiprocessing adds ~40 under TMPDIR
LOG_TAIL_OK, LOG_TAIL_FAIL, LOG_CAP = 3000, 8000, 4 * 1024 * 1024

# name: (part, limit, CPU stand-in under --toy or None where the check means the same on the CPU)
CHECKS: dict[str, tuple[str, str, str | None]] = {
    "collectives": ("collectives", "every hpc_seg.distributed.collectives function returns the expected value on CPU "
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
    "fp16_loss_scale_settled": ("fp16", f"last train record: loss_scale == 2**{INITIAL_SCALE_POWER} / "
                                f"2**max(0, skipped_steps - {HYSTERESIS - 1}) (DeepSpeed's dynamic scaler, hysteresis "
                                f"{HYSTERESIS}, no rise within {LOSS_SCALE_WINDOW} steps, min {MIN_LOSS_SCALE:g}), "
                                f"and none of the last {LAST_K} steps skipped",
                                f"bf16 has no loss scale: none of the last {LAST_K} steps skipped and their "
                                f"losses finite"),
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
    "export_matches_validation": ("fp16", f"max over the classes whose IoU is defined on both sides of |evaluate IoU "
                                  f"of the exported latest checkpoint (val case, no TTA, no post-processing) - "
                                  f"in-training validation IoU at the same step| <= {IOU_TOLERANCE} (>= 1 such class)",
                                  "bf16 engine weights vs fp32 export on the CPU"),
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
        self.finishing = False  # set by the driver's verdict: a signal then only ends the children
        self.report = {"verdict": "FAIL", "complete": False, "checks": {}, "pending": list(self.expected),
                       "toy": toy, "parts_run": parts, "inject_failure": sorted(inject), "budget_s": total_s,
                       "budgets_s": budgets, "parts": {}, "started": self.t0, "pid": os.getpid(),
                       "running": [], "interrupted": [], "child_groups": []}
        self.log_path.write_text(f"gpu_check.log: tails of the command logs ({'toy' if toy else 'GPU'} run)\n")
        self.save()  # from the start: a run that dies at once still leaves a FAIL report (all checks pending)

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        with self.lock:
            failing = [n for n, c in self.report["checks"].items() if not c["ok"]]
            self.report["pending"] = [n for n in self.expected if n not in self.report["checks"]]
            failing += ["harness"] if self.report.get("harness_error") else []
            self.report["verdict"] = "PASS" if not failing and not self.report["pending"] else "FAIL"
            self.report["wall_s"] = round(time.time() - self.t0, 1)
            self.report["child_groups"] = list(CHILD_GROUPS)
            if SIGNALS:
                self.report["signals"] = list(SIGNALS)
            write_json_atomic(self.out / "gpu_check.json", self.report)

    @contextmanager
    def running(self, title: str, timeout: float):
        """``report["running"]`` names the command while it runs (saved before it starts, cleared after); a
        command cut short by the driver's end moves to ``report["interrupted"]``."""
        entry = {"title": title, "started_unix": round(time.time(), 2), "timeout_s": round(timeout, 1)}
        with self.lock:
            self.report["running"].append(entry)
        self.save()
        try:
            yield entry
        except BaseException as exc:
            with self.lock:
                entry["interrupted_by"] = f"{type(exc).__name__}: {exc}"
                self.report["interrupted"].append(entry)
            raise
        finally:
            with self.lock:
                self.report["running"] = [e for e in self.report["running"] if e is not entry]
            self.save()

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
    """Run one command in its own process group (killed whole on timeout, and its stragglers after it ends);
    output to its own log, whose tail goes into OUT/gpu_check.log."""
    log = run.work / "logs" / f"{title}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    timeout = min(timeout, run.left())
    if timeout < 2:
        return {"rc": "skipped (budget spent)", "seconds": 0.0}
    t0 = time.perf_counter()
    with open(log, "w") as f, run.running(title, timeout) as entry:
        f.write(f"$ {' '.join(map(str, cmd))}\n")
        f.flush()
        p = spawn(cmd, f, cwd, env or child_env())
        if p is None:
            return {"rc": "skipped (gpu_check.py is stopping)", "seconds": 0.0}
        with run.lock:
            entry["pgid"] = p.pid
        run.save()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
        finally:
            reap(p)
    r = {"rc": rc, "seconds": round(time.perf_counter() - t0, 1)}
    run.add_log(f"{title} rc={rc} {r['seconds']} s", log, rc != 0)
    return r


# ---------------------------------------------------------------------------- child process groups
class Stopped(BaseException):
    """Raised in the driver's main thread by its SIGTERM/SIGINT handler (not an Exception: no part catches it)."""


CHILDREN: set = set()  # the commands not yet reaped, each the leader of its own process group
CHILD_GROUPS: list[int] = []  # every group started (the report lists them: a test checks none is left)
CHILD_LOCK = threading.RLock()  # re-entrant: the handler runs in the main thread, perhaps inside spawn
STOPPING = threading.Event()  # set once the driver is stopping: no command starts any more
SIGNALS: list[str] = []  # the signals the driver received (the report's "signals")
_SPAWNING = [0]  # the main thread is inside spawn: a signal's Stopped waits until the child is registered
_DEFERRED: list[str] = []


def spawn(cmd: list, log, cwd: Path, env: dict) -> subprocess.Popen | None:
    """Start a command as the leader of a new process group in this session (None once stopping)."""
    main = threading.current_thread() is threading.main_thread()
    with CHILD_LOCK:
        if STOPPING.is_set():
            return None
        _SPAWNING[0] += main
        try:
            p = subprocess.Popen([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                 process_group=0)
            CHILDREN.add(p)
            CHILD_GROUPS.append(p.pid)
        finally:
            _SPAWNING[0] -= main
    if STOPPING.is_set():  # the handler ran while it started and may have missed it
        reap(p)
        if main and _DEFERRED:
            raise Stopped(_DEFERRED.pop())
        return None
    return p


def stop(why: str) -> None:
    """The signal handler's work: every child group killed, no new command, Stopped in the main thread
    (deferred while the main thread is inside spawn, raised there once the child is registered)."""
    kill_children()
    if _SPAWNING[0]:
        _DEFERRED.append(why)
    else:
        raise Stopped(why)


def kill_children() -> None:
    STOPPING.set()
    with CHILD_LOCK:
        live = list(CHILDREN)
    for p in live:
        reap(p)


def reap(p: subprocess.Popen) -> None:
    """SIGKILL to the command's whole group (its leader, loader workers, any stragglers), then wait for it."""
    kill_group(p)
    with CHILD_LOCK:
        CHILDREN.discard(p)


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


def latest_tag(run_dir: Path) -> str | None:
    """The tag the run's ``checkpoints/latest`` pointer names (None without a pointer)."""
    pointer = run_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None
