"""GPU scaling rows, breadth first over the configurations that matter, within a time budget.

Rows, in this order (then the same configurations at larger batches while the budget lasts):

(a) ``12l_zero2_ckpt`` — ``transunet_12l.yaml``'s model (R50-ViT-B/16, 12 layers, 512²), ZeRO-2, fp16,
    activation checkpointing, batch 16;
(b) ``24l_zero3_ckpt`` — ``transunet_24l.yaml``'s model at its real width (R50-ViT-L/16: hidden 1024,
    24 layers, 16 heads, MLP 4096; 325 M parameters), ZeRO-3, fp16, checkpointing, batch 16;
(c) ``12l_planner`` — the memory planner's recommendation (``hpc_seg.memory_plan.planner.recommend``, what
    ``hpc-seg plan --gpu-mem`` prints) for the 12-layer recipe at batch 16 on this card's memory;
(d) ``12l_pytorch_fp32`` — plain PyTorch fp32 without DeepSpeed (the paper's setting), batch 16.

Each row: the project's DeepSpeed JSON (``hpc_seg.distributed.ds_config.deepspeed_config``, with
``deepspeed.initial_scale_power=12``), optimizer and loss; ``hpc_seg.training.runtime.match_buffer_dtypes``
on the engine's module after ``deepspeed.initialize``; warm-up steps until the fp16 loss scale has
settled (no skipped step, same scale, twice in a row); timed steps each synchronised, overflow-skipped
ones not timed; peak memory measured vs planned (``per_gpu_bytes``; the 12-layer profile from
``bench/results/planner_profile_transunet_512.json``, the 24-layer one measured on the CPU in a
background process while the GPU rows run); samples/s; model FLOPs utilisation (3 × forward FLOPs per
sample × samples/s ÷ peak: the datasheet's dense fp16/bf16 peak and a bf16 matmul measured here);
GPU idle fraction over one step from ``torch.profiler`` with CUDA activity only (1 − the union of the
device's kernel and memcpy intervals ÷ the step's synchronised wall time) and, where ``pynvml``
(nvidia-ml-py) is importable, ``torch.cuda.utilization()``. A row whose config sets ``train.channels_last``
(the transunet recipes do) feeds an NHWC batch, as the trainer does, and records its ``layout``; the plain
PyTorch row converts its model to channels_last too, the DeepSpeed rows cannot (``deepspeed.initialize``
views each parameter as bytes, which NHWC weights refuse); ``conv_weights_channels_last`` says which. Every error of a row is recorded (type and message) and the next row runs; each
engine is destroyed and freed; the JSON's header (device, budget, the configurations and rows planned, no
rows) is written before the first row and the JSON rewritten atomically after every row; no row starts once
the budget is spent.

The rows themselves (configuration, model, engine, timed steps, figures) are in ``bench/gpu_scale_rows.py``;
this file runs them breadth first, adds the planner's predictions, writes the JSON and the plot.

    python bench/gpu_scale.py --out gpu_scale.json --budget-s 60      # one H100/H200
    python bench/gpu_scale.py --toy --out /tmp/gs.json                 # CPU, tiny TransUNet, bf16 for fp16

On the CPU (``--toy``): tiny TransUNet at 64², batches 2 and 4, bf16 for fp16 (DeepSpeed's CPU
accelerator), a notional 16 GiB card for the planner, no peak memory or idle fraction (CUDA only: each
row says so in ``cuda_figures``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:  # gpu_scale_rows imports by name, whether this runs as a script or is loaded by path
    sys.path.append(str(BENCH))

import torch  # noqa: E402

from gpu_scale_rows import (GIB, OOM_ERRORS, ROUNDS, SPECS, TOY_ROUNDS, config_for, datasheet_peak,  # noqa: E402
                            depth_of, free, io_channels, matmul_rate, run_row)
from gpu_scale_rows import build  # noqa: E402,F401  (the tests build a row's model through this module)
from hpc_seg.storage.atomic import atomic_write_json  # noqa: E402

PROFILE_12L = ROOT / "bench" / "results" / "planner_profile_transunet_512.json"


# ---------------------------------------------------------------------------- planner
def profile_main(config: str, toy: bool, out: str) -> None:
    """Background process: the planner's profile of ``config`` measured on the CPU."""
    from hpc_seg.memory_plan.planner import profile_model

    cfg = config_for(next(k for k, v in SPECS.items() if v[0] == config), 1, toy)
    t0 = time.perf_counter()
    prof = profile_model(cfg, io=io_channels(cfg))
    atomic_write_json(out, {"config": config, "profile": prof.to_dict(), "seconds": time.perf_counter() - t0})


