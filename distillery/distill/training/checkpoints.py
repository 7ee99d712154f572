"""What every training loop here shares: resumable state through accelerate, with the data position.

`accelerator.save_state` writes the optimizer, the lr schedule, the RNGs and every object
registered for checkpointing; the pre/post hooks keep only the trainable tensors of the models
(LoRA and the w projection over a frozen W0: a checkpoint is megabytes, not a UNet).
`Progress` is the run's position: optimizer steps, the epoch and batches into it, the shuffle
RNG at the epoch's start, the run's own RNG, the loss history. A run resumed from a checkpoint
sees the same batches and noise as one that never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

STATE_DIR = "state"  # under a run's --work folder
TRAINABLE_FILE = "trainable_{}.safetensors"


class Progress:
    def __init__(self, generator: torch.Generator):
        self.generator = generator  # the run's noise, timesteps and caption dropout
        self.step = self.epoch = self.batches_in_epoch = 0
        self.epoch_rng: torch.Tensor | None = None  # the shuffle RNG's state when this epoch began
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch,
                "epoch_rng": self.epoch_rng, "history": self.history, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.epoch, self.batches_in_epoch = state["step"], state["epoch"], state["batches_in_epoch"]
        self.epoch_rng, self.history = state["epoch_rng"], state["history"]
        self.generator.set_state(state["generator"])


def keep_trainable_in_checkpoints(accelerator: Accelerator, is_trainable: Callable[[str], bool]) -> None:
    """Checkpoints hold the models' trainable tensors only (the frozen base is the model folder itself)."""

    def save(models, weights, output_dir):
        for i, model in enumerate(models):
            state = accelerator.unwrap_model(model).state_dict()
            if accelerator.is_main_process:
                    save_file({k: v.detach().contiguous() for k, v in state.items() if is_trainable(k)},
                          str(Path(output_dir) / TRAINABLE_FILE.format(i)))
        weights.clear()  # nothing else is written for the models

    def load(models, input_dir):
        for i, model in enumerate(list(models)):
            loaded = accelerator.unwrap_model(model).load_state_dict(
                load_file(str(Path(input_dir) / TRAINABLE_FILE.format(i))), strict=False)  # the frozen base is missing
            if loaded.unexpected_keys:
                raise ValueError(f"checkpoint in {input_dir} holds tensors the model lacks: "
                                 f"{loaded.unexpected_keys[:3]}")
        models.clear()  # loaded here, not by accelerate

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def resume(accelerator: Accelerator, work: Path) -> bool:
    """Load the last checkpoint under `work`, if any (objects must be prepared and registered first)."""
    state = Path(work) / STATE_DIR
    if not (state / "custom_checkpoint_0.pkl").exists():
        return False
    accelerator.load_state(str(state))
    return True


def checkpoint(accelerator: Accelerator, work: Path) -> None:
    """Write the run's state under `work` (every process calls this; accelerate writes from the main one)."""
    accelerator.wait_for_everyone()
    accelerator.save_state(str(Path(work) / STATE_DIR))


def batches(accelerator: Accelerator, loader, shuffle_rng: torch.Generator, progress: Progress) -> Iterator:
    """Endless batches from `loader` (epoch after epoch) from `progress`' data position on; `shuffle_rng` is
    the generator the loader's sampler shuffles with."""
    resumed = progress.epoch_rng is not None
    while True:
        if resumed:  # replay this epoch's order, then skip what was seen
            shuffle_rng.set_state(progress.epoch_rng)
            epoch = accelerator.skip_first_batches(loader, progress.batches_in_epoch)
            resumed = False
        else:
            progress.epoch_rng, progress.batches_in_epoch = shuffle_rng.get_state(), 0
            epoch = loader
        for batch in epoch:
            progress.batches_in_epoch += 1
            yield batch
        progress.epoch += 1
        progress.batches_in_epoch = 0
        progress.epoch_rng = None
