"""The memory planner against real measurements on the CPU: model-state bytes of the real ZeRO
shards on 2 ranks (within 5%), activation memory at two batch sizes from the profiler."""

import importlib.util

import pytest

from hpc_seg.config import load_config
from hpc_seg.memory_plan.planner import measure_activations, model_state_bytes, profile_model
from tests.conftest import ROOT


def _bench_engine():
    spec = importlib.util.spec_from_file_location("bench_engine", ROOT / "bench" / "engine.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_model_states_match_real_zero_shards_on_two_ranks():
    measured = _bench_engine().model_states(2)  # torchrun, 2 CPU ranks, bf16 Adam, one step
    for stage in range(4):
        m = measured[f"zero{stage}"]
        psi = m["per_rank"][0]["psi"]
        predicted = model_state_bytes(psi, stage, 2, "bf16")["total"]
        worst = max(r["total"] for r in m["per_rank"])
        assert abs(worst / predicted - 1) < 0.05, (stage, worst, predicted)


@pytest.mark.parametrize("ckpt", [False, True])
def test_activation_prediction_vs_measured_peak(ckpt):
    cfg = load_config(None, ["model.name=transunet", "model.size=tiny", "data.size=[64,64]",
                             "model.overrides={depth: 3}"])
    prof = profile_model(cfg)  # measured at batches 1, 2 and depths 1, 2; checked at depth 3
    for batch in (4, 8):
        predicted = prof.activations(3, batch, ckpt, "fp32")
        measured = measure_activations("transunet", "tiny", 3, 3, (64, 64),
                                       {"depth": 3}, ckpt, batch=batch)
        assert abs(predicted / measured - 1) < 0.10, (batch, predicted, measured)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_plan_command_prints_the_planners_figures(tmp_path, capsys):
    """Every figure ``hpc-seg plan`` prints equals what the planner's functions return for the same
    config: the per-GPU memory table (GiB, 2 decimals), the largest-batch table and the
    recommendation. The input (TransUNet R50-ViT-B/16, 128², fp16 batch 16, 4 GPUs) makes the
    figures discriminate: ZeRO stages differ, the 16 GB batches are below the search's cap of 1024
    and differ between ZeRO-3 + checkpointing and ZeRO-2, and the memory asked for lies between the
    ZeRO-3 and ZeRO-1 needs, so the recommendation is ZeRO-3 rather than the first row."""
    import re

    from hpc_seg.cli import main
    from hpc_seg.memory_plan.planner import model_channels
    from hpc_seg.memory_plan.planner import (GIB, GPU_SIZES_GB, largest_batch, parse_mem, per_gpu_bytes,
                                        recommend)

    sets = ["data.size=[128,128]", f"data.store={tmp_path / 'absent.zarr'}"]  # no store: channels from the kind
    cfg = load_config("transunet_12l.yaml", sets)
    world, prec, batch = 4, cfg.deepspeed.precision, cfg.data.batch_size
    prof = profile_model(cfg, model_channels(cfg))
    depth = prof.depth
    need = {st: per_gpu_bytes(prof, depth, batch, st, world, prec, False)["total"] for st in (1, 3)}
    gpu_mem = f"{(need[1] + need[3]) / 2 / GIB:.6f}GB"
    rec = recommend(prof, depth, batch, world, prec, parse_mem(gpu_mem))
    assert rec is not None and rec["zero_stage"] == 3 and not rec["activation_checkpointing"], rec

    argv = ["plan", "--config", "transunet_12l.yaml", "--gpus", str(world), "--gpu-mem", gpu_mem]
    for x in sets:
        argv += ["--set", x]
    assert main(argv) == 0
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    lines = out.splitlines()

    assert f"depth {depth}," in out and f"Ψ={prof.params(depth) / 1e6:.1f} M" in out
    assert f"batch {batch}/GPU at 128×128, {prec}, {world} GPUs" in out

    # table 1: one row per (checkpointing, ZeRO stage, offload), in the planner's order
    rows = [_cells(ln) for ln in lines if ln.startswith("│") and _cells(ln)[1] in ("on", "off")]
    expected = [(ck, st, off) for ck in (False, True)
                for st, off in ((0, False), (1, False), (2, False), (3, False), (2, True), (3, True))]
    assert len(rows) == len(expected), out
    totals = set()
    for cells, (ck, st, off) in zip(rows, expected):
        m = per_gpu_bytes(prof, depth, batch, st, world, prec, ck, off)
        assert cells[:3] == [str(st), "on" if ck else "off", "optimizer" if off else "-"], cells
        for cell, key in zip(cells[3:8], ("params", "grads", "optimizer", "activations", "total")):
            assert abs(float(cell) - m[key] / GIB) <= 0.005 + 1e-9, (cells, key, m[key] / GIB)
        assert cells[8:] == ["yes" if m["total"] <= s * GIB else "no" for s in GPU_SIZES_GB], cells
        totals.add(cells[7])
    assert len(totals) >= 4, totals  # the stages are told apart

    # table 2: largest batch per GPU, depths 6 / 12 / 24, "ZeRO-3 + ckpt / ZeRO-2" per GPU size
    fits = [_cells(ln) for ln in lines if ln.startswith("│") and _cells(ln)[0] in ("6", "12", "24")]
    assert [c[0] for c in fits] == ["6", "12", "24"], out
    for cells in fits:
        d = int(cells[0])
        assert cells[1] == f"{prof.params(d) / 1e6:.1f}", cells
        for cell, s in zip(cells[2:], GPU_SIZES_GB):
            hi = largest_batch(prof, d, s * GIB, stage=3, world=world, precision=prec, checkpointing=True)
            lo = largest_batch(prof, d, s * GIB, stage=2, world=world, precision=prec, checkpointing=False)
            assert cell == f"{hi} / {lo}", (d, s, cell, hi, lo)
            if s == 16:
                assert 0 < lo < hi < 1024, (d, hi, lo)

    m = re.search(r"recommendation for (\S+) per GPU: ZeRO-(\d), activation checkpointing (on|off) "
                  r"\(([\d.]+) GiB\)", out)
    assert m, out
    assert m.group(1) == gpu_mem and int(m.group(2)) == rec["zero_stage"]
    assert (m.group(3) == "on") == rec["activation_checkpointing"]
    assert m.group(4) == f"{rec['bytes'] / GIB:.1f}"
