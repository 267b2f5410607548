"""Launching on SLURM with submitit: the checkpointable training job, grids, request checks."""