class Profiles:
    """Planner profiles by config: the stored 12-layer one, others measured in background processes."""

    def __init__(self, toy: bool, work: Path):
        from hpc_seg.memory_plan.planner import Profile

        self.toy, self.work, self.ready, self.procs, self.source = toy, work, {}, {}, {}
        work.mkdir(parents=True, exist_ok=True)
        if not toy and PROFILE_12L.is_file():
            self.ready["transunet_12l.yaml"] = Profile.from_dict(json.loads(PROFILE_12L.read_text())["profile"])
            self.source["transunet_12l.yaml"] = str(PROFILE_12L.relative_to(ROOT))
        threads = str(max(1, (os.cpu_count() or 2) // 2))
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads,
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        for config in dict.fromkeys(v[0] for v in SPECS.values()):
            if config not in self.ready:
                path = work / f"profile_{config.replace('.yaml', '')}.json"
                cmd = [sys.executable, __file__, "--profile", config, "--out", str(path)] + (["--toy"] if toy else [])
                log = open(path.with_suffix(".log"), "w")
                self.procs[config] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), path)
                self.source[config] = "measured on the CPU by this run (hpc_seg.memory_plan.planner.profile_model)"

    def get(self, config: str, wait_s: float = 0.0):
        from hpc_seg.memory_plan.planner import Profile

        if config in self.ready:
            return self.ready[config]
        if config not in self.procs:
            return None
        p, path = self.procs[config]
        try:
            p.wait(timeout=max(wait_s, 0.01))
        except subprocess.TimeoutExpired:
            return None
        if p.returncode == 0 and path.is_file():
            self.ready[config] = Profile.from_dict(json.loads(path.read_text())["profile"])
        else:
            self.source[config] = f"profile process failed (rc {p.returncode}; see {path.with_suffix('.log')})"
            self.ready[config] = None
        return self.ready[config]

    def stop(self) -> None:
        for p, _ in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


def predicted(prof, cfg, engine: str) -> dict:
    from hpc_seg.memory_plan.planner import OVERHEAD_BYTES, per_gpu_bytes

    prec = "fp32" if engine == "pytorch" else cfg.deepspeed.precision
    m = per_gpu_bytes(prof, depth_of(cfg), cfg.data.batch_size, cfg.deepspeed.zero_stage if engine != "pytorch" else 0,
                      1, prec, cfg.train.activation_checkpointing)
    return {"predicted_bytes": m["total"] - OVERHEAD_BYTES, "predicted_total_bytes": m["total"],
            "predicted_activation_bytes": m["activations"]}


def annotate(rows: list[dict], cfgs: dict, profiles: Profiles, peaks: dict) -> None:
    for row in rows:
        if row["status"] != "ok":
            continue
        cfg = cfgs[row["key"]]
        if "predicted_bytes" not in row:
            prof = profiles.get(row["config"])
            if prof is not None:
                row.update(predicted(prof, cfg, row["engine"]))
                if row.get("peak_bytes"):
                    row["ratio_measured_vs_predicted"] = row["peak_bytes"] / row["predicted_bytes"]
        row["train_flops_per_sample"] = 3 * row["forward_flops_per_sample"]
        for pname, peak in peaks.items():
            if peak:
                row[f"mfu_vs_{pname}"] = row["train_flops_per_sample"] * row["samples_per_s"] / peak


