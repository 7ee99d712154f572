"""Block pruning with layer-level knowledge distillation: a smaller base, trained against the full one.

BK-SDM (Kim et al. 2023, arXiv 2305.15798): the student is the teacher with blocks removed
(`pruned_unet.py`), initialised with the teacher's remaining weights, and trained on
    task_weight * MSE(eps_s, target) + output_weight * MSE(eps_s, eps_t) + feature_weight * sum MSE(f_s, f_t)
with the features at the outputs of every down, mid and up block (`features="blocks"`, BK-SDM), or, as
SSD-1B / Segmind-Vega (arXiv 2401.02677) hook them, at every down block's resnets and attentions and the
mid and up blocks' outputs (`features="layers"`; a mid block reduced to one resnet is matched to the
teacher's whole one). Weights 1.0 as BK-SDM; SSD-1B uses 0.5 for the two distillation terms. The output
is a diffusers folder: the pruned UNet beside copies of the original VAE, text encoder(s), tokenizer(s) and
scheduler, loaded like any other base.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel

from distillery.atomic import atomic_folder
from distillery.distill.methods.prune_spec import PrunePlan, level_spec, plan_pruning
from distillery.distill.methods.pruned_unet import parameter_count, prune_unet, student_module
from distillery.distill.training.ddim import noise_target
from distillery.distill.training.loop import Batch, TrainConfig, make_accelerator, train_student
from distillery.model import DiffusionModel, unet_fingerprint

PRUNING_FILE = "pruning.json"  # in the pruned folder: what was dropped, from which base, the training run
SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler", "model_index.json",
                "distillery.json")  # those a base has (SDXL: two text encoders)


FEATURES = ("blocks", "layers")  # BK-SDM's block outputs; SSD-1B's down-block layers, then mid and up blocks


@dataclass
class PruneConfig(TrainConfig):
    out: str = "models/toy-small"
    work: str = ".work/prune"
    level: int = 2  # 1, 2 or 3 (SSD-1B): prune_spec.level_spec's structural recipe; 0: the blocks in `drop`
    drop: list[str] = field(default_factory=list)
    steps: int = 1500
    batch: int = 32
    lr: float = 2e-4
    warmup: int = 50
    gradient_checkpointing: bool = False  # the student is the small one; the teacher keeps no activations
    task_weight: float = 1.0
    output_weight: float = 1.0
    feature_weight: float = 1.0
    features: str = "blocks"  # one of FEATURES: where feature KD matches the two UNets

    def __post_init__(self):
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {list(FEATURES)}, got {self.features!r}")

    def spec(self, unet_config) -> list[str]:
        return list(self.drop) if self.level == 0 else level_spec(unet_config, self.level)


def feature_pairs(teacher, plan: PrunePlan, features: str = "blocks") -> list[tuple[str, str]]:
    """(teacher module, student module) pairs whose outputs feature KD matches; parts the student dropped have
    no pair."""
    if features == "layers":
        names = [f"down_blocks.{i}.{part}.{j}" for i, block in enumerate(teacher.down_blocks)
                 for part in ("resnets", "attentions") for j in range(len(getattr(block, part, [])))]
    else:
        names = [f"down_blocks.{i}" for i in range(len(teacher.down_blocks))]
    names += ["mid_block"] if teacher.mid_block is not None else []
    names += [f"up_blocks.{i}" for i in range(len(teacher.up_blocks))]
    return [(name, student_module(name, plan)) for name in names if student_module(name, plan) is not None]


class BlockOutputs:
    """Forward hooks keeping the outputs of the named modules of a UNet (default: every down, mid and up
    block), the features KD matches; `remove()` takes them off again."""

    def __init__(self, unet, names: list[str] | None = None):
        self.outputs: dict[str, torch.Tensor] = {}
        if names is None:
            names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
            names += ["mid_block"] if unet.mid_block is not None else []
            names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        modules = dict(unet.named_modules())
        self._hooks = [modules[name].register_forward_hook(self._keeper(name)) for name in names]

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.outputs[name] = output[0] if isinstance(output, tuple) else output  # (h, skips), (h,) of attention
        return keep


def kd_loss(student, teacher, student_blocks: BlockOutputs, teacher_blocks: BlockOutputs, pairs: list[tuple[str, str]],
            batch: Batch, noise_scheduler: DDPMScheduler, cfg: PruneConfig,
            generator: torch.Generator) -> torch.Tensor:
    """Task + output KD + feature KD for one batch (captions already dropped to "" at `caption_dropout`)."""
    latents = batch.latents  # (B, C, h, w)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                      device=latents.device)
    x_t = noise_scheduler.add_noise(latents, noise, t)
    target = noise_target(noise_scheduler, latents, noise, t)
    with torch.no_grad():
        out_t = teacher(x_t, t, **batch.cond.unet_kwargs()).sample
    out_s = student(x_t, t, **batch.cond.unet_kwargs()).sample
    features = [F.mse_loss(student_blocks.outputs[s].float(), teacher_blocks.outputs[t].float()) for t, s in pairs]
    return (cfg.task_weight * F.mse_loss(out_s.float(), target.float())
            + cfg.output_weight * F.mse_loss(out_s.float(), out_t.float())
            + cfg.feature_weight * torch.stack(features).sum())


def prune(cfg: PruneConfig) -> Path:
    """Prune `cfg.model`'s UNet and train it; writes the pruned model folder to `cfg.out`."""
    teacher_config = UNet2DConditionModel.load_config(cfg.model, subfolder="unet")
    plan_pruning(teacher_config, cfg.spec(teacher_config))  # a bad spec fails here, before anything loads
    accelerator = make_accelerator(cfg)
    model = DiffusionModel.from_pretrained(cfg.model, device=accelerator.device)
    teacher = model.unet
    student, plan = prune_unet(teacher, cfg.spec(teacher.config))
    student.requires_grad_(True)
    pairs = feature_pairs(teacher, plan, cfg.features)
    teacher_blocks = BlockOutputs(teacher, [t for t, _ in pairs])
    student_blocks = BlockOutputs(student, [s for _, s in pairs])
    noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
    model.unet = student  # the loop trains model.unet; text encoder and VAE are shared with the teacher
    accelerator.print(f"pruning {cfg.model}: dropping {', '.join(plan.drops)}; "
                      f"{parameter_count(student):,} of {parameter_count(teacher):,} UNet parameters kept")

    def loss_of(trained, batch: Batch, gen: torch.Generator) -> torch.Tensor:
        return kd_loss(trained, teacher, student_blocks, teacher_blocks, pairs, batch, noise_scheduler, cfg, gen)

    summary = train_student(accelerator, cfg, model, loss_of, f"pruning ({len(plan.drops)} blocks dropped)",
                            is_trainable=lambda key: True)
    out = Path(cfg.out)
    if accelerator.is_main_process:
        save_pruned(Path(cfg.model), out, accelerator.unwrap_model(student).eval().requires_grad_(False), {
            "base": cfg.model, "base_fingerprint": model.fingerprint, "dropped": plan.drops,
            "parameters": parameter_count(student), "base_parameters": parameter_count(teacher),
            "training": {**asdict(cfg), **summary}})
        accelerator.print(f"saved the pruned model to {out}")
    return out


def save_pruned(base: Path, out: Path, unet, record: dict) -> None:
    """A diffusers folder: the pruned UNet, the base's other parts copied beside it, and `pruning.json`;
    written whole, replacing any earlier `out`."""
    with atomic_folder(out) as staging:
        for part in SHARED_PARTS:
            source = base / part
            if source.is_dir():
                shutil.copytree(source, staging / part)
            elif source.exists():
                shutil.copy2(source, staging / part)
        unet.save_pretrained(staging / "unet")
        record["fingerprint"] = unet_fingerprint(unet)
        (staging / PRUNING_FILE).write_text(json.dumps(record, indent=1) + "\n")
