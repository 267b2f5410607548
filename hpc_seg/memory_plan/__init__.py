"""The memory planner: which ZeRO stage, micro-batch and checkpointing fit a GPU (``hpc-seg plan``)."""
