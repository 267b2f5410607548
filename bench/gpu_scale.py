"""GPU scaling rows, breadth first over the configurations that matter, within a time budget.

Rows, in this order (then the same configurations at larger batches while the budget lasts):

(a) ``12l_zero2_ckpt`` — ``transunet_12l.yaml``'s model (R50-ViT-B/16, 12 layers, 512²), ZeRO-2, fp16,
    activation checkpointing, batch 16;
(b) ``24l_zero3_ckpt`` — ``transunet_24l.yaml``'s model at its real width (R50-ViT-L/16: hidden 1024,
    24 layers, 16 heads, MLP 4096; 325 M parameters), ZeRO-3, fp16, checkpointing, batch 16;
(c) ``12l_planner`` — the memory planner's recommendation (``hpc_seg.engine.planner.recommend``, what
    ``hpc-seg plan --gpu-mem`` prints) for the 12-layer recipe at batch 16 on this card's memory;
(d) ``12l_pytorch_fp32`` — plain PyTorch fp32 without DeepSpeed (the paper's setting), batch 16.

Each row: the project's DeepSpeed JSON (``hpc_seg.engine.ds_config.deepspeed_config``, with
``deepspeed.initial_scale_power=12``), optimizer and loss; ``hpc_seg.engine.trainer.match_buffer_dtypes``
on the engine's module after ``deepspeed.initialize``; warm-up steps until the fp16 loss scale has
settled (no skipped step, same scale, twice in a row); timed steps each synchronised, overflow-skipped
ones not timed; peak memory measured vs planned (``per_gpu_bytes``; the 12-layer profile from
``bench/results/planner_profile_transunet_512.json``, the 24-layer one measured on the CPU in a
background process while the GPU rows run); samples/s; model FLOPs utilisation (3 × forward FLOPs per
sample × samples/s ÷ peak: the datasheet's dense fp16/bf16 peak and a bf16 matmul measured here);
GPU idle fraction over a few steps from ``torch.profiler`` (1 − the union of the device's kernel and
memcpy intervals ÷ the profiled span) and, where ``pynvml`` (nvidia-ml-py) is importable,
``torch.cuda.utilization()``. Every error of a row is recorded (type and message) and the next row
runs; each engine is destroyed and freed; the JSON is rewritten atomically after every row; no row
starts once the budget is spent.

    python bench/gpu_scale.py --out gpu_scale.json --budget-s 60      # one H100/H200
    python bench/gpu_scale.py --toy --out /tmp/gs.json                 # CPU, tiny TransUNet, bf16 for fp16

On the CPU (``--toy``): tiny TransUNet at 64², batches 2 and 4, bf16 for fp16 (DeepSpeed's CPU
accelerator), a notional 16 GiB card for the planner, no peak memory or idle fraction (CUDA only).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from importlib import import_module
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from hpc_seg.utils.atomic import atomic_write_json

GIB = 1024 ** 3
PROFILE_12L = ROOT / "bench" / "results" / "planner_profile_transunet_512.json"
SPECS = {  # name: (config, engine, zero stage, activation checkpointing); planner: from recommend()
    "12l_zero2_ckpt": ("transunet_12l.yaml", "deepspeed", 2, True),
    "24l_zero3_ckpt": ("transunet_24l.yaml", "deepspeed", 3, True),
    "12l_planner": ("transunet_12l.yaml", "deepspeed", None, None),
    "12l_pytorch_fp32": ("transunet_12l.yaml", "pytorch", 0, False),
}
ROUNDS = [(16, list(SPECS)), (32, ["12l_zero2_ckpt", "24l_zero3_ckpt"]), (64, ["12l_zero2_ckpt", "24l_zero3_ckpt"])]
TOY_ROUNDS = [(2, list(SPECS)), (4, ["12l_zero2_ckpt", "24l_zero3_ckpt"])]
TOY_DEPTH = {"transunet_12l.yaml": 2, "transunet_24l.yaml": 4}
DATASHEET_TFLOPS = {"H200 NVL": 835.5, "H200": 989.4, "H100 NVL": 835.5, "H100 PCIe": 756.0, "H100": 989.4,
                    "A100": 312.0}  # dense fp16/bf16; longer names first
WARMUP_MIN, WARMUP_MAX = 2, 15
OOM_ERRORS = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


def config_for(spec_name: str, batch: int, toy: bool, planner: dict | None = None):
    from hpc_seg.config import load_config

    config, engine, stage, ckpt = SPECS[spec_name]
    if planner is not None:
        stage, ckpt = planner["zero_stage"], planner["activation_checkpointing"]
    sets = [f"data.batch_size={batch}", "deepspeed.initial_scale_power=12",
            f"deepspeed.zero_stage={stage}", f"train.activation_checkpointing={str(ckpt).lower()}"]
    if engine == "pytorch":
        sets.append("deepspeed.precision=fp32")
    elif toy:
        sets.append("deepspeed.precision=bf16")  # bf16 stands in for fp16 on the CPU
    if toy:
        sets += ["model.size=tiny", f"model.overrides={{depth: {TOY_DEPTH[config]}}}", "data.size=[64,64]"]
    return load_config(config, sets)


def io_channels(cfg) -> tuple[int, int]:
    return (cfg.data.slices if cfg.data.mode == "2.5d" else 1), 3


def build(cfg):
    from hpc_seg.models import build_model

    cin, cout = io_channels(cfg)
    model = build_model(cfg.model.name, cfg.model.size, in_channels=cin, num_classes=cout, **cfg.model.overrides)
    if cfg.train.activation_checkpointing:
        from hpc_seg.engine.activation_checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(model)
    return model


def depth_of(cfg) -> int:
    from hpc_seg.models.transunet import SIZES

    return int(cfg.model.overrides.get("depth", SIZES[cfg.model.size]["depth"]))


def forward_flops(model, cfg, dev) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    cin, _ = io_channels(cfg)
    was = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, cin, *cfg.data.size, device=dev))
    model.train(was)
    return float(fc.get_total_flops())


def buffers_match(module) -> bool:
    for m in module.modules():
        p = next(m.parameters(recurse=False), None)
        if p is not None and any(b is not None and b.is_floating_point() and b.dtype != p.dtype
                                 for b in m.buffers(recurse=False)):
            return False
    return True


def idle_fraction(step, n: int) -> float | None:
    """1 − (union of device kernel/memcpy intervals) ÷ (span of all profiled events) over ``n`` steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step()
        torch.cuda.synchronize()
    events = list(prof.events())
    dev = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    if not dev or not events:
        return None
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    busy, cur_s, cur_e = 0.0, *dev[0]
    for s, e in dev[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return max(0.0, 1.0 - busy / span) if span > 0 else None


def run_row(name: str, cfg, toy: bool, timed_steps: int) -> dict:
    """One configuration; returns the measured figures (raises on any error; the caller records it)."""
    from hpc_seg.engine.optim import build_optimizer
    from hpc_seg.losses import build_loss

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    prec = cfg.deepspeed.precision
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec, torch.float32)
    b, (h, w) = cfg.data.batch_size, cfg.data.size
    cin, cout = io_channels(cfg)
    out: dict = {}
    engine = model = opt = None
    backends = getattr(import_module("hpc_seg.engine.trainer"), "configure_backends", None)
    if backends is not None:  # the trainer's kernel choices (cuDNN autotuning, TF32)
        backends(cfg.train)
        out["backends"] = {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                           "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        model = build(cfg)
        out["params"] = sum(p.numel() for p in model.parameters())
        model = model.to(dev)
        out["forward_flops_per_sample"] = forward_flops(model, cfg, dev)
        loss_fn = build_loss(cfg.loss).to(dev)
        x = torch.randn(b, cin, h, w, device=dev).to(half)
        if cfg.train.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, cout, (b, h, w), device=dev)
        opt = build_optimizer(model, cfg.train)
        if SPECS[name][1] == "pytorch":
            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y).backward()
                opt.step()
                return False

            module = model
        else:
            import deepspeed

            from hpc_seg.engine.ds_config import deepspeed_config
            from hpc_seg.engine.trainer import match_buffer_dtypes

            engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1))
            match_buffer_dtypes(engine.module)  # the project's rule, on every device
            module = engine.module

            def step():
                before = int(getattr(engine, "skipped_steps", 0))
                engine.backward(loss_fn(engine(x), y))
                engine.step()
                return int(getattr(engine, "skipped_steps", 0)) > before
        out["buffers_match_params"] = buffers_match(module)

        def scale():
            try:
                return float(engine.optimizer.loss_scale) if engine is not None and prec == "fp16" else None
            except (AttributeError, TypeError):
                return None

        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        # warm-up: until two consecutive steps are unskipped at the same loss scale
        n, skipped, settled, last = 0, 0, 0, None
        while n < WARMUP_MAX and (n < WARMUP_MIN or settled < 2):
            sk = step()
            n += 1
            skipped += sk
            s = scale()
            settled = settled + 1 if (not sk and s == last) else (1 if not sk else 0)
            last = s
        out.update(warmup_steps=n, skipped_in_warmup=skipped, loss_scale=scale())
        times, sk_timed = [], 0
        for _ in range(timed_steps):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            sk = step()
            if cuda:
                torch.cuda.synchronize()
            if sk:
                sk_timed += 1  # an overflow-skipped step has no optimizer update: not timed
            else:
                times.append(time.perf_counter() - t0)
        out.update(timed_steps=len(times), skipped_in_timed=sk_timed, loss_scale_after=scale())
        if not times:
            raise RuntimeError(f"all {timed_steps} timed steps were overflow-skipped (loss scale {scale()})")
        out["step_s_median"] = statistics.median(times)
        out["samples_per_s"] = b * len(times) / sum(times)
        if cuda:
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
            out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
            try:
                out["gpu_idle_fraction"] = idle_fraction(step, 3)
            except Exception as exc:  # a figure lost, not the row
                out["gpu_idle_fraction"], out["idle_error"] = None, f"{type(exc).__name__}: {exc}"[:300]
            try:
                import pynvml  # noqa: F401  (nvidia-ml-py: torch.cuda.utilization needs it)

                for _ in range(3):  # NVML's figure covers its last sample period: keep the GPU busy in it
                    step()
                out["gpu_util_nvml_percent"] = torch.cuda.utilization()
            except Exception as exc:
                out["gpu_util_nvml_percent"], out["nvml_error"] = None, f"{type(exc).__name__}: {exc}"[:200]
        return out
    finally:
        if engine is not None and callable(getattr(engine, "destroy", None)):
            try:
                engine.destroy()
            except Exception:
                pass
        del engine, model, opt


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def datasheet_peak(device: str) -> float | None:
    for key, tflops in DATASHEET_TFLOPS.items():
        if key in device:
            return tflops * 1e12
    return None


