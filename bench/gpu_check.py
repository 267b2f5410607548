"""One-call GPU acceptance of the path users run: numeric checks, one verdict (docs/gpu-acceptance.md).

Every check is a number against a stated limit; ``OUT/gpu_check.json`` holds
``{"verdict": "PASS"|"FAIL", "checks": {name: {"ok", "value", "limit", ...}}, ...}`` and is rewritten
atomically after every check and every part, so a run cut short still says what it established
(``complete: false``; a check not yet decided counts as failed). One line per check is printed as it
is decided; the LAST line printed is the verdict (``gpu_check: PASS (N checks)`` or
``gpu_check: FAIL: name, name``); the exit status is 0 on PASS, 1 on FAIL, 2 on bad arguments.
On SIGTERM or SIGINT (and at any exit before the verdict) every child's process group is killed, the checks
not yet decided fail, and the report and the verdict line are still written (exit status 1).

Parts (``--parts``, comma-separated; each has a time budget, all together a global one):

* ``collectives`` — every function of ``hpc_seg.distributed.collectives`` on CUDA and CPU tensors in a real
  NCCL group of one (own process).
* (data) — ``hpc-seg phantom`` + ``hpc-seg prepare``, started at once in the background whenever
  ``fp16`` or ``bf16`` is selected.
* ``fp16`` — the shipped ``transunet_12l.yaml`` recipe (TransUNet-12L, 512², batch 16, fp16, ZeRO-2,
  activation checkpointing, channels_last, its loader workers) for 20 steps with validation and a
  checkpoint, ``--resume latest`` for 2 more, ``export``, ``evaluate`` and ``predict``.
* ``bf16`` — the same recipe in bf16 with ``train.channels_last: false`` (the other layout) under a
  SLURM-like environment (``SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=1``, ``CUDA_VISIBLE_DEVICES=0``),
  stopped by SIGUSR2.
* ``scale`` — ``bench/gpu_scale.py`` within its budget (rows stop when it is spent); run last, it may also
  use what the earlier parts left of the global budget (unless ``--budgets`` names it).

Everything is written under ``--work`` (scratch; ``bench/gpu_check.sh`` makes one outside ``OUT`` and
removes it); ``OUT`` gets only gpu_check.json, gpu_check.log (bounded tails of the command logs),
gpu_scale.json and gpu_scale.png.

``--toy`` runs the same on the CPU at toy size (tiny TransUNet, 64², batch 4); each GPU-only check
then has a CPU stand-in, stated in its entry (``stand_in``): bf16 for fp16, the device the run had for
CUDA, the local-rank mapping with one device.

This file parses the arguments, drives the parts and prints the verdict; the check table and the run's
state are in ``bench/gpu_check_core.py``, the parts in ``bench/gpu_check_parts.py`` (collectives, data,
scale) and ``bench/gpu_check_train.py`` (fp16, bf16).

    python bench/gpu_check.py --out /tmp/gc --toy
    OUT=$OUT bash bench/gpu_check.sh            # on the GPU machine (the device command)
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:  # the parts import each other by name, whether run as a script or loaded by path
    sys.path.append(str(BENCH))

import gpu_check_core as core  # noqa: E402  (needs BENCH on the path)
from gpu_check_core import BUDGETS_S, CHECKS, PARTS, TOTAL_S, TOY_BUDGETS_S, TOY_TOTAL_S, Run  # noqa: E402
from gpu_check_core import STEPS  # noqa: E402,F401  (the tests read CHECKS, PARTS and STEPS from this module)
from gpu_check_parts import collectives_part, prepare_data, run_collectives, scale_part  # noqa: E402
from gpu_check_train import bf16_part, fp16_part  # noqa: E402

PART_RUNNERS = {"collectives": run_collectives, "fp16": fp16_part, "bf16": bf16_part, "scale": scale_part}


# ---------------------------------------------------------------------------- arguments
def parser() -> argparse.ArgumentParser:
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
    return ap


def selected_parts(ap: argparse.ArgumentParser, args) -> list[str]:
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        ap.error(f"--parts: unknown {unknown} (choose from {','.join(PARTS)})")
    return parts


def part_budgets(ap: argparse.ArgumentParser, args) -> dict:
    budgets = dict(TOY_BUDGETS_S if args.toy else BUDGETS_S)
    for item in filter(None, args.budgets.split(",")):
        key, _, val = item.partition("=")
        if key not in budgets or not val.replace(".", "", 1).isdigit():
            ap.error(f"--budgets: '{item}' is not PART=SECONDS with PART one of {', '.join(budgets)}")
        budgets[key] = float(val)
    return budgets


def children_tmp_dir(work: Path) -> str:
    """The children's TMPDIR: in the scratch, or a short /tmp folder where the scratch path is too long."""
    tmp = str(work / "tmp")  # short enough for AF_UNIX socket paths (DataLoader workers share tensors there)
    if len(tmp) > core.SOCKET_SAFE_LEN:
        tmp = tempfile.mkdtemp(prefix="gpu_check.", dir="/tmp")  # removed at the end like the scratch
    os.makedirs(tmp, exist_ok=True)
    os.environ["TMPDIR"], tempfile.tempdir = tmp, None  # this process's imports (deepspeed) write there too
    core.TMP_DIR = tmp
    return tmp


