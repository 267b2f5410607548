"""MLflow tracking of real training runs: a sqlite store read back with MlflowClient (params,
metric history, final metrics, one run across a resume), a real `mlflow server` over HTTP (also
behind a proxy that asks for a password), a tracking server that is down or never answers, an
mlflow that fails to import, and a grid point's experiment; the sending thread and the URI rules
on their own."""

from __future__ import annotations

import base64
import http.server
import importlib.abc
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from hpc_seg.config import Config, to_dict
from hpc_seg.config.loader import from_dict
from hpc_seg.training.tracking import RUN_FILE, TRUNCATED, Tracker, flatten_params
from hpc_seg.training.tracking_sender import Sender
from hpc_seg.training.tracking_uri import (PASSWORD_VAR, USER_VAR, absolute_store, connection_uri, job_uri,
                                           public_config, public_uri, scrub)
from tests.runs import BIN, ROOT, command, env, records

TINY = ["train.val_every_steps=0", "checkpoint.every_steps=0"]
LONG = "x" * 7000  # over MLflow's 6000-character limit of a param value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The training environment without the developer's MLflow settings, plus ``extra``."""
    mine = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", USER_VAR, PASSWORD_VAR)
    base = {k: v for k, v in env().items() if k not in mine}
    return {**base, **extra}


def train(run_dir, store, sets, nproc=1, resume=None, timeout=300, config="tiny_cpu.yaml", cwd=ROOT,
          **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, store, TINY + sets, nproc, resume, config), cwd=cwd,
                          env=clean_env(**extra_env), capture_output=True, text=True, timeout=timeout)


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
    assert f"MLflow run: {mlflow_server}/#/experiments/{got.info.experiment_id}/runs/{got.info.run_id}" in r.stdout


def test_tracking_server_down_never_stops_training(tmp_path, store):
    port = free_port()  # nothing listens there
    run, url, shown = tmp_path / "run", f"http://alice:s3cret@127.0.0.1:{port}", f"http://***@127.0.0.1:{port}"
    t0 = time.monotonic()
    r = train(run, store, ["tracking.mlflow=true", f"tracking.uri={url}", "tracking.retry_s=0.5",
                           "train.max_steps=4"])
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert json.loads((run / "final.json").read_text())["step"] == 4
    assert [rec["step"] for rec in records(run, "train")] == [1, 2, 3, 4]
    warnings = [line for line in r.stderr.splitlines() if "warning: MLflow tracking" in line]
    assert len(warnings) == 1 and shown in warnings[0], r.stderr[-3000:]  # once, however often it retries
    assert "s3cret" not in r.stderr + r.stdout  # MLflow names the URL, credentials and all, in its errors
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
    assert "several grid points" not in r.stderr  # one point: no warning about a shared sqlite file
    run = tmp_path / "runs" / "trk_grid" / "lr=0.002"
    assert (run / "final.json").is_file()
    c = client(uri)
    got = only_run(c, "trk_grid")  # the grid is the experiment, not the point's config name
    assert got.info.run_name == "lr=0.002" and got.data.tags["hpc_seg.grid"] == "trk_grid"
    assert got.data.params["train.lr"] == "0.002" and got.data.params["name"] == "trk_grid-lr=0.002"
    assert c.get_experiment_by_name("trk_grid-lr=0.002") is None
    assert json.loads((run / RUN_FILE).read_text())["run_id"] == got.info.run_id


def grid_sets(store, *sets: str) -> list[str]:
    base = [f"data.store={store}", "data.size=[32,32]", "data.batch_size=2", "data.num_workers=0",
            "train.max_steps=2", "train.val_max_cases=1", "train.log_every_steps=1", *TINY, "tracking.mlflow=true"]
    return [a for s in base + list(sets) for a in ("--set", s)]


def submit(config, run_root, args, cwd=ROOT, **extra_env) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "hpc-seg"), "submit", "--config", str(config), "--run-root", str(run_root),
           "--site", str(ROOT / "slurm" / "site.local.yaml"), *args]
    return subprocess.run(cmd, cwd=cwd, env=clean_env(**extra_env), capture_output=True, text=True, timeout=300)


def files_holding(root, secret: bytes) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


