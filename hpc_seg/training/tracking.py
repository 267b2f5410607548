"""MLflow experiment tracking from rank 0 (``tracking.mlflow: true``, docs/tracking.md).

:class:`Tracker` is owned by the run log (``hpc_seg.training.runlog``): every record the run log
writes reaches it, ``train`` and ``val`` records become metrics at their step, the final summary
becomes ``final/…`` metrics, and the flattened config becomes the run's params. One MLflow run per
run directory: its id is kept in ``RUN_DIR/mlflow_run.json`` and a resumed run (``--resume``, a
requeued job) logs into it again.

The tracking store never stops training: a failing call is a warning (once), the metrics wait in
memory and are sent again at most every ``tracking.retry_s`` seconds; MLflow's HTTP retries and
timeout are cut short so that no training step waits long. mlflow is imported here only, and only
when tracking is on; telemetry is switched off before the import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from hpc_seg.config import Config, to_dict
from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_json

RUN_FILE = "mlflow_run.json"
INSTALL = "pip install 'hpc-seg[tracking]'"
METRIC_RECORDS = ("train", "val")
NOT_METRICS = ("step", "time", "epoch")
# MLflow's defaults (7 retries with backoff, 120 s timeout) would hold a training step for minutes
# while the server is down; an explicit value in the environment is respected.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# MLflow's limits (mlflow.utils.validation)
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_PENDING = 200_000  # metric values kept while the store is unreachable; the oldest go first
TRUNCATED = "...[truncated]"


def missing_mlflow(cfg: Config) -> str | None:
    """The one-line problem when tracking is on and mlflow is not installed, else None."""
    if cfg.tracking.mlflow and importlib.util.find_spec("mlflow") is None:
        return f"tracking.mlflow: true needs MLflow, which is not installed: {INSTALL}"
    return None


def require_mlflow(cfg: Config) -> None:
    problem = missing_mlflow(cfg)
    if problem:
        raise HpcSegError(problem)


def _import_mlflow():
    """The mlflow module, with telemetry off and short HTTP retries (read when mlflow starts and at
    each request)."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # mlflow reports usage to its servers unless told not to
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    try:
        import mlflow
        import mlflow.tracking  # noqa: F401  (MlflowClient, used by _connect)
    except ImportError as exc:
        raise HpcSegError(f"tracking.mlflow: true needs MLflow ({exc}): {INSTALL}") from None
    return mlflow


def resolve_target(cfg: Config) -> tuple[str | None, str, str]:
    """(tracking URI or None for MLflow's default, experiment, run name): a config key wins over
    MLflow's environment variable; a grid point's experiment is its grid, a single run's its name."""
    t = cfg.tracking
    uri = t.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    experiment = t.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or t.grid or cfg.name
    return uri, experiment, t.run_name or cfg.name


def public_uri(uri: str) -> str:
    """``uri`` without user and password: it is printed and written to the run directory."""
    parts = urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=host + (f":{parts.port}" if parts.port else "")))


