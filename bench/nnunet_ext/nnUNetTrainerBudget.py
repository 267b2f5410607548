"""nnU-Net v2's default trainer on a wall-clock budget, for ``bench/peers.py`` (found by nnU-Net
through ``nnUNet_extTrainer`` pointing at this folder: ``-tr nnUNetTrainerBudget``).

Everything is ``nnUNetTrainer``'s (network, augmentation, loss, SGD + Nesterov at 1e-2, poly
exponent 0.9, deep supervision, checkpoints) except the schedule, compressed as hpc-seg's
``train.max_minutes`` compresses its own: the poly LR reads the share of the budget spent, set
before every iteration, so it reaches 0 at ``HPC_SEG_PEER_MINUTES``. The default 1000 epochs ×
250 iterations become ``HPC_SEG_PEER_EPOCHS`` epochs, each a slice of the budget with as many
iterations as fit in it, and nnU-Net's own validation after each (its 50 : 250 ratio of
validation to training iterations, at least one). ``HPC_SEG_PEER_SNAPSHOTS`` (fractions, comma
separated) saves ``checkpoint_t<k>.pth`` at the first epoch end past each fraction, for the
accuracy-against-minutes curve. ``timing.json`` beside the checkpoints: iterations, epochs, and
seconds per phase; written last, it marks a finished training. One process only: each rank
would read its own clock (no DDP).
"""

from __future__ import annotations

import json
import os
from os.path import join
from time import time

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBudget(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ["HPC_SEG_PEER_MINUTES"]) * 60.0
        self.num_epochs = int(os.environ.get("HPC_SEG_PEER_EPOCHS", "10"))
        self.snapshots = sorted(float(f) for f in os.environ.get("HPC_SEG_PEER_SNAPSHOTS", "").split(",") if f)
        self.save_every = 10 ** 9  # checkpoint_latest only through the snapshots and the final checkpoint

    def _lr_at(self, t0: float) -> float:
        spent = min((time() - t0) / self.budget_s, 1.0)
        lr = self.initial_lr * (1.0 - spent) ** 0.9
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _train_slice(self, t0: float, end: float) -> list[dict]:
        outputs = []
        while not outputs or time() < end:  # at least one iteration per epoch
            self._lr_at(t0)
            outputs.append(self.train_step(next(self.dataloader_train)))
        return outputs

    def run_training(self):
        self.on_train_start()
        t0, counts, snaps = time(), {"train_iterations": 0, "val_iterations": 0, "validation_seconds": 0.0}, {}
        for epoch in range(self.current_epoch, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = self._train_slice(t0, t0 + self.budget_s * (epoch + 1) / self.num_epochs)
            self.on_train_epoch_end(outputs)
            v0 = time()
            with torch.no_grad():
                self.on_validation_epoch_start()
                n_val = max(1, round(len(outputs) * 50 / 250))
                self.on_validation_epoch_end([self.validation_step(next(self.dataloader_val)) for _ in range(n_val)])
            counts["validation_seconds"] += time() - v0
            counts["train_iterations"] += len(outputs)
            counts["val_iterations"] += n_val
            self.on_epoch_end()
            for k, frac in enumerate(self.snapshots):
                name = f"checkpoint_t{k}.pth"
                if (time() - t0) >= frac * self.budget_s and name not in snaps and epoch < self.num_epochs - 1:
                    self.save_checkpoint(join(self.output_folder, name))
                    snaps[name] = {"minutes": (time() - t0) / 60.0, "train_iterations": counts["train_iterations"]}
        seconds = time() - t0
        self.on_train_end()
        if self.local_rank == 0:
            with open(join(self.output_folder, "timing.json"), "w") as f:
                json.dump({"budget_s": self.budget_s, "train_seconds": seconds, "epochs": self.num_epochs,
                           "last_lr": self.optimizer.param_groups[0]["lr"],  # the budget's, not nnU-Net's logged one
                           "batch_size": self.batch_size, "patch_size": list(self.configuration_manager.patch_size),
                           **counts, "snapshots": snaps}, f, indent=1)
