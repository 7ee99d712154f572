"""Block pruning of a diffusers UNet: a spec of blocks to drop -> the smaller UNet's config and its weights.

BK-SDM (Kim et al. 2023, arXiv 2305.15798) and SSD-1B / Segmind-Vega (Gupta et al. 2024, arXiv
2401.02677) remove blocks from the UNet and initialise the student with the teacher's remaining
weights. Everything kept here is expressible as a `UNet2DConditionModel` config, so a pruned base
is a diffusers folder that `from_pretrained` loads like any other. A spec names blocks as the
teacher's module tree does:

    mid_block                    the whole mid block (mid_block_type None)
    down_blocks.I.attentions     every attention of block I (CrossAttn*Block2D -> *Block2D); same for up_blocks
    down_blocks.I.resnets.J      layer J of block I: the resnet and its attention (layers_per_block - 1)
    up_blocks.K.resnets.J        layer J of up block K: up block K takes one skip connection per resnet
                                 from down block N-1-K, so each dropped down layer needs one up layer dropped
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from diffusers import UNet2DConditionModel

CROSS_ATTENTION = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}
PLAIN = {"DownBlock2D", "UpBlock2D"}
UNIT = re.compile(r"^(mid_block|(down|up)_blocks\.(\d+)\.(attentions|resnets\.(\d+)))$")


class PruneSpecError(ValueError):
    """A spec the UNet cannot be pruned to; `block` names the offending entry."""

    def __init__(self, block: str, message: str):
        super().__init__(f"{block}: {message}")
        self.block = block


@dataclass
class PrunePlan:
    """What a validated spec drops: the mid block, the blocks losing their attention, layers per block."""

    drops: list[str]
    mid: bool = False
    no_attention: set[tuple[str, int]] = field(default_factory=set)  # ("down" | "up", block index)
    layers: dict[tuple[str, int], set[int]] = field(default_factory=dict)

    def dropped_layers(self, side: str, i: int) -> set[int]:
        return self.layers.get((side, i), set())


def _layers(config) -> list[int]:
    n, lpb = len(config["down_block_types"]), config["layers_per_block"]
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def prunable(config) -> list[str]:
    """Every name a spec may use on a UNet with this config."""
    names = ["mid_block"] if config.get("mid_block_type") else []
    for side in ("down", "up"):
        types = config[f"{side}_block_types"]
        layers = _layers(config) if side == "down" else [n + 1 for n in reversed(_layers(config))]
        for i, block_type in enumerate(types):
            if block_type in CROSS_ATTENTION:
                names.append(f"{side}_blocks.{i}.attentions")
            if block_type in CROSS_ATTENTION or block_type in PLAIN:
                names += [f"{side}_blocks.{i}.resnets.{j}" for j in range(layers[i])]
    return names


def plan_pruning(config, drops: list[str]) -> PrunePlan:
    """Validate `drops` against the UNet's structure (before any weight is touched or training starts)."""
    allowed = prunable(config)
    plan = PrunePlan(drops=list(dict.fromkeys(drops)))
    for name in plan.drops:
        if name not in allowed:
            what = "cannot be dropped on its own" if UNIT.match(name) is None and _looks_like_module(name) \
                else "no such block in this UNet"
            raise PruneSpecError(name, f"{what}; blocks that can be dropped: {', '.join(allowed)}")
        m = UNIT.match(name)
        if m.group(1) == "mid_block":
            plan.mid = True
        elif m.group(4) == "attentions":
            plan.no_attention.add((m.group(2), int(m.group(3))))
        else:
            plan.layers.setdefault((m.group(2), int(m.group(3))), set()).add(int(m.group(5)))
    _check_structure(config, plan)
    return plan


def _looks_like_module(name: str) -> bool:
    return bool(re.match(r"^(mid_block|down_blocks|up_blocks|conv_in|conv_out|time_embedding)(\.|$)", name))


def _check_structure(config, plan: PrunePlan) -> None:
    """Up block K takes one skip input per resnet from its mirror, down block N-1-K (its layers, and the
    downsampler output or conv_in below it): dropping layers on one side needs as many on the other. A
    resnet that is the only one changing the channel count cannot go (the next one's weights would not fit)."""
    layers, n, width = _layers(config), len(config["down_block_types"]), list(config["block_out_channels"])
    for i, count in enumerate(layers):
        k = n - 1 - i
        down, up = plan.dropped_layers("down", i), plan.dropped_layers("up", k)
        if len(down) == count:
            raise PruneSpecError(f"down_blocks.{i}.resnets.{max(down)}",
                                 f"down_blocks.{i} would keep no layer; it needs at least one")
        if len(down) != len(up):
            name = f"down_blocks.{i}.resnets.{max(down)}" if down else f"up_blocks.{k}.resnets.{max(up)}"
            raise PruneSpecError(name, f"up_blocks.{k} takes one skip connection per resnet from down_blocks.{i}: "
                                       f"dropping {len(down)} layer(s) of down_blocks.{i} needs {len(down)} resnet(s) "
                                       f"of up_blocks.{k} dropped, the spec drops {len(up)}")
        below = width[i - 1] if i > 0 else width[0]
        if 0 in down and below != width[i]:
            raise PruneSpecError(f"down_blocks.{i}.resnets.0", f"it is the only layer taking {below} channels to "
                                                               f"{width[i]}; drop a later layer of down_blocks.{i}")
        previous = width[i + 1] if i < n - 1 else width[i]  # what up block K receives from up block K-1
        if 0 in up and previous != width[i]:
            raise PruneSpecError(f"up_blocks.{k}.resnets.0", f"it is the only resnet taking the previous up "
                                                             f"block's {previous} channels; drop another of up_blocks.{k}")
        if count in up and below != width[i]:
            source = f"down_blocks.{i - 1}'s downsampler" if i > 0 else "conv_in"
            raise PruneSpecError(f"up_blocks.{k}.resnets.{count}", f"it is the only resnet taking the skip "
                                                                   f"connection from {source} ({below} channels); "
                                                                   f"drop another of up_blocks.{k}")


