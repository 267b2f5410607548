"""After ``srun`` ends: requeue the job when a rank died of a transient failure.

The sbatch script (``hpc_seg.jobs.submit.executor_parameters``) starts ``srun --kill-on-bad-exit=1``,
so one rank killed (OOM killer, node fault, ``kill -9``) ends the whole step at once — SLURM
terminates the other tasks (SIGTERM, then SIGKILL after ``KillWait``) instead of leaving them in a
collective until a timeout. Its setup lines install an EXIT trap that runs this module with
``srun``'s exit status:

* a task killed by a signal (status 128 + signal, what ``srun`` reports for it) is transient: the
  job is requeued with ``scontrol requeue`` while ``SLURM_RESTART_COUNT`` < ``--max-requeues``, and
  the requeued job resumes from the last good checkpoint (``--resume latest`` semantics);
* anything else is not: 0 (done, or preempted and already requeued by submitit), 1 (an exception:
  CUDA out of memory, a bug), 2 (bad config or data), 3 (diverged) end the job as they are.

Preemption and time limits keep their own path (USR2 → checkpoint → submitit requeue).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys


def decide(rc: int, restarts: int, max_requeues: int) -> tuple[bool, str]:
    """(requeue?, why) for ``srun``'s exit status ``rc``."""
    if rc > 128:
        try:
            name = signal.Signals(rc - 128).name
        except ValueError:
            name = f"signal {rc - 128}"
        if restarts >= max_requeues:
            return False, f"a rank was killed by {name}; not requeued: {restarts} requeues reached slurm.max_requeues"
        return True, f"a rank was killed by {name}: transient failure, requeue {restarts + 1}/{max_requeues}"
    return False, f"srun exit status {rc}: not a transient failure, not requeued"


def job_state(job: str) -> str | None:
    r = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    for word in r.stdout.split():
        if word.startswith("JobState="):
            return word.split("=", 1)[1]
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpc_seg.jobs.requeue")
    ap.add_argument("--rc", type=int, required=True, help="srun's exit status")
    ap.add_argument("--max-requeues", type=int, required=True)
    args = ap.parse_args(argv)
    job = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    requeue, why = decide(args.rc, restarts, args.max_requeues)
    state = job_state(job) if requeue and job else None
    if requeue and state not in (None, "RUNNING"):  # cancelled, timed out, or already requeued (preemption)
        requeue, why = False, f"{why.split(':')[0]}; job is {state}: left to SLURM"
    print(f"hpc-seg: job {job}: {why}", file=sys.stderr, flush=True)
    if requeue and job:
        r = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"hpc-seg: scontrol requeue {job} failed: {r.stderr.strip()}", file=sys.stderr, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
