"""What a training run carries from step to step, and what its checkpoint saves and restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


@dataclass
class TrainState:
    """The progress of a run: steps done, the metric rows so far, the best validation score.

    Together with the model, optimiser and scheduler states and the random states, this is
    what ``checkpoint.pt`` holds: a resumed run continues exactly where the saved one was.
    """

    step: int = 0  #: steps done
    history: list[dict] = field(default_factory=list)  #: metric rows (training and validation)
    best_mean_dice: float = -1.0  #: best validation mean Dice so far (-1: none yet)
    best_step: int = -1  #: step of that score (-1: none yet)

    @classmethod
    def restore(cls, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> TrainState:
        """Load ``path`` into the model, optimiser and scheduler, set the random states, and return
        the state the checkpoint was written at."""
        saved = load_checkpoint(path, device)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        set_rng_state(saved["rng"])
        return cls(step=saved["step"], history=saved["history"], best_mean_dice=saved["best_mean_dice"],
                   best_step=saved["best_step"])

    def save(self, path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler, config: dict, world_size: int) -> None:
        """Write the checkpoint (atomically) with the current random states."""
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "step": self.step, "rng": rng_state(),
            "history": self.history, "best_mean_dice": self.best_mean_dice, "best_step": self.best_step,
            "config": config, "world_size": world_size})

    def improved(self, score: float, step: int) -> bool:
        """Record ``score`` at ``step`` as the best if it beats the best so far; True if it did."""
        if score > self.best_mean_dice:
            self.best_mean_dice, self.best_step = score, step
            return True
        return False
