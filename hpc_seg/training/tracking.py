"""MLflow experiment tracking from rank 0 (``tracking.mlflow: true``, docs/tracking.md).

:class:`Tracker` is owned by the run log (``hpc_seg.training.runlog``): every record the run log
writes reaches it, ``train`` and ``val`` records become metrics at their step, the final summary
becomes ``final/…`` metrics, and the flattened config becomes the run's params. One MLflow run per
run directory: its id is kept in ``RUN_DIR/mlflow_run.json`` and a resumed run (``--resume``, a
requeued job) logs into it again, without the steps it already has.

The tracking store never stops training: the training thread only queues; a daemon thread
(``hpc_seg.training.tracking_sender``) connects and sends; a failing call is a warning (once), the
metrics wait in memory and are sent again at most every ``tracking.retry_s`` seconds. mlflow is
imported here only, and only when tracking is on; telemetry is switched off before the import; an
import that fails in the tracker turns tracking off for the run. User and password of a tracking
URI never reach a log or a file (``hpc_seg.training.tracking_uri``).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
import time
from pathlib import Path

from hpc_seg.config import Config, to_dict
from hpc_seg.errors import HpcSegError
from hpc_seg.storage.atomic import atomic_write_json
from hpc_seg.training.tracking_sender import Sender
from hpc_seg.training.tracking_uri import (absolute_store, connection_uri, public_config, public_uri, scrub,
                                           without_credentials)

RUN_FILE = "mlflow_run.json"
INSTALL = "pip install 'hpc-seg[tracking]'"
METRIC_RECORDS = ("train", "val")
RESUMABLE = ("train/", "val/")  # metrics a resumed run does not log again at steps it already has
NOT_METRICS = ("step", "time", "epoch")
# MLflow's defaults (7 retries with backoff, 120 s timeout) would hold a training step for minutes
# while the server is down; an explicit value in the environment is respected.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
# MLflow's limits (mlflow.utils.validation)
MAX_PARAM_LENGTH, MAX_TAG_LENGTH, MAX_KEY_LENGTH = 6000, 8000, 250
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_PENDING = 200_000  # metric values kept while the store is unreachable; the oldest go first
TRUNCATED = "...[truncated]"


def missing_mlflow(cfg: Config, import_it: bool = True) -> str | None:
    """The one-line problem when tracking is on and mlflow is not installed or (``import_it``)
    fails to import (a protobuf or pydantic clash raises TypeError, AttributeError, …), else None."""
    if not cfg.tracking.mlflow:
        return None
    if importlib.util.find_spec("mlflow") is None:
        return f"tracking.mlflow: true needs MLflow, which is not installed: {INSTALL}"
    return _import_problem() if import_it else None


@functools.lru_cache(maxsize=1)
def _import_problem() -> str | None:
    try:
        _import_mlflow()
    except Exception as exc:  # whatever a broken installation raises
        return (f"tracking.mlflow: true, but mlflow fails to import ({_short(exc)}): repair the installation "
                f"({INSTALL}) or set tracking.mlflow=false")
    return None


def require_mlflow(cfg: Config, import_it: bool | None = None) -> None:
    """Stop with one line (HpcSegError: exit 2) before training starts when tracking is on and mlflow
    is missing or fails to import. The import is tried where ``import_it``, by default in a process
    that is not one of several ranks (``hpc-seg train`` before it starts them, a single process);
    ranks only look for the package, and rank 0's tracker turns tracking off should it not import."""
    if import_it is None:
        from hpc_seg.distributed.env import detect_env

        import_it = detect_env().world_size == 1
    problem = missing_mlflow(cfg, import_it)
    if problem:
        raise HpcSegError(problem)


def _import_mlflow():
    """The mlflow module, with telemetry off and short HTTP retries (read when mlflow starts and at
    each request); raises whatever the import raises."""
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"  # mlflow reports usage to its servers unless told not to
    # mlflow prints the run's link with the URI's user and password; the tracker prints it without them
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    import mlflow
    import mlflow.tracking  # noqa: F401  (MlflowClient, used by _connect)

    return mlflow


