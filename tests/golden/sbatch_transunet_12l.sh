#!/bin/bash

# Parameters
#SBATCH --cpus-per-task=8
#SBATCH --error=<FOLDER>/%j_0_log.err
#SBATCH --gpus-per-node=4
#SBATCH --job-name=transunet_12l
#SBATCH --mem=0
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --open-mode=append
#SBATCH --output=<FOLDER>/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --signal=USR2@90
#SBATCH --time=1440
#SBATCH --wckey=submitit

# setup
source $HOME/hpc-seg/.venv/bin/activate
export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK
trap 'hpc_seg_rc=$?; <PYTHON> -m hpc_seg.jobs.requeue --rc $hpc_seg_rc --max-requeues 3' EXIT

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <FOLDER>/%j_%t_log.out --error <FOLDER>/%j_%t_log.err --kill-on-bad-exit=1 --cpus-per-task=8 <PYTHON> -u -m submitit.core._submit <FOLDER>
