"""MLflow tracking of real training runs: a sqlite store read back with MlflowClient (params,
metric history, final metrics, one run across a resume), a real `mlflow server` over HTTP, a
tracking server that is down, and a grid point's experiment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest
import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.loader import from_dict
from hpc_seg.training.tracking import RUN_FILE, TRUNCATED, flatten_params
from tests.runs import BIN, ROOT, command, env, records

TINY = ["train.val_every_steps=0", "checkpoint.every_steps=0"]
LONG = "x" * 7000  # over MLflow's 6000-character limit of a param value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The training environment without the developer's MLflow settings, plus ``extra``."""
    base = {k: v for k, v in env().items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME")}
    return {**base, **extra}


def train(run_dir, store, sets, nproc=1, resume=None, timeout=300, **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, store, TINY + sets, nproc, resume), cwd=ROOT, env=clean_env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def client(uri: str):
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # this process reads the stores back with mlflow
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def only_run(c, experiment: str):
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}; experiments: " \
                            f"{[e.name for e in c.search_experiments()]}"
    runs = c.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs in {experiment!r}, expected one"
    return c.get_run(runs[0].info.run_id)


def steps(c, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def test_sqlite_store_gets_config_metrics_final_and_one_run_across_resume(tmp_path, store):
    uri, run = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "run"
    down = f"http://127.0.0.1:{free_port()}"  # the environment's URI; the config key must win over it
    sets = ["tracking.mlflow=true", f"tracking.uri={uri}", f"slurm.setup=[{LONG}]"]
    first = train(run, store, sets + ["train.max_steps=3"], nproc=2, MLFLOW_TRACKING_URI=down)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "warning: MLflow" not in first.stderr, first.stderr[-3000:]
    c = client(uri)
    r = only_run(c, "tiny_cpu")  # a single run: experiment and run name are the config's name
    run_id = r.info.run_id
    assert r.info.run_name == "tiny_cpu" and r.info.status == "FINISHED"
    assert json.loads((run / RUN_FILE).read_text())["run_id"] == run_id
    saved = from_dict(Config, yaml.safe_load((run / "config.yaml").read_text()))
    params = r.data.params
    assert set(params) == set(flatten_params(to_dict(saved))) and len(params) >= 90
    assert params["train.lr"] == "0.003" and params["train.max_steps"] == "3" and params["data.size"] == "[32, 32]"
    assert params["model.name"] == "unet_aspp" and params["tracking.mlflow"] == "true"
    assert len(params["slurm.setup"]) == 6000 and params["slurm.setup"].endswith(TRUNCATED)
    # two ranks, one writer: each step once, with rank 0's value from metrics.jsonl
    history = {m.step: m.value for m in c.get_metric_history(run_id, "train/loss")}
    assert sorted(history) == [1, 2, 3] and len(c.get_metric_history(run_id, "train/loss")) == 3
    assert history == pytest.approx({rec["step"]: rec["loss"] for rec in records(run, "train")})
    assert steps(c, run_id, "train/lr") == [1, 2, 3] and steps(c, run_id, "val/mean_iou") == [3]
    final = json.loads((run / "final.json").read_text())
    assert r.data.metrics["final/step"] == 3
    assert r.data.metrics["final/mean_iou"] == pytest.approx(final["last_validation"]["mean_iou"])
    assert r.data.metrics["final/best_mean_iou"] == pytest.approx(final["best"][0])

    second = train(run, store, sets + ["train.max_steps=5"], resume="latest")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    r = only_run(c, "tiny_cpu")
    assert r.info.run_id == run_id and r.info.status == "FINISHED"
    assert steps(c, run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert steps(c, run_id, "final/step") == [3, 5] and r.data.metrics["final/step"] == 5
    assert r.data.params["train.max_steps"] == "3"  # MLflow params are immutable: the change is a tag
    assert r.data.tags["config_change.train.max_steps"] == "3 -> 5"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend, artifacts in tmp), stopped at the end."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,  # one group to stop
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.time() < deadline, "no answer: " + (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def test_real_mlflow_server_over_http(tmp_path, store, mlflow_server):
    run = tmp_path / "run"
    # the URI and the experiment from MLflow's own environment variables (no config key set)
    r = train(run, store, ["tracking.mlflow=true", "train.max_steps=2"],
              MLFLOW_TRACKING_URI=mlflow_server, MLFLOW_EXPERIMENT_NAME="from-env")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warning: MLflow" not in r.stderr, r.stderr[-3000:]
    c = client(mlflow_server)
    got = only_run(c, "from-env")
    assert got.info.run_name == "tiny_cpu" and got.info.status == "FINISHED"
    assert got.data.params["train.max_steps"] == "2" and got.data.params["data.batch_size"] == "2"
    assert steps(c, got.info.run_id, "train/loss") == [1, 2] and steps(c, got.info.run_id, "val/mean_iou") == [2]
    assert got.data.metrics["final/step"] == 2
    assert json.loads((run / RUN_FILE).read_text())["tracking_uri"] == mlflow_server


def test_tracking_server_down_never_stops_training(tmp_path, store):
    run, url = tmp_path / "run", f"http://127.0.0.1:{free_port()}"  # nothing listens there
    t0 = time.monotonic()
    r = train(run, store, ["tracking.mlflow=true", f"tracking.uri={url}", "tracking.retry_s=0.5",
                           "train.max_steps=4"])
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "final.json").read_text())["step"] == 4
    assert [rec["step"] for rec in records(run, "train")] == [1, 2, 3, 4]
    warnings = [line for line in r.stderr.splitlines() if "warning: MLflow tracking" in line]
    assert len(warnings) == 1 and url in warnings[0], r.stderr[-3000:]  # once, however often it retries
    assert "were not sent" in r.stderr and not (run / RUN_FILE).exists()
    assert elapsed < 90, f"a down tracking server held training for {elapsed:.0f} s"  # MLflow's own retries: minutes


def test_grid_point_logs_into_the_grids_experiment(tmp_path, store):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"grid": {"name": "trk_grid", "base": str(ROOT / "configs" / "tiny_cpu.yaml"),
                                             "axes": {"train.lr": [0.002]}}}))
    sets = [f"data.store={store}", "data.size=[32,32]", "data.batch_size=2", "data.num_workers=0",
            "train.max_steps=2", "train.val_max_cases=1", "train.log_every_steps=1", *TINY,
            "tracking.mlflow=true", f"tracking.uri={uri}"]
    cmd = [str(BIN / "hpc-seg"), "submit", "--config", str(grid), "--local", "--wait",
           "--run-root", str(tmp_path / "runs"),
           "--site", str(ROOT / "slurm" / "site.local.yaml")]  # one CPU task (the shipped profile asks for 4 GPUs)
    r = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], cwd=ROOT, env=clean_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "trk_grid" / "lr=0.002"
    assert (run / "final.json").is_file()
    c = client(uri)
    got = only_run(c, "trk_grid")  # the grid is the experiment, not the point's config name
    assert got.info.run_name == "lr=0.002" and got.data.tags["hpc_seg.grid"] == "trk_grid"
    assert got.data.params["train.lr"] == "0.002" and got.data.params["name"] == "trk_grid-lr=0.002"
    assert c.get_experiment_by_name("trk_grid-lr=0.002") is None
    assert json.loads((run / RUN_FILE).read_text())["run_id"] == got.info.run_id
