"""Distribution applied from outside the models: rank environment, collectives, DeepSpeed config, checkpoints, resharding, consolidation, activation checkpointing."""
