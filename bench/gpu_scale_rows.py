"""One scaling row of bench/gpu_scale.py: its configuration, model, engine and measured figures.

The driver (bench/gpu_scale.py) chooses the rows, adds the planner's predictions and writes the JSON;
what each figure means: docs/gpu-acceptance.md.
"""

from __future__ import annotations

import gc
import statistics
import time
from typing import Callable

import torch

from hpc_seg.training.runtime import configure_backends, match_buffer_dtypes

GIB = 1024 ** 3
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
    from hpc_seg.memory_plan.planner import model_channels

    return model_channels(cfg)


def build(cfg):
    from hpc_seg.models import build_model

    cin, cout = io_channels(cfg)
    model = build_model(cfg.model.name, cfg.model.size, in_channels=cin, num_classes=cout, **cfg.model.overrides)
    if cfg.train.activation_checkpointing:
        from hpc_seg.distributed.activation_checkpointing import apply_activation_checkpointing

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


def idle_fraction(step) -> dict:
    """1 − (union of the device's kernel/memcpy intervals) ÷ (wall time of one synchronised step), from
    ``torch.profiler`` with CUDA activity only: no CPU operator events, so ``prof.events()`` stays small."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - t0) * 1e6
    dev = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    out = {"gpu_idle_fraction": None, "profiled_step_s": wall_us / 1e6, "profiled_device_events": len(dev)}
    if not dev or wall_us <= 0:
        return out
    busy, cur_s, cur_e = 0.0, *dev[0]
    for s, e in dev[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    out.update(gpu_idle_fraction=min(1.0, max(0.0, 1.0 - busy / wall_us)), gpu_busy_s=busy / 1e6)
    return out


# ---------------------------------------------------------------------------- one row
def run_row(name: str, cfg, toy: bool, timed_steps: int) -> dict:
    """One configuration; returns the measured figures (raises on any error; the caller records it)."""
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    out: dict = {}
    held: dict = {}  # model, optimizer and engine, so that the finally clause frees them whatever raised
    configure_backends(cfg.train)  # the trainer's kernel choices (cuDNN autotuning, TF32)
    out["backends"] = {"cudnn_benchmark": torch.backends.cudnn.benchmark,
                       "float32_matmul_precision": torch.get_float32_matmul_precision()}
    try:
        step, module = prepared_step(name, cfg, dev, out, held)
        out["buffers_match_params"] = buffers_match(module)
        conv = [p for p in module.parameters() if p.dim() == 4]  # none once ZeRO-3 has partitioned them
        out["conv_weights_channels_last"] = all(p.is_contiguous(memory_format=torch.channels_last)
                                                for p in conv) if conv else None
        scale = loss_scale_reader(held.get("engine"), cfg.deepspeed.precision)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        out.update(warm_up(step, scale))
        out.update(timed(step, scale, timed_steps, cfg.data.batch_size, cuda))
        out.update(cuda_figures(step) if cuda else {"cuda_figures": "none: no CUDA device (peak memory, GPU idle "
                                                                    "fraction and NVML utilisation need one)"})
        return out
    finally:
        engine = held.pop("engine", None)
        if engine is not None and callable(getattr(engine, "destroy", None)):
            try:
                engine.destroy()
            except Exception:
                pass
        held.clear()
        del engine


def prepared_step(name: str, cfg, dev, out: dict, held: dict) -> tuple[Callable[[], bool], torch.nn.Module]:
    """Model, loss, one random batch and the optimizer; returns one training step (True when the step was
    overflow-skipped) and the module the buffer rule applies to."""
    from hpc_seg.training.optim import build_optimizer
    from hpc_seg.losses import build_loss

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.deepspeed.precision, torch.float32)
    b, (h, w) = cfg.data.batch_size, cfg.data.size
    cin, cout = io_channels(cfg)
    model = held["model"] = build(cfg)
    out["params"] = sum(p.numel() for p in model.parameters())
    model = held["model"] = model.to(dev)
    if cfg.train.channels_last and SPECS[name][1] == "pytorch":
        # NHWC weights too; not under DeepSpeed: deepspeed.initialize's _broadcast_model views every parameter
        # as bytes (p.data.view(torch.uint8)), which NHWC weights refuse. The trainer converts only its batch.
        model = held["model"] = model.to(memory_format=torch.channels_last)
    out["forward_flops_per_sample"] = forward_flops(model, cfg, dev)
    loss_fn = build_loss(cfg.loss).to(dev)
    x = torch.randn(b, cin, h, w, device=dev).to(half)
    if cfg.train.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, cout, (b, h, w), device=dev)
    opt = held["opt"] = build_optimizer(model, cfg.train)
    if SPECS[name][1] != "pytorch":
        return deepspeed_step(cfg, model, opt, loss_fn, x, y, held)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return False

    return step, model


def deepspeed_step(cfg, model, opt, loss_fn, x, y, held: dict) -> tuple[Callable[[], bool], torch.nn.Module]:
    import deepspeed

    from hpc_seg.distributed.ds_config import deepspeed_config

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1))
    held["engine"] = engine
    match_buffer_dtypes(engine.module)  # the project's rule, on every device

    def step():
        before = int(getattr(engine, "skipped_steps", 0))
        engine.backward(loss_fn(engine(x), y))
        engine.step()
        return int(getattr(engine, "skipped_steps", 0)) > before

    return step, engine.module


def loss_scale_reader(engine, prec: str) -> Callable[[], float | None]:
    """The engine's current fp16 loss scale (None without one)."""
    def scale():
        try:
            return float(engine.optimizer.loss_scale) if engine is not None and prec == "fp16" else None
        except (AttributeError, TypeError):
            return None

    return scale


def warm_up(step, scale) -> dict:
    """Steps until two consecutive ones are unskipped at the same loss scale (WARMUP_MIN..WARMUP_MAX)."""
    n, skipped, settled, last = 0, 0, 0, None
    while n < WARMUP_MAX and (n < WARMUP_MIN or settled < 2):
        sk = step()
        n += 1
        skipped += sk
        s = scale()
        settled = settled + 1 if (not sk and s == last) else (1 if not sk else 0)
        last = s
    return {"warmup_steps": n, "skipped_in_warmup": skipped, "loss_scale": scale()}


def timed(step, scale, timed_steps: int, batch: int, cuda: bool) -> dict:
    """Each step timed on its own, synchronised; raises when every timed step was overflow-skipped."""
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
    out = {"timed_steps": len(times), "skipped_in_timed": sk_timed, "loss_scale_after": scale()}
    if not times:
        raise RuntimeError(f"all {timed_steps} timed steps were overflow-skipped (loss scale {scale()})")
    out["step_s_median"] = statistics.median(times)
    out["samples_per_s"] = batch * len(times) / sum(times)
    return out


def cuda_figures(step) -> dict:
    """Peak memory, the profiler's idle fraction and NVML's utilisation; a lost figure does not fail the row."""
    out = {"peak_bytes": torch.cuda.max_memory_allocated(), "peak_reserved_bytes": torch.cuda.max_memory_reserved()}
    try:
        out.update(idle_fraction(step))
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
