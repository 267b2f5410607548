"""DeepSpeed's accelerator is named by one rule before its first import: the CPU one where no GPU is
visible, an explicit DS_ACCELERATOR always winning; importing hpc_seg sets nothing."""

import os
import subprocess
import sys

CODE = ("import os, sys\nimport hpc_seg.distributed.env as env, hpc_seg.training.trainer\n"
        "before = os.environ.get('DS_ACCELERATOR')\n"
        "print(before, env.select_accelerator(), 'deepspeed' in sys.modules)")


def _run(extra: dict) -> list[str]:
    base = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    r = subprocess.run([sys.executable, "-c", CODE], env={**base, "CUDA_VISIBLE_DEVICES": "", **extra},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.split()


def test_no_gpu_means_the_cpu_accelerator_and_import_sets_nothing():
    assert _run({}) == ["None", "cpu", "False"]


def test_an_explicit_accelerator_wins():
    assert _run({"DS_ACCELERATOR": "cuda"}) == ["cuda", "cuda", "False"]
