"""``hpc-seg submit``: training to SLURM through submitit (or locally without SLURM).

Commands (``python launch/submit.py`` is the same command)::

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

import argparse
import sys
from pathlib import Path

from hpc_seg.errors import HpcSegError


def plan(args) -> tuple[str | None, list]:
    """(grid name or None, [Planned]) for the config or grid named on the command line."""
    from hpc_seg.jobs.grid import expand, is_grid, load_grid
    from hpc_seg.jobs.submit import Planned, absolute_paths, load_launch_config

    root = Path(args.run_root).resolve()
    if not is_grid(args.config):
        cfg = absolute_paths(load_launch_config(args.config, args.overrides, args.site))
        return None, [Planned(cfg.name, cfg, root / cfg.name)]
    name, base, axes = load_grid(args.config)
    points = []
    for point, overrides in expand(axes):
        cfg = absolute_paths(load_launch_config(base, overrides + args.overrides + [f"name={name}-{point}"],
                                                args.site))
        points.append(Planned(point, cfg, root / name / point))
    return name, points


def check(points) -> None:
    from hpc_seg.jobs.submit import validate_request

    problems = [f"{p.name}: {msg}" for p in points for msg in validate_request(p.cfg, p.run_dir)]
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
    if not wait:
        return 0
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


def build_parser(ap: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    ap = ap or argparse.ArgumentParser(prog="hpc-seg submit", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="config or grid file (path or name inside configs/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--site", default=None, help="site profile (default: $HPC_SEG_SITE, "
                    "~/.config/hpc-seg/site.yaml, the shipped one)")
    ap.add_argument("--run-root", default="runs")
    ap.add_argument("--dry-run", action="store_true", help="print the sbatch script and config; submit nothing")
    ap.add_argument("--local", action="store_true", help="run with submitit's local executor (no SLURM)")
    ap.add_argument("--wait", action="store_true", help="wait for the job(s) and report")
    return ap


def run(args) -> int:
    grid, points = plan(args)
    check(points)
    if args.dry_run:
        dry_run(grid, points)
        return 0
    return submit(grid, points, args.local, args.wait)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except HpcSegError as exc:
        print(f"submit: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