def _clean_key(key: str) -> str:
    """An MLflow param/metric name: alphanumerics, ``_ - . / : `` and space only, 250 characters."""
    return re.sub(r"[^/\w.\- :]", "_", key)[:MAX_KEY_LENGTH]


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def flatten_params(tree: dict, prefix: str = "") -> dict[str, str]:
    """The config as MLflow params: dotted keys (``train.lr``), values as YAML/JSON writes them
    (``true``, ``null``, ``[32, 32]``), each within MLflow's length limit."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_params(v, key + "."))
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=str)
            out[_clean_key(key)] = _truncate(text, MAX_PARAM_LENGTH)
    return out


def _numbers(record: dict, prefix: str) -> list[tuple[str, float]]:
    return [(_clean_key(f"{prefix}/{k}"), float(v)) for k, v in record.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]


def record_metrics(record: dict) -> list[tuple[str, float, int, int]]:
    """(name, value, timestamp ms, step) of a ``train``/``val`` record, named ``train/loss`` and
    ``val/mean_iou`` as in TensorBoard; other records carry no metrics."""
    kind = record.get("type")
    if kind not in METRIC_RECORDS:
        return []
    ts, step = int(record.get("time", time.time()) * 1000), int(record.get("step", 0))
    return [(name, value, ts, step) for name, value in _numbers(record, kind)]


def final_metrics(final: dict) -> list[tuple[str, float, int, int]]:
    """``final/step``, ``final/epoch``, ``final/best_mean_iou`` and the last validation's figures
    (``final/mean_iou``, ``final/dice_tumour``, …) of the summary written to ``final.json``."""
    ts, step = int(time.time() * 1000), int(final.get("step", 0))
    values = [("final/step", float(step)), ("final/epoch", float(final.get("epoch", 0)))]
    best = final.get("best")
    if best and best[0] is not None:
        values.append(("final/best_mean_iou", float(best[0])))
    values += _numbers(final.get("last_validation") or {}, "final")
    return [(name, value, ts, step) for name, value in values]


def _short(exc: BaseException, keep: int = 160) -> str:
    """The exception's first line, its middle cut out when long: mlflow wraps the cause
    (``… Connection refused``) at the end of a long message."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