def pruned_config(config, plan: PrunePlan) -> dict:
    """The student's `UNet2DConditionModel` config."""
    new = {k: copy.deepcopy(v) for k, v in dict(config).items() if not k.startswith("_")}
    n = len(new["down_block_types"])
    new["layers_per_block"] = [count - len(plan.dropped_layers("down", i)) for i, count in enumerate(_layers(config))]
    for side in ("down", "up"):
        types = list(new[f"{side}_block_types"])
        for s, i in plan.no_attention:
            if s == side:
                types[i] = CROSS_ATTENTION[types[i]]
        new[f"{side}_block_types"] = types
    depth = new.get("transformer_layers_per_block")
    if isinstance(depth, (list, tuple)):  # per block, each an int or one per layer
        new["transformer_layers_per_block"] = [
            [d for j, d in enumerate(per) if j not in plan.dropped_layers("down", i)] if isinstance(per, list) else per
            for i, per in enumerate(depth)]
    if new.get("reverse_transformer_layers_per_block"):
        new["reverse_transformer_layers_per_block"] = [
            [d for j, d in enumerate(per) if j not in plan.dropped_layers("up", k)]
            for k, per in enumerate(new["reverse_transformer_layers_per_block"])]
    if plan.mid:
        new["mid_block_type"] = None
    assert len(new["up_block_types"]) == n
    return new


def _student_key(key: str, plan: PrunePlan) -> str | None:
    """Where a teacher weight goes in the student; None if its block is dropped."""
    parts = key.split(".")
    if parts[0] == "mid_block":
        return None if plan.mid else key
    if parts[0] not in ("down_blocks", "up_blocks") or parts[2] not in ("resnets", "attentions"):
        return key
    side, i, j = parts[0][:-len("_blocks")], int(parts[1]), int(parts[3])
    if parts[2] == "attentions" and (side, i) in plan.no_attention:
        return None
    dropped = plan.dropped_layers(side, i)
    if j in dropped:
        return None
    parts[3] = str(j - sum(d < j for d in dropped))
    return ".".join(parts)


def prune_unet(teacher: UNet2DConditionModel, drops: list[str]) -> tuple[UNet2DConditionModel, PrunePlan]:
    """A new, smaller UNet initialised with the teacher's remaining weights (the teacher is not changed)."""
    plan = plan_pruning(teacher.config, drops)
    student = UNet2DConditionModel.from_config(pruned_config(teacher.config, plan))
    wanted = student.state_dict()
    weights = {}
    for key, value in teacher.state_dict().items():
        target = _student_key(key, plan)
        if target is None:
            continue
        if target not in wanted or wanted[target].shape != value.shape:
            block = ".".join(key.split(".")[:4])
            raise PruneSpecError(block, f"the pruned UNet has no place for its weights ({key} -> {target}); "
                                        f"check which layers of this block the spec drops")
        weights[target] = value
    missing = set(wanted) - set(weights)
    assert not missing, f"student weights without a teacher source: {sorted(missing)[:3]}"
    student.load_state_dict(weights)
    if student.dtype != teacher.dtype:  # diffusers warns on any dtype cast; only cast when it is one
        student = student.to(dtype=teacher.dtype)
    return student.to(teacher.device).eval().requires_grad_(False), plan


def level_spec(config, level: int) -> list[str]:
    """The structural recipe of each pruning level, for any SD-style UNet.
    1: BK-SDM-Small's cut: the mid block, the last layer of every down block with two or more and a middle
       resnet (with its attention) of the mirror up block.
    2: level 1, and the cross-attention of the innermost stage that has any, down and up."""
    if level not in (1, 2):
        raise PruneSpecError(f"level {level}", "pruning levels are 1 and 2")
    spec = ["mid_block"] if config.get("mid_block_type") else []
    layers, n = _layers(config), len(config["down_block_types"])
    for i, count in enumerate(layers):
        if count >= 2:
            spec += [f"down_blocks.{i}.resnets.{count - 1}", f"up_blocks.{n - 1 - i}.resnets.1"]
    if level == 2:
        inner = max(i for i, t in enumerate(config["down_block_types"]) if t in CROSS_ATTENTION)
        spec.append(f"down_blocks.{inner}.attentions")
        if config["up_block_types"][n - 1 - inner] in CROSS_ATTENTION:
            spec.append(f"up_blocks.{n - 1 - inner}.attentions")
    return spec


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