def resolve_target(cfg: Config) -> tuple[str | None, str, str]:
    """(tracking URI or None for MLflow's default, experiment, run name): a config key wins over
    MLflow's environment variable; a grid point's experiment is its grid, a single run's its name."""
    t = cfg.tracking
    uri = absolute_store(t.uri or os.environ.get("MLFLOW_TRACKING_URI") or None)
    experiment = t.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or t.grid or cfg.name
    return uri, experiment, t.run_name or cfg.name


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
    (``… Connection refused``) at the end of a long message; any user and password of a URL masked."""
    lines = scrub(str(exc)).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


class Tracker:
    """One training run's MLflow run, seen from rank 0: the training thread queues (``log_record``,
    ``log_final``), the sender's thread connects and sends (``_flush``), ``close`` waits for it.

    Args:
        cfg: the resolved config (``tracking`` section on).
        run_dir: the run directory (``mlflow_run.json`` lives there).
        resume: the trainer was asked to resume: log into the run recorded in the run directory.
    """

    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool):
        self.off = False
        try:
            self.mlflow = _import_mlflow()
        except Exception as exc:  # a broken installation: rank 0 must not die while the other ranks wait
            self.off = True
            self._note(f"MLflow tracking is off for this run: mlflow fails to import ({_short(exc)}); "
                       f"the run directory keeps everything")
            return
        uri, self.experiment, self.run_name = resolve_target(cfg)
        uri = uri or absolute_store(self.mlflow.get_tracking_uri())
        (self.uri, problem), self.shown = connection_uri(uri), public_uri(uri)
        if problem:
            self._note(f"MLflow: {problem}")
        self.run_dir, self.resume, self.grid = Path(run_dir), resume, cfg.tracking.grid
        self.retry_s, self.close_timeout_s = cfg.tracking.retry_s, cfg.tracking.close_timeout_s
        self.params = flatten_params(public_config(to_dict(cfg)))
        self.client = self.run_id = None
        self.pending_params: dict[str, str] = {}
        self.logged_steps: dict[str, int] = {}  # a resumed run's last step of each train/val metric
        self.warned = self.finished = self.told_skip = False
        self.stop_reason: str | None = None
        self.sender = Sender(self._flush, self.retry_s, MAX_PENDING, self._failed, self._recovered, self._note)

    # ------------------------------------------------------------------ the training thread
    def log_record(self, record: dict) -> None:
        if self.off:
            return
        if record.get("type") == "stop":
            self.stop_reason = str(record.get("reason"))
        self.sender.put(record_metrics(record))

    def log_final(self, final: dict) -> None:
        if self.off:
            return
        best = final.get("best")
        self.sender.put(final_metrics(final), {"hpc_seg.best_checkpoint": str(best[1])} if best else None)
        self.finished = True

    def close(self) -> None:
        """Send what waits (one more try whatever the retry interval, within
        ``tracking.close_timeout_s``) and mark the MLflow run finished, killed (stopped by a signal:
        a requeue resumes it) or failed; warn about what could not be sent."""
        if self.off or not self.sender.owner():
            return
        status = "FINISHED" if self.finished else "KILLED" if self.stop_reason == "signal" else "FAILED"
        done = self.sender.close(self.close_timeout_s, lambda: self.client.set_terminated(self.run_id, status))
        late = self.sender.thread.is_alive()
        left = self.sender.waiting() + self.sender.dropped
        within = f" within tracking.close_timeout_s ({self.close_timeout_s:g} s)" if late else ""
        if done and self.uri.startswith(("http://", "https://")):
            print(f"hpc-seg train: MLflow run: {without_credentials(self.uri).rstrip('/')}/#/experiments/"
                  f"{self.experiment_id}/runs/{self.run_id}", flush=True)
        if left:
            self._note(f"MLflow ({self.shown}): {left} metric values of this part of the run were not sent{within}; "
                       f"{self.run_dir / 'metrics.jsonl'} has them all")
        elif not done:
            self._note(f"MLflow ({self.shown}) failed at the end of the run{within}; its status there is not updated")

    # ------------------------------------------------------------------ the sender's thread
    def _flush(self) -> None:
        """Connect if need be and send what waits; raises when the store fails (all stays queued)."""
        from mlflow.entities import Metric, Param, RunTag

        if self.run_id is None:
            self._connect()
        while self.pending_params:
            chunk = list(self.pending_params.items())[:PARAMS_PER_BATCH]
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in chunk])
            for k, _ in chunk:
                del self.pending_params[k]
        while batch := self.sender.peek(METRICS_PER_BATCH):
            metrics = [Metric(k, v, ts, step) for _, (k, v, ts, step) in batch if self._new(k, step)]
            if metrics:
                self.client.log_batch(self.run_id, metrics=metrics)
            self.sender.ack(batch[-1][0])
        tags = self.sender.take_tags()
        try:
            if tags:
                self.client.log_batch(self.run_id, tags=[RunTag(k, _truncate(v, MAX_TAG_LENGTH))
                                                         for k, v in tags.items()])
        except Exception:
            self.sender.give_back_tags(tags)
            raise

    def _new(self, key: str, step: int) -> bool:
        """False for a train/val value at or below the last step the resumed MLflow run has of it:
        a part that resumed from a checkpoint older than its predecessor's last step (a hard kill)."""
        last = self.logged_steps.get(key)
        if last is None or step > last:
            return True
        if not self.told_skip:
            self.told_skip = True
            print(f"hpc-seg train: MLflow run {self.run_id} already has {key} up to step {last} (logged after the "
                  f"checkpoint this part resumed from); values at or below a metric's last step are not logged again",
                  file=sys.stderr, flush=True)
        return False

    def _failed(self, exc: BaseException) -> None:
        if not self.warned:
            self.warned = True
            print(f"hpc-seg train: warning: MLflow tracking ({self.shown}) failed: {_short(exc)}; "
                  f"training goes on, metrics wait and are sent again at most every {self.retry_s:g} s",
                  file=sys.stderr, flush=True)

    def _recovered(self) -> None:
        print(f"hpc-seg train: MLflow ({self.shown}) reachable again; waiting metrics sent",
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
            self.logged_steps = {m.key: m.step for m in run.data.to_proto().metrics if m.key.startswith(RESUMABLE)}
        self.client, self.run_id, self.experiment_id = client, run.info.run_id, experiment_id
        atomic_write_json(self.run_dir / RUN_FILE, {
            "run_id": self.run_id, "experiment_id": experiment_id, "experiment": self.experiment,
            "tracking_uri": self.shown})

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
            self._note(f"MLflow run {run_id} (from {RUN_FILE}) is not in {self.shown} or deleted; "
                       f"starting a new MLflow run")
            return None
        client.update_run(run_id, status="RUNNING")
        return run

    def _params_of_resumed(self, logged: dict[str, str]) -> None:
        """Params are immutable in MLflow: keys new to the run are logged, a changed value becomes
        the tag ``config_change.KEY`` (``old -> new``)."""
        self.pending_params = {k: v for k, v in self.params.items() if k not in logged}
        self.sender.put(tags={_clean_key(f"config_change.{k}"): f"{logged[k]} -> {v}"
                              for k, v in self.params.items() if k in logged and logged[k] != v})

    @staticmethod
    def _note(text: str) -> None:
        print(f"hpc-seg train: warning: {text}", file=sys.stderr, flush=True)