# ---------------------------------------------------------------------------------- credentials in the URI
def test_uris_are_shown_without_user_and_password():
    assert public_uri("https://alice:s3cret@host:8443/p") == "https://***@host:8443/p"
    assert public_uri("http://host:5000") == "http://host:5000" and public_uri(None) is None
    assert scrub("API request to https://alice:s3cret@host/api/2.0 failed") == \
        "API request to https://***@host/api/2.0 failed"
    tree = {"name": "x", "tracking": {"mlflow": True, "uri": "https://alice:s3cret@host"}}
    assert public_config(tree)["tracking"]["uri"] == "https://***@host"
    assert tree["tracking"]["uri"] == "https://alice:s3cret@host"  # the real one stays for the connection
    # a masked URI (a config.yaml read back) connects with MLflow's credential variables
    creds = {USER_VAR: "alice", PASSWORD_VAR: "p@ss"}
    assert connection_uri("https://***@host", creds) == ("https://host", None)  # MLflow sends them itself
    assert connection_uri("postgresql://***@db/mlflow", creds) == ("postgresql://alice:p%40ss@db/mlflow", None)
    uri, problem = connection_uri("https://***@host", {})
    assert uri == "https://host" and USER_VAR in problem and PASSWORD_VAR in problem
    assert connection_uri("https://alice:s3cret@host", {}) == ("https://alice:s3cret@host", None)
    # a submitted job carries the masked URI; the credentials travel in its environment
    environ = {}
    assert job_uri("https://alice:s3cret@host", environ) == "https://***@host"
    assert environ == {USER_VAR: "alice", PASSWORD_VAR: "s3cret"}
    assert job_uri("http://host", environ) == "http://host"