def matmul_rate(n: int = 8192, reps: int = 20) -> float | None:
    """Measured bf16 matmul FLOP/s of this GPU (None on the CPU)."""
    if not torch.cuda.is_available():
        return None
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    rate = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    del a, b
    return rate


# ---------------------------------------------------------------------------- planner
def profile_main(config: str, toy: bool, out: str) -> None:
    """Background process: the planner's profile of ``config`` measured on the CPU."""
    from hpc_seg.engine.planner import profile_model

    cfg = config_for(next(k for k, v in SPECS.items() if v[0] == config), 1, toy)
    t0 = time.perf_counter()
    prof = profile_model(cfg, io=io_channels(cfg))
    atomic_write_json(out, {"config": config, "profile": prof.to_dict(), "seconds": time.perf_counter() - t0})


class Profiles:
    """Planner profiles by config: the stored 12-layer one, others measured in background processes."""

    def __init__(self, toy: bool, work: Path):
        from hpc_seg.engine.planner import Profile

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
                self.source[config] = "measured on the CPU by this run (hpc_seg.engine.planner.profile_model)"

    def get(self, config: str, wait_s: float = 0.0):
        from hpc_seg.engine.planner import Profile

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
    from hpc_seg.engine.planner import OVERHEAD_BYTES, per_gpu_bytes

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
def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_scale.json"))
    ap.add_argument("--work", default=None, help="scratch for the background planner profiles (default: OUT's "
                    "folder/gpu_scale_work, removed at the end)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="no row starts after this long")
    ap.add_argument("--profile", default=None, help=argparse.SUPPRESS)  # internal: background planner profile
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # DeepSpeed's deprecated torch.distributed calls
    if args.profile:
        profile_main(args.profile, args.toy, args.out)
        return []
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / "gpu_scale_work"
    own_work = args.work is None
    from hpc_seg.engine.distributed import init_distributed

    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if cuda else 16 * GIB
    profiles = Profiles(args.toy, work)
    peaks = {"datasheet": datasheet_peak(device), "measured_bf16_matmul": matmul_rate()}
    rounds, timed = (TOY_ROUNDS, 2) if args.toy else (ROUNDS, 8)
    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except Exception as exc:
        ds_version = f"not importable: {type(exc).__name__}: {exc}"
    doc = {"device": device, "torch": torch.__version__, "deepspeed": ds_version, "toy": args.toy,
           "gpu_memory_bytes": gpu_bytes, "gpu_memory_note": None if cuda else "notional 16 GiB card (CPU run)",
           "budget_s": args.budget_s, "peak_flops": peaks, "planner_profiles": profiles.source, "rows": [],
           "complete": False}
    rows, cfgs, oom, longest = doc["rows"], {}, set(), 0.0
    try:
        for batch, names in rounds:
            for name in names:
                row = {"name": name, "batch": batch, "config": SPECS[name][0], "engine": SPECS[name][1],
                       "key": f"{name}/b{batch}"}
                elapsed = time.time() - start
                if name in oom:
                    rows.append({**row, "status": "skipped (a smaller batch ran out of memory)"})
                    continue
                if elapsed + longest > args.budget_s:
                    rows.append({**row, "status": "skipped (budget)"})
                    continue
                t0 = time.perf_counter()
                try:
                    planner = None
                    if name == "12l_planner":
                        from hpc_seg.engine.planner import recommend

                        base = config_for(name, batch, args.toy, {"zero_stage": 0, "activation_checkpointing": False})
                        prof = profiles.get(SPECS[name][0], wait_s=max(args.budget_s - elapsed, 1))
                        if prof is None:
                            raise RuntimeError(f"no planner profile for {SPECS[name][0]}")
                        planner = recommend(prof, depth_of(base), batch, 1, base.deepspeed.precision, gpu_bytes)
                        if planner is None:
                            raise RuntimeError(f"the planner finds no setting that fits {gpu_bytes / GIB:.0f} GiB")
                        row["planner_recommendation"] = {**planner, "gpu_memory_bytes": gpu_bytes}
                    cfg = config_for(name, batch, args.toy, planner)
                    cfgs[row["key"]] = cfg
                    row.update(zero_stage=cfg.deepspeed.zero_stage if row["engine"] != "pytorch" else None,
                               activation_checkpointing=cfg.train.activation_checkpointing,
                               precision=cfg.deepspeed.precision, model=f"{cfg.model.name}/{cfg.model.size}",
                               depth=depth_of(cfg), resolution=list(cfg.data.size))
                    row.update(status="ok", **run_row(name, cfg, args.toy, timed))
                except Exception as exc:  # every error of a row is recorded; the next row runs
                    oom_error = isinstance(exc, OOM_ERRORS) or "out of memory" in str(exc).lower()
                    row.update(status="oom" if oom_error else "error", error_type=type(exc).__name__,
                               error=str(exc)[:1000])
                    if oom_error:
                        oom.add(name)
                finally:
                    free()
                row["seconds"] = round(time.perf_counter() - t0, 2)
                longest = max(longest, row["seconds"])
                rows.append(row)
                annotate(rows, cfgs, profiles, peaks)
                atomic_write_json(out, doc)
                print(json.dumps({k: v for k, v in row.items() if k != "error"} | ({"error": row["error"][:200]}
                                                                                  if "error" in row else {})),
                      flush=True)
        left = args.budget_s - (time.time() - start)
        for config in profiles.procs:  # predictions for rows measured before their profile was ready
            if profiles.get(config, wait_s=max(min(left, 60), 0.01)) is None and config not in profiles.ready:
                profiles.source[config] += " (not ready within the budget: no prediction)"
        annotate(rows, cfgs, profiles, peaks)
        doc["planner_profiles"] = profiles.source
        doc["complete"], doc["seconds"] = True, round(time.time() - start, 1)
        atomic_write_json(out, doc)
        try:
            plot(rows, out.with_suffix(".png"), device)
        except Exception as exc:  # the JSON is the result
            print(f"gpu_scale: no plot ({type(exc).__name__}: {exc})", flush=True)
    finally:
        profiles.stop()
        if own_work:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    return rows


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
