"""The training loop: trainer, validation, optimiser, run log, resume check, the dataset and sampler."""
