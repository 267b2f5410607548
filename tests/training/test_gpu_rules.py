"""Rules the GPU path depends on, each pinned on the CPU (one rule for every device, no branch a
GPU could fall into): buffer dtypes under half precision, the CUDA device of a local rank, the
SLURM environment, kernel settings, collective timeouts, the DeepSpeed config, throughput figures."""

from __future__ import annotations

import os
import socket
import time
import warnings

import pytest
import torch
import torch.multiprocessing as mp

from hpc_seg.config import Config
from hpc_seg.config.loader import from_dict
from hpc_seg.distributed.env import cuda_index, detect_env, device_rank, expand_nodelist
from hpc_seg.distributed.ds_config import deepspeed_config
from hpc_seg.training.runtime import Throughput, buffers_match_params, configure_backends, match_buffer_dtypes
from hpc_seg.errors import HpcSegError
from hpc_seg.models import build_model
from tests.runs import records, run_train


# ---------------------------------------------------------------- buffers under half precision
def _engine(precision: str, model):
    import deepspeed

    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 0}, precision: {"enabled": True},
           "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=cfg,
                                      dist_init_required=False)
    return engine


def _bf16_worker(rank, channels_last, out):
    from hpc_seg.distributed.env import DistEnv, init_distributed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed(DistEnv(0, 1, 0, "127.0.0.1", port, "single"))
    torch.manual_seed(0)
    engine = _engine("bf16", build_model("transunet", "tiny", in_channels=1, num_classes=3))
    out["before"] = buffers_match_params(engine.module)
    held = engine.module.state_dict(keep_vars=True)  # references others may hold
    out["cast"] = match_buffer_dtypes(engine.module)
    out["same_objects"] = all(v is dict(engine.module.named_buffers())[k] for k, v in held.items()
                              if k in dict(engine.module.named_buffers()))
    norms = [m for m in engine.module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    out["after"] = buffers_match_params(engine.module)
    out["bn_dtypes"] = sorted({(str(m.running_mean.dtype), str(m.weight.dtype)) for m in norms})
    x = torch.randn(2, 1, 32, 32, dtype=torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    loss = engine(x).float().square().mean()
    engine.backward(loss)
    engine.step()
    out["finite"] = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(m.running_var.float()).all())
                                                        for m in norms)


@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_engine_buffers_follow_parameters_and_train(channels_last):
    """DeepSpeed 0.19 casts parameters to bf16 and leaves BatchNorm buffers fp32; the rule casts
    them, and a forward/backward runs in both memory layouts (in a process of its own: a group)."""
    out = mp.Manager().dict()
    mp.spawn(_bf16_worker, args=(channels_last, out), nprocs=1, join=True)
    assert out["after"] and out["finite"] and out["cast"] > 0 and out["same_objects"], dict(out)
    assert out["bn_dtypes"] == [("torch.bfloat16", "torch.bfloat16")], dict(out)


def test_fp16_rule_on_a_parameters_only_cast():
    """The cast DeepSpeed's fp16 path makes (parameters only), then the rule: every float buffer fp16.
    (This CPU's DeepSpeed refuses fp16 engines; the GPU acceptance run trains one.)"""
    model = build_model("unet_aspp", "tiny", in_channels=1, num_classes=3)
    for p in model.parameters():
        p.data = p.data.half()
    assert not buffers_match_params(model)
    match_buffer_dtypes(model)
    assert buffers_match_params(model)
    assert all(b.dtype == torch.float16 for b in model.buffers() if b.is_floating_point())


def test_generated_deepspeed_config_for_half_precision_and_overlap():
    import deepspeed.runtime.zero.config as zc

    cfg = from_dict(Config, {"deepspeed": {"precision": "fp16", "zero_stage": 3}, "data": {"batch_size": 4}})
    ds = deepspeed_config(cfg, 8)
    assert ds["fp16"]["enabled"] and "bf16" not in ds and ds["train_batch_size"] == 32
    assert "overlap_comm" not in ds["zero_optimization"]  # DeepSpeed's own default for the stage
    assert zc.DeepSpeedZeroConfig(**ds["zero_optimization"]).overlap_comm is True
    cfg2 = from_dict(Config, {"deepspeed": {"precision": "bf16", "zero_stage": 2, "overlap_comm": True}})
    ds2 = deepspeed_config(cfg2, 2)
    assert ds2["bf16"] == {"enabled": True} and "fp16" not in ds2 and ds2["zero_optimization"]["overlap_comm"] is True
    assert zc.DeepSpeedZeroConfig(**deepspeed_config(from_dict(Config, {"deepspeed": {"zero_stage": 2}}), 2)
                                  ["zero_optimization"]).overlap_comm is False


