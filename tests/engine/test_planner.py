"""The memory planner against real measurements on the CPU: model-state bytes of the real ZeRO
shards on 2 ranks (within 5%), activation memory at two batch sizes from the profiler."""

import importlib.util
import subprocess
import sys

import pytest

from hpc_seg.config import load_config
from hpc_seg.engine.planner import measure_activations, model_state_bytes, profile_model
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


def test_plan_command_prints_tables():
    r = subprocess.run([sys.executable, "-m", "hpc_seg", "plan", "--config", "tiny_cpu.yaml", "--set",
                        "model.name=transunet", "--set", "data.size=[64,64]", "--gpu-mem", "16GB"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "largest batch per GPU" in r.stdout and "recommendation for 16GB" in r.stdout
