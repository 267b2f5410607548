"""Building the submitit executor from the ``slurm:`` config section (over the site profile),
checking the request before anything is queued, rendering the sbatch script, submitting."""

from __future__ import annotations

import shutil
from pathlib import Path

import submitit
import yaml

from hpc_seg.config import Config, load_raw, resolve_config_path, to_dict
from hpc_seg.config.loader import apply_overrides, from_dict, read_yaml
from hpc_seg.storage.location import is_file, is_remote, join
from hpc_seg.ingest.prepare import is_prepared, prepare_command
from hpc_seg.training.tracking import missing_mlflow
from hpc_seg.training.tracking_uri import is_sqlite, job_uri
from hpc_seg.errors import ConfigError

SHIPPED_SITE = Path(__file__).resolve().parent / "site.yaml"
USER_SITE = Path("~/.config/hpc-seg/site.yaml")


def find_site(site: str | Path | None) -> Path:
    """The site profile: ``--site FILE``, ``$HPC_SEG_SITE``, ``~/.config/hpc-seg/site.yaml``, the shipped one."""
    import os

    for candidate, what in ((site, "--site"), (os.environ.get("HPC_SEG_SITE"), "$HPC_SEG_SITE")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise ConfigError(f"{path}: site profile not found (given by {what})")
            return path
    user = USER_SITE.expanduser()
    return user if user.is_file() else SHIPPED_SITE


def load_site(site: str | Path | None):
    """The site profile's ``slurm:`` section as a checked SlurmConfig (for jobs that have no config)."""
    from hpc_seg.config.schema import SlurmConfig

    path = find_site(site)
    raw = read_yaml(path)
    unknown = set(raw) - {"slurm"}
    if unknown:
        raise ConfigError(f"{path}: a site profile holds only a 'slurm' section (found {sorted(unknown)})")
    return from_dict(SlurmConfig, raw.get("slurm") or {}, source=str(path))


def load_launch_config(config: str | Path, overrides: list[str], site: str | Path | None) -> Config:
    """Config = site profile's ``slurm:`` defaults ← the config file ← ``--set`` overrides."""
    path = resolve_config_path(config)
    raw = load_raw(path)
    site_path = find_site(site)
    site_raw = read_yaml(site_path)
    unknown = set(site_raw) - {"slurm"}
    if unknown:
        raise ConfigError(f"{site_path}: a site profile holds only a 'slurm' section (found {sorted(unknown)})")
    raw["slurm"] = {**(site_raw.get("slurm") or {}), **(raw.get("slurm") or {})}
    return from_dict(Config, apply_overrides(raw, overrides), source=str(path))


def absolute_paths(cfg: Config) -> Config:
    """Jobs may start in another directory: make data/model paths absolute at submission."""
    d = cfg.data
    d.store = d.store if is_remote(d.store) else str(Path(d.store).resolve())
    d.source = str(Path(d.source).resolve()) if d.source else None
    for extra in d.extra_sources:
        extra.path = str(Path(extra.path).resolve())
    if cfg.model.pretrained:
        cfg.model.pretrained = str(Path(cfg.model.pretrained).resolve())
    if cfg.tracking.mlflow:  # a relative sqlite path absolute; a URI's credentials into the job's environment
        cfg.tracking.uri = job_uri(cfg.tracking.uri)
        _warn_shared_sqlite(cfg.tracking.uri)
    return cfg


_SQLITE_POINTS: dict[str | None, int] = {}  # tracking store -> grid points of this submission on it


def _warn_shared_sqlite(uri: str | None) -> None:
    """Once, when a second point of a grid logs to the same sqlite file (MLflow's default store is
    one too): concurrent jobs on one sqlite file over NFS/Lustre lock each other out or corrupt it."""
    import os
    import sys

    effective = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if effective and not is_sqlite(effective):
        return
    _SQLITE_POINTS[effective] = _SQLITE_POINTS.get(effective, 0) + 1
    if _SQLITE_POINTS[effective] == 2:
        where = effective or "MLflow's default store (sqlite:///mlflow.db in the job's working directory)"
        print(f"hpc-seg submit: warning: several grid points log to one sqlite file, {where}: jobs running at "
              f"the same time on one sqlite file (on NFS/Lustre above all) lock each other out or corrupt it; "
              f"give the grid an `mlflow server` (tracking.uri=http://HOST:PORT), see docs/tracking.md",
              file=sys.stderr, flush=True)


def _under(path: Path, prefixes: list[str]) -> str | None:
    resolved = str(path.resolve())
    return next((p for p in prefixes if resolved == p or resolved.startswith(p.rstrip("/") + "/")), None)


def check_request(cfg: Config, run_dir: Path) -> list[str]:
    """Problems that would make the job fail on the cluster; empty when the request is sound."""
    from hpc_seg.models import check_model_args

    problems, s, d = [], cfg.slurm, cfg.data
    try:
        check_model_args(cfg.model.name, cfg.model.size, cfg.model.overrides)
    except ConfigError as exc:
        problems.append(str(exc))
    store, source = d.store, Path(d.source) if d.source else None
    if not is_prepared(store, d.split_seed):
        if s.world_size > 1:  # ranks never prepare data: that is a step of its own, before the job
            problems.append(f"data.store {store} is not a prepared store (split seed {d.split_seed}); "
                            f"{s.world_size} ranks need it ready: {prepare_command(cfg)}")
        elif source is not None and not source.exists():
            problems.append(f"data.store {store} is not a prepared store and data.source {source} does not exist")
        elif source is None and d.kind != "phantom" and not is_file(join(store, "zarr.json")):
            problems.append(f"data.store {store} does not exist: {prepare_command(cfg)}")
        for extra in d.extra_sources:
            if not Path(extra.path).exists():
                problems.append(f"data.extra_sources: {extra.kind} source {extra.path} does not exist")
    if s.nodes > 1:
        for what, p in (("run directory", run_dir), ("data.store", store)):
            local = None if is_remote(p) else _under(Path(p), s.node_local_paths)
            if local:
                problems.append(f"{what} {p} is on node-local storage ({local}); {s.nodes} nodes need a shared path")
    if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
        problems.append(f"model.pretrained {cfg.model.pretrained} does not exist")
    if s.gpus_per_node == 0 and cfg.deepspeed.precision == "fp16":
        problems.append("deepspeed.precision fp16 on a CPU-only request: use bf16 or fp32, or ask for GPUs")
    if s.timeout_min * 60 <= s.signal_delay_s:
        problems.append(f"slurm.time {s.time} leaves no time before the USR2 signal ({s.signal_delay_s}s)")
    if problem := missing_mlflow(cfg):
        problems.append(problem)
    return problems


def executor_parameters(cfg: Config) -> dict:
    """submitit parameters (AutoExecutor naming) from the ``slurm`` section."""
    s = cfg.slurm
    params = {"name": cfg.name, "nodes": s.nodes, "tasks_per_node": s.tasks_per_node,
              "cpus_per_task": s.cpus_per_task, "timeout_min": s.timeout_min,
              "slurm_signal_delay_s": s.signal_delay_s, "slurm_array_parallelism": s.array_parallelism,
              "slurm_setup": list(s.setup) + [requeue_trap(s.max_requeues)],
              # --kill-on-bad-exit: one dead rank ends the step at once. --cpus-per-task: srun of Slurm
              # 22.05-23.02 does not inherit sbatch's, so each rank would get one CPU for its loader workers
              "slurm_srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={s.cpus_per_task}"],
              "slurm_additional_parameters": dict(s.extra)}
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    return params


def requeue_trap(max_requeues: int) -> str:
    """An EXIT trap: after srun, requeue the job if a rank was killed by a signal (hpc_seg/jobs/requeue.py)."""
    import shlex
    import sys

    return (f"trap 'hpc_seg_rc=$?; {shlex.quote(sys.executable)} -m hpc_seg.jobs.requeue --rc $hpc_seg_rc "
            f"--max-requeues {max_requeues}' EXIT")


def make_executor(cfg: Config, folder: Path, local: bool) -> submitit.AutoExecutor:
    cluster = "local" if local or shutil.which("sbatch") is None else "slurm"
    ex = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    params = executor_parameters(cfg)
    if cluster == "local":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params.pop("nodes", None)
    ex.update_parameters(**params)
    return ex


def sbatch_script(cfg: Config, folder: Path) -> str:
    """The sbatch script submitit would submit for ``cfg`` (for --dry-run and golden tests)."""
    ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    ex.update_parameters(**executor_parameters(cfg))
    inner = ex._executor  # submitit's SlurmExecutor renders the script it would sbatch
    return inner._make_submission_file_text(inner._submitit_command_str, "DRYRUN")


def resolved_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