# ---------------------------------------------------------------- which GPU, which rank
def test_local_rank_to_cuda_device():
    assert cuda_index(1, 1) == 0  # --gpus-per-task: each task sees only its own GPU
    assert [cuda_index(r, 4) for r in range(4)] == [0, 1, 2, 3]  # every task sees the node's GPUs
    assert cuda_index(3, 1) == 0
    with pytest.raises(HpcSegError, match="no CUDA device is visible"):
        cuda_index(0, 0)
    with pytest.raises(HpcSegError, match="local rank 5 but only 4 GPUs visible"):
        cuda_index(5, 4)  # two ranks on one GPU: NCCL would refuse later, less clearly


def test_exported_local_rank_is_the_device_deepspeed_will_take():
    """DeepSpeed calls torch.cuda.set_device(LOCAL_RANK) itself: LOCAL_RANK must name the device."""
    assert device_rank(1, 1) == 0 and device_rank(2, 4) == 2  # GPUs visible: the CUDA index
    assert device_rank(1, 0) == 1  # none (the CPU): the local rank itself
    from tests.runs import env as train_env

    code = ("import os; from hpc_seg.distributed.env import DistEnv, init_distributed; "
            "init_distributed(DistEnv(0, 1, 1, '127.0.0.1', 0, 'slurm')); print(os.environ['LOCAL_RANK'])")
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code.replace("0, 'slurm'", f"{_port()}, 'slurm'")],
                       capture_output=True, text=True, env=train_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split()[-1] == str(device_rank(1, torch.cuda.device_count()))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_detect_env_sources():
    one = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7"})
    assert (one.rank, one.world_size, one.local_rank, one.source, one.master_addr) == (0, 1, 1, "slurm", "127.0.0.1")
    many = detect_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "40123",
                       "SLURM_JOB_NODELIST": "gpu[07-08]-ib"})
    assert (many.rank, many.world_size, many.local_rank, many.master_addr, many.master_port) == \
        (5, 8, 1, "gpu07-ib", 20000 + 40123 % 20000)
    step = detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "40123", "SLURM_STEP_ID": "1",
                       "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_STEP_NODELIST": "gpu[03-04]"})
    assert step.master_addr == "gpu03" and step.master_port != many.master_port  # the step's own rank 0
    tr = detect_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "h", "MASTER_PORT": "9",
                     "SLURM_PROCID": "0", "SLURM_NTASKS": "1"})  # torchrun (or submitit's export) wins
    assert (tr.rank, tr.local_rank, tr.source) == (3, 3, "torchrun")
    assert detect_env({}).source == "single" and detect_env({}).local_rank == 0


def test_expand_nodelist_hostlist_syntax():
    assert expand_nodelist("a[1-2]-ib") == ["a1-ib", "a2-ib"]
    assert expand_nodelist("n[1-2],gpu[01-03,07],login") == ["n1", "n2", "gpu01", "gpu02", "gpu03", "gpu07", "login"]
    assert expand_nodelist("r[1-2]n[08-09]") == ["r1n08", "r1n09", "r2n08", "r2n09"]
    assert expand_nodelist("node001") == ["node001"]


def test_inherited_rendezvous_variables_are_dropped_before_export():
    from hpc_seg.jobs.job import clear_inherited_rendezvous

    env = {"RANK": "5", "MASTER_PORT": "29500", "MASTER_ADDR": "x", "PATH": "/bin", "SLURM_JOB_ID": "3"}
    assert sorted(clear_inherited_rendezvous(env)) == ["MASTER_ADDR", "MASTER_PORT", "RANK"]
    assert env == {"PATH": "/bin", "SLURM_JOB_ID": "3"}


def test_extensions_dir_is_node_local_and_per_cpu_type(tmp_path):
    from hpc_seg.jobs.job import cpu_type, extensions_dir

    assert extensions_dir({"TORCH_EXTENSIONS_DIR": "/x"}) == "/x"
    got = extensions_dir({"SLURM_TMPDIR": str(tmp_path)})
    assert got.startswith(str(tmp_path)) and got.endswith(cpu_type()) and len(cpu_type()) == 12