def test_relative_sqlite_path_becomes_absolute(tmp_path):
    assert absolute_store("sqlite:///runs/mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/runs/mlflow.db"
    assert absolute_store("sqlite:///runs/m.db?timeout=5", "/a") == "sqlite:////a/runs/m.db?timeout=5"
    for unchanged in ("sqlite:////abs/mlflow.db", "sqlite://", "sqlite:///:memory:", "http://host", None):
        assert absolute_store(unchanged, tmp_path) == unchanged
    assert job_uri(None, {"MLFLOW_TRACKING_URI": "sqlite:///m.db"}) == f"sqlite:///{os.getcwd()}/m.db"


@pytest.fixture
def auth_proxy(mlflow_server):
    """127.0.0.1:PORT in front of the mlflow server, answering 401 without Basic alice:s3cret;
    yields ("127.0.0.1:PORT", {"ok": n, "refused": n})."""
    expected, seen = "Basic " + base64.b64encode(b"alice:s3cret").decode(), {"ok": 0, "refused": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        def forward(self):
            if self.headers.get("Authorization") != expected:
                seen["refused"] += 1
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            seen["ok"] += 1
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
            req = urllib.request.Request(mlflow_server + self.path, data=body, method=self.command,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    status, data = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, data = exc.code, exc.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = forward

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_credentials_in_the_uri_never_reach_the_run_directory_or_logs(tmp_path, store, mlflow_server, auth_proxy):
    host, seen = auth_proxy
    run = tmp_path / "run"
    first = train(run, store, ["tracking.mlflow=true", f"tracking.uri=http://alice:s3cret@{host}",
                               "train.max_steps=2", "checkpoint.every_steps=1"])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "warning: MLflow" not in first.stderr and seen["ok"] > 0, first.stderr[-3000:]
    c = client(mlflow_server)
    got = only_run(c, "tiny_cpu")
    assert got.data.params["tracking.uri"] == f"http://***@{host}"
    assert yaml.safe_load((run / "config.yaml").read_text())["tracking"]["uri"] == f"http://***@{host}"
    assert files_holding(run, b"s3cret") == []  # config.yaml, checkpoints, metrics.jsonl, mlflow_run.json
    assert "s3cret" not in first.stdout + first.stderr
    # the next part reads the run directory's config (masked): the credentials come from MLflow's variables
    second = train(run, store, ["train.max_steps=4"], resume="latest", config=str(run / "config.yaml"),
                   **{USER_VAR: "alice", PASSWORD_VAR: "s3cret"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "warning: MLflow" not in second.stderr, second.stderr[-3000:]
    assert only_run(c, "tiny_cpu").info.run_id == got.info.run_id
    assert steps(c, got.info.run_id, "train/loss") == [1, 2, 3, 4]
    # without them: one clear warning, training goes on
    refused = seen["refused"]
    third = train(run, store, ["train.max_steps=5"], resume="latest", config=str(run / "config.yaml"))
    assert third.returncode == 0 and (run / "final.json").is_file(), third.stderr[-3000:]
    assert USER_VAR in third.stderr and "warning: MLflow tracking" in third.stderr and seen["refused"] > refused
    assert files_holding(run, b"s3cret") == []


def test_submitted_job_carries_the_credentials_in_its_environment(tmp_path, store, mlflow_server, auth_proxy):
    """A requeue runs the pickled job again in the job's environment, which SLURM keeps: the
    pickle holds the masked URI, the environment the credentials."""
    host, seen = auth_proxy
    r = submit(ROOT / "configs" / "tiny_cpu.yaml", tmp_path / "runs",
               ["--local", "--wait", *grid_sets(store, f"tracking.uri=http://alice:s3cret@{host}")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_cpu"
    got = only_run(client(mlflow_server), "tiny_cpu")
    assert got.data.params["tracking.uri"] == f"http://***@{host}" and got.info.status == "FINISHED"
    assert seen["ok"] > 0 and seen["refused"] == 0
    assert files_holding(tmp_path / "runs", b"s3cret") == []  # the submitit pickles and logs too
    [pickled] = (run / "submitit").rglob("*_submitted.pkl")
    job = pickle.loads(pickled.read_bytes())
    job = getattr(job, "function", job)
    assert job.config["tracking"]["uri"] == f"http://***@{host}"


# ---------------------------------------------------------------------------------- a store that never answers
def test_blackholed_tracking_host_never_slows_training_steps(tmp_path, store):
    run = tmp_path / "run"
    with socket.socket() as hole:  # the kernel accepts connections into the backlog; nobody ever answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(1)
        t0 = time.monotonic()
        r = train(run, store, ["tracking.mlflow=true", f"tracking.uri=http://127.0.0.1:{hole.getsockname()[1]}",
                               "tracking.close_timeout_s=2", "train.max_steps=6"], timeout=240,
                  MLFLOW_HTTP_REQUEST_TIMEOUT="120")  # a request sent from the training thread would hold it 120 s
        elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    times = [rec["time"] for rec in records(run, "train")]
    assert len(times) == 6 and (run / "final.json").is_file()
    assert max(b - a for a, b in zip(times, times[1:])) < 10, times
    assert "were not sent within tracking.close_timeout_s (2 s)" in r.stderr, r.stderr[-3000:]
    assert elapsed < 100, f"a blackholed tracking host held the run for {elapsed:.0f} s"


def test_sender_queue_never_blocks_and_drops_the_oldest():
    release, sent, warned = threading.Event(), [], []

    def flush():
        release.wait(30)  # a store that hangs: the training thread must not notice
        while batch := sender.peek(2):
            sent.extend(v for _, v in batch)
            sender.ack(batch[-1][0])

    sender = Sender(flush, 0.1, 5, failed=lambda exc: None, recovered=lambda: None, warn=warned.append)
    assert sender.thread is None  # started lazily, by the first put
    t0 = time.monotonic()
    for i in range(12):
        sender.put([i])
    assert time.monotonic() - t0 < 1
    assert sender.thread.daemon and sender.thread.is_alive()
    assert sender.dropped == 7 and sender.waiting() == 5 and len(warned) == 1 and "oldest" in warned[0]
    release.set()
    assert sender.close(10) is True
    assert sent == [7, 8, 9, 10, 11] and sender.waiting() == 0


def test_sender_close_keeps_its_deadline_and_a_forked_child_never_uses_it():
    never = threading.Event()
    hung = Sender(lambda: never.wait(60), 1, 10, lambda exc: None, lambda: None, lambda text: None)
    hung.put([1])
    t0 = time.monotonic()
    assert hung.close(0.5) is False and time.monotonic() - t0 < 3
    assert hung.waiting() == 1
    never.set()
    # a DataLoader worker forked while the sending thread held the lock: that lock stays held in the child
    sender = Sender(lambda: None, 1, 10, lambda exc: None, lambda: None, lambda text: None)
    held, release = threading.Event(), threading.Event()

    def hold():
        with sender.cond:
            held.set()
            release.wait(30)

    threading.Thread(target=hold, daemon=True).start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:
        sender.put([1])
        sender.close(0.1)
        os._exit(0 if sender.thread is None else 3)
    release.set()
    deadline = time.monotonic() + 20
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done != (0, 0), "the forked child hung on the sender's lock"
    assert os.waitstatus_to_exitcode(done[1]) == 0, "the forked child started a sending thread"


# ---------------------------------------------------------------------------------- an mlflow that fails to import
class BrokenMlflow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "mlflow" or name.startswith("mlflow."):
            raise TypeError("Descriptors cannot be created directly (a protobuf clash)")
        return None


def test_tracker_turns_tracking_off_when_mlflow_fails_to_import(tmp_path, monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [BrokenMlflow(), *sys.meta_path])
    cfg = from_dict(Config, {"tracking": {"mlflow": True, "uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    tracker = Tracker(cfg, tmp_path, resume=False)  # rank 0 must not die while the other ranks wait for it
    tracker.log_record({"type": "train", "step": 1, "loss": 0.5})
    tracker.log_final({"step": 1, "epoch": 0, "best": None})
    tracker.close()
    err = capsys.readouterr().err
    assert err.count("MLflow tracking is off for this run") == 1 and "TypeError" in err, err
    assert not (tmp_path / RUN_FILE).exists() and not (tmp_path / "m.db").exists()


def test_mlflow_that_fails_to_import_stops_train_and_submit_before_anything_starts(tmp_path, store):
    broken = tmp_path / "broken" / "mlflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise TypeError("Descriptors cannot be created directly")\n')
    run, path = tmp_path / "run", str(tmp_path / "broken")
    r = train(run, store, ["tracking.mlflow=true", "train.max_steps=2"], PYTHONPATH=path)
    lines = [line for line in r.stderr.splitlines() if "mlflow fails to import" in line]
    assert r.returncode == 2 and len(lines) == 1 and "TypeError" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (run / "metrics.jsonl").exists()
    s = submit(ROOT / "configs" / "tiny_cpu.yaml", tmp_path / "runs", ["--dry-run", *grid_sets(store)],
               PYTHONPATH=path)
    assert s.returncode == 2 and "mlflow fails to import" in s.stderr and "refusing to submit" in s.stderr, s.stderr


# ---------------------------------------------------------------------------------- sqlite paths, resumes
def test_grid_submit_makes_a_relative_sqlite_path_absolute_and_warns_once(tmp_path, store):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"grid": {"name": "trk3", "base": str(ROOT / "configs" / "tiny_cpu.yaml"),
                                             "axes": {"train.lr": [0.001, 0.002, 0.003]}}}))
    r = submit(grid, tmp_path / "runs", ["--dry-run", *grid_sets(store, "tracking.uri=sqlite:///rel/mlflow.db")],
               cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"uri: sqlite:///{tmp_path}/rel/mlflow.db" in r.stdout  # the job may start anywhere
    assert r.stderr.count("several grid points log to one sqlite file") == 1 and "mlflow server" in r.stderr


def test_resume_from_an_older_checkpoint_logs_no_step_twice(tmp_path, store):
    run, db = tmp_path / "run", tmp_path / "rel" / "mlflow.db"
    first = train(run, store, ["tracking.mlflow=true", "tracking.uri=sqlite:///rel/mlflow.db",
                               "checkpoint.every_steps=2", "train.max_steps=4"], cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert db.is_file()  # relative to where the command ran, and recorded so
    assert yaml.safe_load((run / "config.yaml").read_text())["tracking"]["uri"] == f"sqlite:///{db}"
    # a hard kill after step 4, before its checkpoint: the next part resumes from step 2 (from elsewhere)
    older = run / "checkpoints" / "step00000002"
    assert older.is_dir()
    second = train(run, store, ["train.max_steps=6"], resume=str(older), config=str(run / "config.yaml"))
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert [rec["step"] for rec in records(run, "train")] == [1, 2, 3, 4, 3, 4, 5, 6]  # trained twice
    c = client(f"sqlite:///{db}")
    run_id = only_run(c, "tiny_cpu").info.run_id
    assert steps(c, run_id, "train/loss") == [1, 2, 3, 4, 5, 6] and steps(c, run_id, "train/lr") == [1, 2, 3, 4, 5, 6]
    val = steps(c, run_id, "val/mean_iou")
    assert len(val) == len(set(val)) and val[-1] == 6
    assert "already has" in second.stderr
