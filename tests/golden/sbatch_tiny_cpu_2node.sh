#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=1
#SBATCH --error=<FOLDER>/%j_0_log.err
#SBATCH --job-name=tiny_cpu_2node
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=<FOLDER>/%j_0_log.out
#SBATCH --partition=debug
#SBATCH --signal=USR2@90
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup
trap 'hpc_seg_rc=$?; <PYTHON> -m hpc_seg.jobs.requeue --rc $hpc_seg_rc --max-requeues 3' EXIT

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <FOLDER>/%j_%t_log.out --error <FOLDER>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=1 <PYTHON> -u -m submitit.core._submit <FOLDER>