# ---------------------------------------------------------------- kernels, timeouts, throughput
def test_configure_backends_rules(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_float32_matmul_precision(),
              torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    try:
        configure_backends(from_dict(Config, {}).train)
        assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
        assert not torch.are_deterministic_algorithms_enabled()
        configure_backends(from_dict(Config, {"train": {"deterministic": True, "tf32": False}}).train)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_float32_matmul_precision(before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[2], before[3]


def _late_peer(rank, port, out):
    from hpc_seg.distributed.env import DistEnv, init_distributed
    from hpc_seg.distributed import collectives as coll

    init_distributed(DistEnv(rank, 2, rank, "127.0.0.1", port, "torchrun"), timeout_s=3)
    if rank == 1:
        time.sleep(12)  # alive, but never joins the collective
        return
    t0 = time.time()
    try:
        coll.all_max(1.0)
        out["error"] = None
    except Exception as exc:  # the timeout is what is tested
        out["error"] = type(exc).__name__
    out["seconds"] = time.time() - t0


def test_a_hung_peer_ends_the_collective_after_the_timeout():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    env = dict(os.environ)
    try:
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(k, None)
        mp.spawn(_late_peer, args=(port, out), nprocs=2, join=True)
    finally:
        os.environ.clear()
        os.environ.update(env)
    assert out["error"] is not None and out["seconds"] < 11, dict(out)


def test_throughput_window_excludes_pauses():
    speed = Throughput()
    speed.add(10)
    time.sleep(0.2)  # e.g. validation
    speed.new_window()
    speed.add(10)
    time.sleep(0.05)
    f = speed.figures(world_size=2)
    assert f["samples_per_s"] > 2 * f["samples_per_s_cumulative"]
    assert 20 / 0.3 < f["samples_per_s"] < 20 / 0.04


# ---------------------------------------------------------------- a real bf16 run
def test_bf16_run_with_checkpointing_and_channels_last_logs_its_start(tmp_path, phantom_store):
    run = tmp_path / "run"
    sets = ["deepspeed.precision=bf16", "deepspeed.zero_stage=0", "train.activation_checkpointing=true",
            "train.channels_last=true", "train.max_steps=3", "data.num_workers=1"]
    env_keys = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "1"}
    old = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(env_keys)
    try:
        r = run_train(run, phantom_store, sets, nproc=1)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert r.returncode == 0, r.stderr[-3000:]
    start, = records(run, "startup")
    assert start["buffers_match_params"] and start["precision"] == "bf16" and start["channels_last"]
    assert start["buffers_cast"] > 0  # DeepSpeed 0.19 leaves BatchNorm buffers fp32: the rule did work
    assert (start["env_source"], start["local_rank"], start["device"]) == ("slurm", 1, "cpu")
    loader, = records(run, "loader_start")
    assert loader["time"] >= start["time"] and loader["workers"] == 1
    train = records(run, "train")
    assert all(isinstance(t["loss"], float) and t["samples_per_s"] > 0 and t["samples_per_s_cumulative"] > 0
               for t in train)


def test_resume_across_activation_checkpointing_switch(tmp_path, phantom_store):
    run = tmp_path / "run"
    sets = ["deepspeed.zero_stage=2", "train.max_steps=2", "checkpoint.every_steps=2"]
    r = run_train(run, phantom_store, sets, nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]
    with warnings.catch_warnings():
        r = run_train(run, phantom_store, ["deepspeed.zero_stage=2", "train.max_steps=4",
                                           "train.activation_checkpointing=true"], nproc=1, resume="latest")
    assert r.returncode == 0, r.stderr[-3000:]
    resume, = records(run, "resume")
    assert resume["step"] == 2 and records(run, "train")[-1]["step"] == 4


# ---------------------------------------------------------------- what crosses to the device
def test_loader_ships_uint8_labels_and_the_range_is_checked_on_the_cpu(phantom_store):
    from hpc_seg.config import load_config
    from hpc_seg.training.dataset import build_loader
    from hpc_seg.losses import DiceCELoss, check_target_range

    cfg = load_config(None, [f"data.store={phantom_store}", "data.size=[32,32]", "data.num_workers=0"]).data
    loader, _ = build_loader(cfg, ["lits_0000", "lits_0001"], train=True)
    batch = next(iter(loader))
    assert batch["label"].dtype == torch.uint8 and int(batch["label"].max()) <= 2
    assert loader.pin_memory == torch.cuda.is_available()  # pinned wherever a GPU copies from it
    logits = torch.randn(batch["label"].shape[0], 3, 32, 32)
    assert torch.isfinite(DiceCELoss(check_range=False)(logits, batch["label"]))  # widened inside
    with pytest.raises(ValueError, match=r"target values in \[0, 3\] outside \[0, 2\]"):
        check_target_range(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="outside"):
        DiceCELoss()(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 3))