# ---------------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    if args.part == "collectives":
        print(json.dumps(collectives_part()), flush=True)
        return 0
    parts = selected_parts(ap, args)
    budgets = part_budgets(ap, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    own_work = args.work is None
    work = Path(tempfile.mkdtemp(prefix="gpu_check.")) if own_work else Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    tmp_dir = children_tmp_dir(work)
    run = Run(out, work, args.toy, parts, set(args.inject_failure),
              args.budget_s or (TOY_TOTAL_S if args.toy else TOTAL_S), budgets)
    run.report["budgets_given"] = sorted({i.partition("=")[0] for i in filter(None, args.budgets.split(","))})
    run.report["children_tmp_dir"] = tmp_dir  # gpu_check.sh removes it where this process could not
    install_handlers(run)
    try:
        drive(run, parts, budgets)
    except BaseException as exc:  # the verdict line must still come
        with run.lock:  # the data thread may be writing the report
            run.report["harness_error"] = "".join(traceback.format_exception(exc))[-3000:]
        run.note(run.report["harness_error"])
        why = f"gpu_check.py was stopped ({exc})" if isinstance(exc, core.Stopped) else \
            f"gpu_check.py itself failed: {type(exc).__name__}: {exc}"
        run.undecided({CHECKS[n][0] for n in CHECKS}, why)
    finally:
        core.kill_children()  # a data preparation still running past the global budget, or after a signal
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return verdict(run)


def install_handlers(run: Run) -> None:
    """SIGTERM/SIGINT: kill every child group, then unwind to the verdict (Stopped in the main thread).
    At exit: kill what is left and, where no verdict was written, write it (all undecided checks FAIL)."""
    def on_signal(signum, _frame):
        first = not core.STOPPING.is_set()
        core.SIGNALS.append(signal.Signals(signum).name)  # into the report at its next save (no lock here)
        if first and not run.finishing:
            core.stop(f"received {signal.Signals(signum).name}")
        else:
            core.kill_children()

    def at_exit():
        core.kill_children()
        if not run.report.get("complete"):
            with run.lock:
                run.report.setdefault("harness_error", "gpu_check.py exited before its verdict")
            verdict(run)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    atexit.register(at_exit)


def verdict(run: Run) -> int:
    """Decides what is left, writes the final report, prints the verdict as the last line; the exit status."""
    run.finishing = True
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
    record_versions(run, parts)
    data: dict = {}
    data_ok = False
    prep_thread = start_data(run, budgets, data) if {"fp16", "bf16"} & set(parts) else None
    for part in parts:
        if part in ("fp16", "bf16") and prep_thread is not None:
            data_ok = join_data(run, prep_thread, data)
            prep_thread = None
        if part in ("fp16", "bf16") and not data_ok:
            run.undecided({part}, "no prepared data")
            continue
        run_part(run, part, budgets)


def record_versions(run: Run, parts: list[str]) -> None:
    """Device and library versions into the report, and the header line."""
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


def start_data(run: Run, budgets: dict, data: dict) -> threading.Thread:
    """CPU work, in the background while the collectives run; fills ``data`` with its result."""
    def prep():
        t0 = time.perf_counter()
        data.update(prepare_data(run, budgets["data"]))
        data["wall_s"] = round(time.perf_counter() - t0, 1)

    prep_thread = threading.Thread(target=prep, daemon=True)
    prep_thread.start()
    return prep_thread


def join_data(run: Run, prep_thread: threading.Thread, data: dict) -> bool:
    """Waits for the data (within the global budget) and decides ``data_prepared``."""
    prep_thread.join(max(run.left(), 0))
    prep_thread_done = not prep_thread.is_alive()
    with run.lock:
        run.report["parts"]["data"] = data
    data_ok = prep_thread_done and data.get("rc") == 0
    run.decide("data_prepared", data_ok, {"rc": data.get("rc", "still running"), "seconds": data.get("wall_s")})
    return data_ok


def run_part(run: Run, part: str, budgets: dict) -> None:
    budget = min(budgets[part], run.left())
    if part == "scale" and part == run.parts[-1] and part not in run.report["budgets_given"]:
        budget = max(budget, run.left())  # the last part: what the earlier ones left of the global budget too
    print(f"gpu_check: part {part} (budget {budget:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        if budget < 5:
            raise TimeoutError("the global budget is spent")
        info = PART_RUNNERS[part](run, budget)
    except Exception as exc:  # one part's failure must not cost the others' results
        info = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
        run.note(f"part {part} raised:\n{info['traceback']}")
    run.undecided({part}, f"part {part} ended early ({info.get('error', 'see gpu_check.log')})")
    with run.lock:
        run.report["parts"][part] = {**info, "wall_s": round(time.perf_counter() - t0, 1), "budget_s": round(budget)}
    run.save()


if __name__ == "__main__":
    sys.exit(main())