# ---------------------------------------------------------------------------- driver
class Sweep:
    """What the rows share: the arguments, the document being written, profiles, peaks, the card's memory.
    A plain class: a dataclass needs its module in sys.modules, which loading this file by path skips."""

    def __init__(self, args: argparse.Namespace, out: Path, doc: dict, profiles: Profiles, peaks: dict,
                 gpu_bytes: int, start: float):
        self.args, self.out, self.doc, self.profiles, self.peaks = args, out, doc, profiles, peaks
        self.gpu_bytes, self.start = gpu_bytes, start
        self.cfgs: dict = {}
        self.oom: set[str] = set()
        self.longest = 0.0


def parse(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_scale.json"))
    ap.add_argument("--work", default=None, help="scratch for the background planner profiles (default: OUT's "
                    "folder/gpu_scale_work, removed at the end)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no row starts after this long")
    ap.add_argument("--profile", default=None, help=argparse.SUPPRESS)  # internal: background planner profile
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch.distributed calls
    if args.profile:
        profile_main(args.profile, args.toy, args.out)
        return []
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "gpu_scale_work"
    own_work = args.work is None
    from hpc_seg.distributed.env import init_distributed

    init_distributed()
    sw = new_sweep(args, out, work, start)  # writes the header
    rounds, timed = (TOY_ROUNDS, 2) if args.toy else (ROUNDS, 8)
    try:
        sweep(sw, rounds, timed)
        finish(sw)
    finally:
        sw.profiles.stop()
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return sw.doc["rows"]


def new_sweep(args, out: Path, work: Path, start: float) -> Sweep:
    """Opens the document and writes its header (no rows yet), then starts the background profiles and
    measures the matmul peak."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 16 * GIB
    peaks = {"datasheet": datasheet_peak(device), "measured_bf16_matmul": None}
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as exc:
        ds_version = f"not importable: {type(exc).__name__}: {exc}"
    rounds = TOY_ROUNDS if args.toy else ROUNDS
    doc = {"device": device, "torch": torch.__version__, "deepspeed": ds_version, "toy": args.toy,
           "gpu_memory_bytes": gpu_bytes, "gpu_memory_note": None if cuda else "notional 16 GiB card (CPU run)",
           "budget_s": args.budget_s, "configs": {n: dict(zip(("config", "engine", "zero_stage",
                                                                "activation_checkpointing"), v))
                                                   for n, v in SPECS.items()},
           "rows_planned": [f"{n}/b{b}" for b, names in rounds for n in names], "peak_flops": peaks,
           "planner_profiles": {}, "rows": [], "complete": False}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)  # a run killed before its first row still says what it was to measure
    profiles = Profiles(args.toy, work)
    doc["planner_profiles"] = profiles.source
    peaks["measured_bf16_matmul"] = matmul_rate()
    return Sweep(args, out, doc, profiles, peaks, gpu_bytes, start)


def sweep(sw: Sweep, rounds: list, timed: int) -> None:
    """Breadth first over the rounds; the JSON is rewritten after every row."""
    rows = sw.doc["rows"]
    for batch, names in rounds:
        for name in names:
            row = {"name": name, "batch": batch, "config": SPECS[name][0], "engine": SPECS[name][1],
                   "key": f"{name}/b{batch}"}
            elapsed = time.time() - sw.start
            if name in sw.oom:
                rows.append({**row, "status": "skipped (a smaller batch ran out of memory)"})
                continue
            if elapsed + sw.longest > sw.args.budget_s:
                rows.append({**row, "status": "skipped (budget)"})
                continue
            measure(sw, row, elapsed, timed)
            sw.longest = max(sw.longest, row["seconds"])
            rows.append(row)
            annotate(rows, sw.cfgs, sw.profiles, sw.peaks)
            atomic_write_json(sw.out, sw.doc)
            print(json.dumps({k: v for k, v in row.items() if k != "error"} | ({"error": row["error"][:200]}
                                                                              if "error" in row else {})),
                  flush=True)


def measure(sw: Sweep, row: dict, elapsed: float, timed: int) -> None:
    """One row into ``row``: its settings and figures, or its error (the next row runs either way)."""
    name, batch = row["name"], row["batch"]
    t0 = time.perf_counter()
    try:
        planner = planner_choice(sw, row, elapsed) if name == "12l_planner" else None
        cfg = config_for(name, batch, sw.args.toy, planner)
        sw.cfgs[row["key"]] = cfg
        row.update(zero_stage=cfg.deepspeed.zero_stage if row["engine"] != "pytorch" else None,
                   activation_checkpointing=cfg.train.activation_checkpointing,
                   precision=cfg.deepspeed.precision, model=f"{cfg.model.name}/{cfg.model.size}",
                   depth=depth_of(cfg), resolution=list(cfg.data.size),
                   layout="channels_last" if cfg.train.channels_last else "nchw")
        row.update(status="ok", **run_row(name, cfg, sw.args.toy, timed))
    except Exception as exc:  # every error of a row is recorded; the next row runs
        oom_error = isinstance(exc, OOM_ERRORS) or "out of memory" in str(exc).lower()
        row.update(status="oom" if oom_error else "error", error_type=type(exc).__name__,
                   error=str(exc)[:1000])
        if oom_error:
            sw.oom.add(name)
    finally:
        free()
    row["seconds"] = round(time.perf_counter() - t0, 2)


def planner_choice(sw: Sweep, row: dict, elapsed: float) -> dict:
    """The planner's recommendation for the row's batch on this card (waits for its profile within the budget)."""
    from hpc_seg.memory_plan.planner import recommend

    name, batch = row["name"], row["batch"]
    base = config_for(name, batch, sw.args.toy, {"zero_stage": 0, "activation_checkpointing": False})
    prof = sw.profiles.get(SPECS[name][0], wait_s=max(sw.args.budget_s - elapsed, 1))
    if prof is None:
        raise RuntimeError(f"no planner profile for {SPECS[name][0]}")
    planner = recommend(prof, depth_of(base), batch, 1, base.deepspeed.precision, sw.gpu_bytes)
    if planner is None:
        raise RuntimeError(f"the planner finds no setting that fits {sw.gpu_bytes / GIB:.0f} GiB")
    row["planner_recommendation"] = {**planner, "gpu_memory_bytes": sw.gpu_bytes}
    return planner


def finish(sw: Sweep) -> None:
    """Predictions for rows measured before their profile was ready, the final JSON, the plot."""
    rows = sw.doc["rows"]
    left = sw.args.budget_s - (time.time() - sw.start)
    for config in sw.profiles.procs:
        if sw.profiles.get(config, wait_s=max(min(left, 60), 0.01)) is None and config not in sw.profiles.ready:
            sw.profiles.source[config] += " (not ready within the budget: no prediction)"
    annotate(rows, sw.cfgs, sw.profiles, sw.peaks)
    sw.doc["planner_profiles"] = sw.profiles.source
    sw.doc["complete"], sw.doc["seconds"] = True, round(time.time() - sw.start, 1)
    atomic_write_json(sw.out, sw.doc)
    try:
        plot(rows, sw.out.with_suffix(".png"), sw.doc["device"])
    except Exception as exc:  # the JSON is the result
        print(f"gpu_scale: no plot ({type(exc).__name__}: {exc})", flush=True)


def plot(rows, path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return
    labels = [f"{r['name'].replace('_', ' ')} b{r['batch']}" for r in ok]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok)), 3.8))
    a1.bar(labels, [r["samples_per_s"] for r in ok], color="tab:blue")
    a1.set(ylabel="samples/s", title=f"throughput ({device})")
    xs = range(len(ok))
    a2.bar([x - 0.2 for x in xs], [(r.get("peak_bytes") or 0) / GIB for r in ok], 0.4, label="measured peak")
    a2.bar([x + 0.2 for x in xs], [(r.get("predicted_bytes") or 0) / GIB for r in ok], 0.4, label="planner")
    a2.set_xticks(list(xs), labels)
    a2.set(ylabel="GiB", title="peak memory: measured vs planned")
    a2.legend(fontsize=7)
    for ax in (a1, a2):
        ax.tick_params(axis="x", labelsize=7, labelrotation=30)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
