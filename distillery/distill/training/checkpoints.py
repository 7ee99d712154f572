"""What every training loop here shares: resumable state through accelerate, with the data position.

`accelerator.save_state` writes the optimizer, the lr schedule, the RNGs and every object
registered for checkpointing; the pre/post hooks keep only the trainable tensors of the models
(LoRA and the w projection over a frozen W0: a checkpoint is megabytes, not a UNet).
`Progress` is the run's position: optimizer steps, the epoch and batches into it, the shuffle
RNG at the epoch's start, the run's own RNG, the loss history. A run resumed from a checkpoint
sees the same batches and noise as one that never stopped.

Under a run's --work folder each save is a new folder `checkpoint-<step>`, written whole (distillery/atomic.py)
with a manifest of its files written last; then `latest` is replaced to name it and older ones go, the one
before it kept. A resume loads the checkpoint `latest` names if it is complete, else the newest complete one:
a run killed at any moment of a save resumes from a whole checkpoint, never from part of one.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterator

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from distillery.atomic import atomic_file, publish, remove_folder, remove_leftovers, staging_folder

CHECKPOINT = "checkpoint-{}"  # under a run's --work folder, one per save, named by the optimizer step
LATEST = "latest"  # the name of the last complete checkpoint
MANIFEST = "manifest.json"  # written last into a checkpoint: its files and their sizes
KEEP = 2  # the last checkpoint and the one before it, in case the last is damaged later
TRAINABLE_FILE = "trainable_{}.safetensors"
log = logging.getLogger(__name__)


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
    """Load the last complete checkpoint under `work`, if any (objects must be prepared and registered first)."""
    found = last_checkpoint(work)
    if found is None:
        return False
    accelerator.load_state(str(found))
    return True


def checkpoint(accelerator: Accelerator, work: Path, step: int) -> None:
    """Write the run's state as `work/checkpoint-<step>` and name it `latest` (every process calls this;
    accelerate writes from the main one, and each rank its RNG state, into the main one's staging folder)."""
    work, dest = Path(work), Path(work) / CHECKPOINT.format(step)
    accelerator.wait_for_everyone()
    staging = broadcast_object_list([str(staging_folder(dest)) if accelerator.is_main_process else None])[0]
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()  # every rank's files are written
    if not accelerator.is_main_process:
        return
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(Path(staging).rglob("*")) if p.is_file()}
    (Path(staging) / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1) + "\n")
    publish(Path(staging), dest)
    with atomic_file(work / LATEST) as tmp:
        tmp.write_text(dest.name + "\n")
    previous = [p for p in _numbered(work) if _step(p) < step and complete(p)][: KEEP - 1]
    for old in _numbered(work):
        if old != dest and old not in previous:
            remove_folder(old)
    remove_leftovers(work)


def last_checkpoint(work: Path) -> Path | None:
    """The checkpoint a resume loads: the one `latest` names if complete, else the newest complete one."""
    work = Path(work)
    named = (work / LATEST).read_text().strip() if (work / LATEST).exists() else None
    for folder in dict.fromkeys(([work / named] if named else []) + _numbered(work)):
        if complete(folder):
            return folder
        log.warning("skipping the incomplete checkpoint %s", folder)
    return None


def complete(folder: Path) -> bool:
    """Whether `folder` holds every file its manifest lists, at the size written."""
    try:
        files = json.loads((Path(folder) / MANIFEST).read_text())["files"]
        return all((Path(folder) / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _numbered(work: Path) -> list[Path]:
    """The run's checkpoint folders, newest first."""
    found = [p for p in Path(work).glob(CHECKPOINT.format("*")) if re.fullmatch(CHECKPOINT.format(r"\d+"), p.name)]
    return sorted(found, key=_step, reverse=True)


def _step(folder: Path) -> int:
    return int(folder.name.rsplit("-", 1)[1])


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
