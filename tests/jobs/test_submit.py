"""submitit → the real local SLURM cluster: single runs, 2 nodes, a job array, preemption and
requeue, request validation, golden sbatch script."""

import json
import re
import subprocess
from pathlib import Path

import torch

from hpc_seg.jobs.grid import expand_grid, load_grid
from hpc_seg.jobs.submit import load_launch_config, sbatch_script, check_request
from tests.jobs.conftest import ROOT, SITE, records, submit, tiny_sets, wait_for

GOLDEN = ROOT / "tests" / "golden"


def normalise(text: str, folder: Path) -> str:
    text = text.replace(str(folder), "<FOLDER>")
    return re.sub(r"\S*/bin/python\S*", "<PYTHON>", text)


def test_golden_sbatch_scripts(tmp_path):
    for name, site in (("tiny_cpu_2node", SITE), ("transunet_12l", None)):
        cfg = load_launch_config(f"{name}.yaml", [], site)
        got = normalise(sbatch_script(cfg, tmp_path / "submitit"), tmp_path / "submitit")
        assert got == (GOLDEN / f"sbatch_{name}.sh").read_text(), name


def test_dry_run_and_grid_points(tmp_path, phantom_store):
    r = submit("--config", "tiny_cpu_2node.yaml", "--dry-run", "--run-root", str(tmp_path), *tiny_sets(phantom_store))
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=2" in r.stdout and "#SBATCH --signal=USR2@90" in r.stdout and "name: tiny_cpu_2node" in r.stdout
    r = submit("--config", "grids/tiny_cpu.yaml", "--dry-run", "--run-root", str(tmp_path), *tiny_sets(phantom_store))
    assert r.returncode == 0, r.stderr
    assert "4 points" in r.stdout and "name=unetpp-lr=0.003" in r.stdout
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    name, base, axes = load_grid("grids/transunet.yaml")
    assert [p for p, _ in expand_grid(axes)][-1] == "depth=12-attention=True"


def test_bad_requests_refused_before_submit(tmp_path, phantom_store, slurm_cluster):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path), "--set", "train.bogus=1")
    assert r.returncode == 2 and "train.bogus" in r.stderr
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path), "--set", "slurm.gpus_per_node=2",
               "--set", "slurm.tasks_per_node=1")
    assert r.returncode == 2 and "one task per GPU" in r.stderr
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path), "--set", "data.kind=lits",
               "--set", f"data.store={tmp_path / 'missing.zarr'}", "--set", "data.source=/nonexistent")
    assert r.returncode == 2 and "refusing to submit" in r.stderr and "/nonexistent" in r.stderr
    assert not any(tmp_path.iterdir())
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before
    cfg = load_launch_config("tiny_cpu_2node.yaml", [f"data.store={phantom_store}",
                                                     "slurm.node_local_paths=[/tmp]"], SITE)
    problems = check_request(cfg, Path("/tmp/run"))
    assert any("node-local" in p for p in problems)


def test_single_run_on_slurm(tmp_path, phantom_store, slurm_cluster):
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path), "--wait", *tiny_sets(phantom_store))
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "tiny_cpu"
    assert re.search(r"submitted tiny_cpu: job \d+ \(slurm\)", r.stdout)
    final = json.loads((run / "final.json").read_text())
    assert final["step"] == 6 and final["last_validation"]["mean_iou"] is not None
    rank = json.loads((run / "ranks" / "rank0.json").read_text())
    assert rank["slurm_job_id"] and rank["slurm_node"] in ("n1", "n2")
    st = subprocess.run([str(Path(ROOT / ".venv/bin/hpc-seg")), "status", str(run)], capture_output=True, text=True)
    assert st.returncode == 0 and "step" in st.stdout and "yes" in st.stdout


def test_two_nodes_one_task_each(tmp_path, phantom_store, slurm_cluster):
    # a submitting shell that is itself inside a distributed job: its rendezvous variables reach the
    # tasks through sbatch and must be replaced, not trusted (nor make submitit refuse)
    stale = {"RANK": "5", "WORLD_SIZE": "9", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "9", "MASTER_ADDR": "stale.invalid",
             "MASTER_PORT": "stale"}
    r = submit("--config", "tiny_cpu_2node.yaml", "--run-root", str(tmp_path), "--wait",
               *tiny_sets(phantom_store), "--set", "deepspeed.zero_stage=2", env=stale)
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "tiny_cpu_2node"
    ranks = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert {r["slurm_node"] for r in ranks} == {"n1", "n2"} and all(r["world_size"] == 2 for r in ranks)
    files = {p.name for p in (run / "checkpoints" / "step00000006").iterdir()}
    assert sum("optim_states" in f for f in files) == 2
    assert json.loads((run / "final.json").read_text())["world_size"] == 2


def test_grid_runs_as_one_job_array(tmp_path, phantom_store, slurm_cluster):
    r = submit("--config", "grids/tiny_cpu.yaml", "--run-root", str(tmp_path), "--wait", *tiny_sets(phantom_store, 3))
    assert r.returncode == 0, r.stdout + r.stderr
    ids = re.findall(r"job (\d+)_(\d+) \(slurm\)", r.stdout)
    assert len(ids) == 4 and len({a for a, _ in ids}) == 1 and sorted(int(i) for _, i in ids) == [0, 1, 2, 3]
    points = sorted(p.name for p in (tmp_path / "tiny_cpu_grid").iterdir() if (p / "final.json").is_file())
    assert points == ["name=unet_aspp-lr=0.001", "name=unet_aspp-lr=0.003", "name=unetpp-lr=0.001",
                      "name=unetpp-lr=0.003"]