class Tracker:
    """One training run's MLflow run, seen from rank 0.

    Args:
        cfg: the resolved config (``tracking`` section on).
        run_dir: the run directory (``mlflow_run.json`` lives there).
        resume: the trainer was asked to resume: log into the run recorded in the run directory.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool):
        self.mlflow = _import_mlflow()
        uri, self.experiment, self.run_name = resolve_target(cfg)
        self.uri = uri or self.mlflow.get_tracking_uri()
        self.run_dir, self.resume, self.retry_s = Path(run_dir), resume, cfg.tracking.retry_s
        self.grid = cfg.tracking.grid
        self.params = flatten_params(to_dict(cfg))
        self.client = self.run_id = None
        self.pending: list[tuple[str, float, int, int]] = []
        self.pending_params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.dropped, self.next_try = 0, 0.0
        self.warned = self.failing = self.finished = False
        self.stop_reason: str | None = None

    # ------------------------------------------------------------------ what the run log hands over
    def log_record(self, record: dict) -> None:
        if record.get("type") == "stop":
            self.stop_reason = str(record.get("reason"))
        self._queue(record_metrics(record))
        self.flush()

    def log_final(self, final: dict) -> None:
        self._queue(final_metrics(final))
        best = final.get("best")
        if best:
            self.tags["hpc_seg.best_checkpoint"] = str(best[1])
        self.finished = True
        self.flush()

    def close(self) -> None:
        """Send what waits (one more try whatever the retry interval) and mark the MLflow run
        finished, killed (stopped by a signal: a requeue resumes it) or failed."""
        status = "FINISHED" if self.finished else "KILLED" if self.stop_reason == "signal" else "FAILED"
        done = self.flush(force=True)
        if done:
            try:
                self.client.set_terminated(self.run_id, status)
            except Exception as exc:  # any store failure: the run's own files hold everything
                done = False
                self._failed(exc)
        left = len(self.pending) + self.dropped
        if left:
            self._note(f"MLflow ({public_uri(self.uri)}): {left} metric values of this part of the run were not "
                       f"sent; {self.run_dir / 'metrics.jsonl'} has them all")
        elif not done:
            self._note(f"MLflow ({public_uri(self.uri)}) failed at the end of the run; its status there is not updated")

    # ------------------------------------------------------------------ sending
    def _queue(self, metrics: list) -> None:
        self.pending += metrics
        extra = len(self.pending) - MAX_PENDING
        if extra > 0:
            del self.pending[:extra]
            self.dropped += extra

    def flush(self, force: bool = False) -> bool:
        """Connect if need be and send what waits; False (and a retry later) when the store fails."""
        if not force and time.monotonic() < self.next_try:
            return False
        try:
            if self.run_id is None:
                self._connect()
            self._send()
        except Exception as exc:  # mlflow, requests, SQLAlchemy, OS errors alike: training goes on
            self._failed(exc)
            return False
        if self.failing:
            print(f"hpc-seg train: MLflow ({public_uri(self.uri)}) reachable again; waiting metrics sent",
                  file=sys.stderr, flush=True)
            self.failing = False
        return True

    def _send(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        while self.pending_params:
            chunk = list(self.pending_params.items())[:PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
            for k, _ in chunk:
                del self.pending_params[k]
        while self.pending:
            chunk = self.pending[:METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
            del self.pending[: len(chunk)]
        if self.tags:
            tags = list(self.tags.items())
            self.client.log_batch(self.run_id, tags=[RunTag(k, _truncate(v, MAX_TAG_LENGTH)) for k, v in tags])
            self.tags = {}

    def _failed(self, exc: BaseException) -> None:
        self.next_try = time.monotonic() + self.retry_s
        self.failing = True
        if not self.warned:
            self.warned = True
            print(f"hpc-seg train: warning: MLflow tracking ({public_uri(self.uri)}) failed: {_short(exc)}; "
                  f"training goes on, metrics wait and are sent again at most every {self.retry_s:g} s",
                  file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the run
    def _connect(self) -> None:
        """Find or create the experiment, resume the recorded run or create one, record its id."""
        client = self.mlflow.tracking.MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id(client)
        run = self._resumed_run(client) if self.resume else None
        if run is None:
            tags = {"hpc_seg.run_dir": str(self.run_dir.resolve())}
            if self.grid:
                tags["hpc_seg.grid"] = self.grid
            run = client.create_run(experiment_id, run_name=self.run_name, tags=tags)
            self.pending_params = dict(self.params)
        else:
            self._params_of_resumed(run.data.params)
        self.client, self.run_id = client, run.info.run_id
        atomic_write_json(self.run_dir / RUN_FILE, {
            "run_id": self.run_id, "experiment_id": experiment_id, "experiment": self.experiment,
            "tracking_uri": public_uri(self.uri)})

    def _experiment_id(self, client) -> str:
        from mlflow.exceptions import MlflowException

        found = client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return client.create_experiment(self.experiment)
            except MlflowException:  # another grid point created it meanwhile
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage != "active":
            raise HpcSegError(f"experiment {self.experiment!r} is deleted in this store: restore it "
                              f"('mlflow experiments restore') or set tracking.experiment")
        return found.experiment_id

    def _resumed_run(self, client):
        """The MLflow run recorded in the run directory, set running again; None when there is none
        (or the store no longer knows it: a new run is started, with a warning)."""
        from mlflow.exceptions import MlflowException

        try:
            run_id = json.loads((self.run_dir / RUN_FILE).read_text())["run_id"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._note(f"{self.run_dir / RUN_FILE} is unreadable ({exc}); starting a new MLflow run")
            return None
        try:
            run = client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage != "active":
            self._note(f"MLflow run {run_id} (from {RUN_FILE}) is not in {public_uri(self.uri)} or deleted; "
                       f"starting a new MLflow run")
            return None
        client.update_run(run_id, status="RUNNING")
        return run

    def _params_of_resumed(self, logged: dict[str, str]) -> None:
        """Params are immutable in MLflow: keys new to the run are logged, a changed value becomes
        the tag ``config_change.KEY`` (``old -> new``)."""
        self.pending_params = {k: v for k, v in self.params.items() if k not in logged}
        for k, v in self.params.items():
            if k in logged and logged[k] != v:
                self.tags[_clean_key(f"config_change.{k}")] = f"{logged[k]} -> {v}"

    @staticmethod
    def _note(text: str) -> None:
        print(f"hpc-seg train: warning: {text}", file=sys.stderr, flush=True)
