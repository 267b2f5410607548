"""Job commands: ``hpc-seg submit`` (training to SLURM through submitit, or locally without SLURM)
and ``hpc-seg status``.

Commands (``python launch/submit.py ARGS`` is ``hpc-seg submit ARGS``)::

    hpc-seg submit --config transunet_12l.yaml                 # sbatch via submitit: job id, logs
    hpc-seg submit --config grids/unet_aspp.yaml               # one job array over the grid
    hpc-seg submit --config transunet_12l.yaml --dry-run       # sbatch script + resolved config
    hpc-seg submit --config tiny_cpu.yaml --local              # no SLURM: submitit local executor
    hpc-seg submit --config tiny_cpu.yaml --set train.max_steps=100 --wait
    hpc-seg status runs/tiny_cpu                               # jobs, steps, checkpoint, metrics

``--config NAME`` also resolves among the shipped configs. Cluster defaults come from the site
profile, found in this order: ``--site FILE``, ``$HPC_SEG_SITE``, ``~/.config/hpc-seg/site.yaml``,
the shipped default; the config's ``slurm:`` section overrides it. Everything is validated before
anything is queued (exit 2 with the reasons). Runs go to ``RUN_ROOT/<config name>`` (grids:
``RUN_ROOT/<grid name>/<point>``); a run directory that already holds checkpoints is resumed from
``latest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hpc_seg.config.cli_args import add_config_args
from hpc_seg.errors import HpcSegError


def add_commands(sub) -> None:
    p = sub.add_parser("submit", help="submit training to SLURM via submitit (or --local)")
    add_config_args(p, required=True, help="config or grid file (path or name inside configs/)")
    p.add_argument("--site", default=None, help="site profile (default: $HPC_SEG_SITE, "
                   "~/.config/hpc-seg/site.yaml, the shipped one)")
    p.add_argument("--run-root", default="runs")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    p.add_argument("--local", action="store_true", help="run with submitit's local executor (no SLURM)")
    p.add_argument("--wait", action="store_true", help="wait for the job(s) and report")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="jobs, steps, last checkpoint and metrics of a run directory")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_status)


def cmd_submit(args) -> int:
    grid, points = expand_request(args)
    check(points)
    if args.dry_run:
        dry_run(grid, points)
        return 0
    return submit(grid, points, args.local, args.wait)


def cmd_status(args) -> int:
    from hpc_seg.jobs.status import print_status

    return print_status(args.run_dir)


def expand_request(args) -> tuple[str | None, list]:
    """(grid name or None, [GridPoint]) for the config or grid named on the command line: a grid
    expands to one point per combination of its axes, a config is one point."""
    from hpc_seg.jobs.grid import GridPoint, expand_grid, is_grid, load_grid, point_overrides
    from hpc_seg.jobs.submit import absolute_paths, load_launch_config

    root = Path(args.run_root).resolve()
    if not is_grid(args.config):
        cfg = absolute_paths(load_launch_config(args.config, args.overrides, args.site))
        return None, [GridPoint(cfg.name, cfg, root / cfg.name)]
    name, base, axes = load_grid(args.config)
    points = []
    for point, overrides in expand_grid(axes):
        cfg = absolute_paths(load_launch_config(base, overrides + args.overrides + point_overrides(name, point),
                                                args.site))
        points.append(GridPoint(point, cfg, root / name / point))
    return name, points


def check(points) -> None:
    from hpc_seg.jobs.submit import check_request

    problems = [f"{p.name}: {msg}" for p in points for msg in check_request(p.cfg, p.run_dir)]
    if problems:
        raise HpcSegError("refusing to submit:\n  " + "\n  ".join(problems))


def dry_run(grid: str | None, points) -> None:
    from hpc_seg.jobs.submit import resolved_yaml, sbatch_script

    first = points[0]
    folder = first.run_dir.parent / "submitit" if grid else first.run_dir / "submitit"
    print(f"# sbatch script ({'job array of ' + str(len(points)) + ' tasks' if grid else 'single job'})")
    print(sbatch_script(first.cfg, folder))
    if grid:
        print(f"# grid {grid}: {len(points)} points")
        for p in points:
            print(f"  {p.name:40s} → {p.run_dir}")
    print(f"# resolved config of {first.name}")
    print(resolved_yaml(first.cfg))


def submit(grid: str | None, points, local: bool, wait: bool) -> int:
    from hpc_seg.jobs.job import TrainJob
    from hpc_seg.jobs.submit import make_executor

    first = points[0]
    folder = (first.run_dir.parent if grid else first.run_dir) / "submitit" / "%j"
    for p in points:
        p.run_dir.mkdir(parents=True, exist_ok=True)
    executor = make_executor(first.cfg, folder, local)
    jobs_in = [TrainJob(_dict(p.cfg), str(p.run_dir.resolve()), p.cfg.slurm.max_requeues) for p in points]
    if grid:
        with executor.batch():
            jobs = [executor.submit(j) for j in jobs_in]
    else:
        jobs = [executor.submit(jobs_in[0])]
    for p, job in zip(points, jobs):
        with open(p.run_dir / "job_ids.txt", "a") as ids:  # appended: a run dir keeps every job it had
            ids.write(f"{job.job_id}\n")
        print(f"submitted {p.name}: job {job.job_id} ({executor.cluster}); run dir {p.run_dir}; "
              f"log {job.paths.stdout}")
    return _wait_and_report(points, jobs) if wait else 0


def _wait_and_report(points, jobs) -> int:
    import logging

    logging.getLogger("submitit").setLevel(logging.ERROR)  # no accounting: sacct warnings are noise
    failed = 0
    for p, job in zip(points, jobs):
        try:
            result = job.results()[0]  # one result per task; rank 0's is the run's
            best = result.get("best")
            best_txt = f"best mean IoU {best[0]:.3f} at {best[1]}" if best else "no validation"
            print(f"{p.name}: done, step {result.get('step')}, {best_txt}")
        except Exception as exc:  # the job's exception, as submitit re-raises it
            failed += 1
            print(f"{p.name}: failed: {exc}", file=sys.stderr)
    return 1 if failed else 0


def _dict(cfg):
    from hpc_seg.config import to_dict

    return to_dict(cfg)