def test_preemption_requeues_and_matches_uninterrupted(tmp_path, phantom_store, slurm_cluster):
    from tests.runs import final_weights, run_train

    steps = 30
    exact = tiny_sets(phantom_store, steps) + ["--set", "train.deterministic=true", "--set", "model.name=transunet",
                                               "--set", "train.warmup_steps=2"]
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path / "slurm"), *exact)
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"job (\d+) \(slurm\)", r.stdout).group(1)
    run = tmp_path / "slurm" / "tiny_cpu"
    assert wait_for(lambda: len(records(run, "train")) >= 5, timeout=300), "training did not start"
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_for(lambda: (run / "final.json").is_file(), timeout=600), "requeued job did not finish"
    stop, resume = records(run, "stop"), records(run, "resume")
    assert stop and stop[0]["reason"] == "signal"
    assert resume and resume[0]["step"] == stop[0]["step"] < steps
    restarted = json.loads((run / "ranks" / "rank0.json").read_text())
    assert restarted["slurm_restart_count"] == "1"
    # the same run without interruption, outside SLURM
    ref = run_train(tmp_path / "ref", phantom_store, [s for s in exact if s != "--set"], nproc=1)
    assert ref.returncode == 0, ref.stderr[-2000:]
    _, a = final_weights(run)
    _, b = final_weights(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_requeue_decision_rules():
    from hpc_seg.jobs.requeue import decide

    assert decide(137, 0, 3)[0] and "SIGKILL" in decide(137, 0, 3)[1]  # OOM killer, kill -9, node fault
    assert not decide(137, 3, 3)[0] and "max_requeues" in decide(137, 3, 3)[1]
    for rc in (0, 1, 2, 3):  # done / exception (CUDA OOM) / bad config / diverged: never requeued
        assert not decide(rc, 0, 3)[0]


def test_killed_rank_ends_job_fast_and_requeues(tmp_path, phantom_store, slurm_cluster):
    import os
    import signal
    import time

    r = submit("--config", "tiny_cpu_2node.yaml", "--run-root", str(tmp_path),
               *tiny_sets(phantom_store, 40), "--set", "checkpoint.every_steps=5", "--set", "deepspeed.zero_stage=2")
    assert r.returncode == 0, r.stdout + r.stderr
    run = tmp_path / "tiny_cpu_2node"
    ckpt = run / "checkpoints" / "latest"
    assert wait_for(lambda: ckpt.is_file() and len(records(run, "train")) >= 8, timeout=300), "training did not start"
    ranks = [json.loads((run / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    os.kill(ranks[1]["pid"], signal.SIGKILL)  # one rank dies mid-run (as under the OOM killer)
    t0 = time.time()

    def gone(pid):
        try:
            os.kill(pid, 0)
            return False
        except ProcessLookupError:
            return True

    assert wait_for(lambda: gone(ranks[0]["pid"]), timeout=120), "the surviving rank outlived the 2-minute bound"
    ended_s = time.time() - t0
    assert wait_for(lambda: (run / "final.json").is_file(), timeout=600), "the job was not requeued and finished"
    resume = records(run, "resume")
    assert resume and resume[0]["step"] >= 5
    restarted = json.loads((run / "ranks" / "rank0.json").read_text())
    assert restarted["slurm_restart_count"] == "1" and json.loads((run / "final.json").read_text())["step"] == 40
    assert ended_s < 120


def test_cascade_is_one_job_and_a_preempted_stage_2_requeues(tmp_path, phantom_store, slurm_cluster):
    """Both stages in one SLURM job; USR2 during stage 2 saves, hands the signal to submitit, which
    requeues; the requeued job skips the finished stage 1 and resumes stage 2."""
    sets = tiny_sets(phantom_store, 4) + ["--set", "cascade.enabled=true", "--set",
                                          "cascade.stage2={train.max_steps: 40, data.size: [32, 32]}"]
    r = submit("--config", "tiny_cpu.yaml", "--run-root", str(tmp_path), *sets)
    assert r.returncode == 0, r.stdout + r.stderr
    job = re.search(r"job (\d+) \(slurm\)", r.stdout).group(1)
    run = tmp_path / "tiny_cpu"
    assert wait_for(lambda: len(records(run / "stage2", "train")) >= 3, timeout=400), "stage 2 did not start"
    stage1_final = (run / "stage1" / "final.json").stat().st_mtime_ns
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    assert wait_for(lambda: (run / "stage2" / "final.json").is_file(), timeout=600), "requeued job did not finish"
    stop, resume = records(run / "stage2", "stop"), records(run / "stage2", "resume")
    assert stop and stop[0]["reason"] == "signal" and resume and resume[0]["step"] == stop[0]["step"] < 40
    assert json.loads((run / "stage2" / "final.json").read_text())["step"] == 40
    assert (run / "stage1" / "final.json").stat().st_mtime_ns == stage1_final  # not trained again
    assert json.loads((run / "stage2" / "ranks" / "rank0.json").read_text())["slurm_restart_count"] == "1"
