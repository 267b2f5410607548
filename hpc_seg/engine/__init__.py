"""Training engine pieces applied from outside the model code (DeepSpeed, checkpointing)."""
