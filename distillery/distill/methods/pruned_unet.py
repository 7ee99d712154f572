"""Block pruning of a diffusers UNet: a validated spec (`prune_spec.py`) -> the smaller UNet's config and its
weights, initialised with the teacher's remaining ones (BK-SDM, SSD-1B)."""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel

from distillery.distill.methods.prune_spec import (CROSS_ATTENTION, Depths, PrunePlan, PruneSpecError,
                                                   layers_per_block, plan_pruning)


def pruned_config(config, plan: PrunePlan) -> dict:
    """The student's `UNet2DConditionModel` config."""
    new = {k: copy.deepcopy(v) for k, v in dict(config).items() if not k.startswith("_")}
    n = len(new["down_block_types"])
    new["layers_per_block"] = [count - len(plan.dropped_layers("down", i))
                               for i, count in enumerate(layers_per_block(config))]
    for side in ("down", "up"):
        types = list(new[f"{side}_block_types"])
        for s, i in plan.no_attention:
            if s == side:
                types[i] = CROSS_ATTENTION[types[i]]
        new[f"{side}_block_types"] = types
    if plan.transformers or config.get("reverse_transformer_layers_per_block") or any(
            isinstance(d, (list, tuple)) for d in _as_list(config.get("transformer_layers_per_block", 1), n)):
        new.update(_depth_config(config, plan))
    if plan.mid:
        new["mid_block_type"] = None
    elif plan.mid_attention:
        new["mid_block_type"] = "UNetMidBlock2D"  # one resnet, no attention (SSD-1B; diffusers PR #5400)
    assert len(new["up_block_types"]) == n
    return new


def _as_list(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


def _depth_config(config, plan: PrunePlan) -> dict:
    """Per-layer transformer depths, down and up (diffusers reads the up blocks' from
    `reverse_transformer_layers_per_block` once any depth is a list), after the spec's drops."""
    depths = Depths.of(config)

    def kept(side: str, i: int, per_layer: list[int]) -> list[int]:
        return [d - len(plan.dropped_transformers(side, i, j))
                for j, d in enumerate(per_layer) if j not in plan.dropped_layers(side, i)]

    down = [kept("down", i, per) for i, per in enumerate(depths.down)]
    up = [kept("up", k, per) for k, per in enumerate(depths.up)]
    if config["down_block_types"][-1] not in CROSS_ATTENTION:  # its depth is only the mid block's
        down[-1] = [depths.mid - len(plan.dropped_transformers("mid", 0, 0))] * len(down[-1])
    return {"transformer_layers_per_block": down, "reverse_transformer_layers_per_block": up}


def _student_key(key: str, plan: PrunePlan) -> str | None:
    """Where a teacher weight goes in the student; None if its block is dropped."""
    parts = key.split(".")
    if parts[0] == "mid_block":
        if plan.mid or (plan.mid_attention and (parts[1] == "attentions" or parts[2] != "0")):
            return None  # UNetMidBlock2D keeps the first resnet alone
        return _renumbered_transformer(parts, plan.dropped_transformers("mid", 0, 0), at=4)
    if parts[0] not in ("down_blocks", "up_blocks") or parts[2] not in ("resnets", "attentions"):
        return key
    side, i, j = parts[0][:-len("_blocks")], int(parts[1]), int(parts[3])
    if parts[2] == "attentions" and (side, i) in plan.no_attention:
        return None
    dropped = plan.dropped_layers(side, i)
    if j in dropped:
        return None
    parts[3] = str(j - sum(d < j for d in dropped))
    return _renumbered_transformer(parts, plan.dropped_transformers(side, i, j), at=5)


def student_module(name: str, plan: PrunePlan) -> str | None:
    """The student's module for a teacher module (a block, or a block's resnet or attention); None if dropped."""
    if name == "mid_block":
        return None if plan.mid else name
    return name if name.count(".") == 1 else _student_key(name, plan)


def _renumbered_transformer(parts: list[str], dropped: set[int], at: int) -> str | None:
    """`parts[at]` is a transformer layer's index when `parts[at - 1]` is transformer_blocks."""
    if len(parts) > at and parts[at - 1] == "transformer_blocks":
        k = int(parts[at])
        if k in dropped:
            return None
        parts[at] = str(k - sum(d < k for d in dropped))
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


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
