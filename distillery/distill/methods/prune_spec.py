"""What a pruning spec may name on a diffusers UNet, and the checks that keep the pruned UNet buildable.

BK-SDM (Kim et al. 2023, arXiv 2305.15798) removes blocks and layers; SSD-1B / Segmind-Vega (Gupta et al.
2024, arXiv 2401.02677) also thins the transformer stacks inside SDXL's attentions and reduces the mid block
to one resnet. Everything a spec drops is expressible in a `UNet2DConditionModel` config, so the pruned base
stays a diffusers folder. Names follow the teacher's module tree:

    mid_block                                  the whole mid block (mid_block_type None)
    mid_block.attentions                       its attention and second resnet (diffusers' UNetMidBlock2D, SSD-1B)
    down_blocks.I.attentions                   every attention of block I (CrossAttn*Block2D -> *Block2D); up too
    down_blocks.I.resnets.J                    layer J of block I: the resnet and its attention; up too, where
                                               up block K takes one skip per resnet from down block N-1-K
    down_blocks.I.attentions.J.transformer_blocks.K   one transformer layer of attention J (its depth - 1);
                                               up_blocks and mid_block.attentions.0 too (the up blocks' depths
                                               become `reverse_transformer_layers_per_block`)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

CROSS_ATTENTION = {"CrossAttnDownBlock2D": "DownBlock2D", "CrossAttnUpBlock2D": "UpBlock2D"}
PLAIN = {"DownBlock2D", "UpBlock2D"}
BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(attentions|resnets\.(\d+))$")
TRANSFORMER = re.compile(r"^(?:(down|up)_blocks\.(\d+)|mid_block)\.attentions\.(\d+)\.transformer_blocks\.(\d+)$")


class PruneSpecError(ValueError):
    """A spec the UNet cannot be pruned to; `block` names the offending entry."""

    def __init__(self, block: str, message: str):
        super().__init__(f"{block}: {message}")
        self.block = block


@dataclass
class Depths:
    """Transformer layers per attention, as the teacher's config builds them: down[i][j], up[k][j], mid."""

    down: list[list[int]]
    up: list[list[int]]
    mid: int

    @classmethod
    def of(cls, config) -> Depths:
        layers, n = layers_per_block(config), len(config["down_block_types"])
        per_block = config.get("transformer_layers_per_block", 1)
        per_block = [per_block] * n if isinstance(per_block, int) else list(per_block)
        down = [list(d) if isinstance(d, (list, tuple)) else [d] * layers[i] for i, d in enumerate(per_block)]
        reverse = config.get("reverse_transformer_layers_per_block")  # diffusers: the up blocks' own, else mirrored
        up_source = reverse if reverse else list(reversed(per_block))
        up = [list(d) if isinstance(d, (list, tuple)) else [d] * (count + 1)
              for d, count in zip(up_source, reversed(layers))]
        return cls(down, up, down[-1][0])  # diffusers gives the mid block the last down block's first depth


@dataclass
class PrunePlan:
    """What a validated spec drops: the mid block (or its attention), blocks losing their attention, layers per
    block, transformer layers per attention ((side, block, layer) -> indices; the mid block is ("mid", 0, 0))."""

    drops: list[str]
    mid: bool = False
    mid_attention: bool = False
    no_attention: set[tuple[str, int]] = field(default_factory=set)  # ("down" | "up", block index)
    layers: dict[tuple[str, int], set[int]] = field(default_factory=dict)
    transformers: dict[tuple[str, int, int], set[int]] = field(default_factory=dict)

    def dropped_layers(self, side: str, i: int) -> set[int]:
        return self.layers.get((side, i), set())

    def dropped_transformers(self, side: str, i: int, j: int) -> set[int]:
        return self.transformers.get((side, i, j), set())


def layers_per_block(config) -> list[int]:
    n, lpb = len(config["down_block_types"]), config["layers_per_block"]
    return list(lpb) if isinstance(lpb, (list, tuple)) else [lpb] * n


def prunable(config) -> list[str]:
    """Every name a spec may use on a UNet with this config."""
    depths = Depths.of(config)
    names = []
    if config.get("mid_block_type"):
        names.append("mid_block")
    if config.get("mid_block_type") == "UNetMidBlock2DCrossAttn":
        names += ["mid_block.attentions"] + [f"mid_block.attentions.0.transformer_blocks.{k}"
                                             for k in range(depths.mid)]
    for side in ("down", "up"):
        for i, block_type in enumerate(config[f"{side}_block_types"]):
            per_layer = getattr(depths, side)[i]
            if block_type in CROSS_ATTENTION:
                names.append(f"{side}_blocks.{i}.attentions")
            if block_type in CROSS_ATTENTION or block_type in PLAIN:
                names += [f"{side}_blocks.{i}.resnets.{j}" for j in range(len(per_layer))]
            if block_type in CROSS_ATTENTION:
                names += [f"{side}_blocks.{i}.attentions.{j}.transformer_blocks.{k}"
                          for j, depth in enumerate(per_layer) for k in range(depth)]
    return names


def plan_pruning(config, drops: list[str]) -> PrunePlan:
    """Validate `drops` against the UNet's structure (before any weight is touched or training starts)."""
    allowed = set(prunable(config))
    plan = PrunePlan(drops=list(dict.fromkeys(drops)))
    for name in plan.drops:
        if name not in allowed:
            in_grammar = bool(BLOCK.match(name) or TRANSFORMER.match(name)) or name in ("mid_block",
                                                                                      "mid_block.attentions")
            what = "no such block in this UNet" if in_grammar or not _looks_like_module(name) \
                else "cannot be dropped on its own"
            raise PruneSpecError(name, f"{what}; blocks that can be dropped: {_summary(prunable(config))}")
        if name == "mid_block":
            plan.mid = True
        elif name == "mid_block.attentions":
            plan.mid_attention = True
        elif m := TRANSFORMER.match(name):
            key = (m.group(1) or "mid", int(m.group(2) or 0), int(m.group(3)))
            plan.transformers.setdefault(key, set()).add(int(m.group(4)))
        else:
            m = BLOCK.match(name)
            if m.group(3) == "attentions":
                plan.no_attention.add((m.group(1), int(m.group(2))))
            else:
                plan.layers.setdefault((m.group(1), int(m.group(2))), set()).add(int(m.group(4)))
    _check_structure(config, plan)
    _check_depths(config, plan)
    return plan


def _summary(names: list[str]) -> str:
    """The droppable names, transformer layers folded per attention (SDXL has over a hundred)."""
    folded = {}
    for name in names:
        m = re.match(r"^(.*\.attentions\.\d+)\.transformer_blocks\.(\d+)$", name)
        if m:
            folded[m.group(1)] = f"{m.group(1)}.transformer_blocks.0-{m.group(2)}"
        else:
            folded[name] = name
    return ", ".join(folded.values())


def _looks_like_module(name: str) -> bool:
    return bool(re.match(r"^(mid_block|down_blocks|up_blocks|conv_in|conv_out|time_embedding)(\.|$)", name))


def _check_structure(config, plan: PrunePlan) -> None:
    """Up block K takes one skip input per resnet from its mirror, down block N-1-K (its layers, and the
    downsampler output or conv_in below it): dropping layers on one side needs as many on the other. A
    resnet that is the only one changing the channel count cannot go (the next one's weights would not fit)."""
    layers, n, width = layers_per_block(config), len(config["down_block_types"]), list(config["block_out_channels"])
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


def _check_depths(config, plan: PrunePlan) -> None:
    """Every attention keeps a transformer layer; a transformer layer is not named inside a part the spec drops
    whole; and the mid block's depth, which diffusers' config ties to the last down block's first layer,
    stays what the spec asks of it."""
    depths = Depths.of(config)
    for (side, i, j), dropped in sorted(plan.transformers.items()):
        owner = f"{side}_blocks.{i}" if side != "mid" else "mid_block"
        name = f"{owner}.attentions.{j}.transformer_blocks.{max(dropped)}"
        whole = ("mid_block" if plan.mid else "mid_block.attentions" if plan.mid_attention else None) \
            if side == "mid" else f"{owner}.attentions" if (side, i) in plan.no_attention \
            else f"{owner}.resnets.{j}" if j in plan.dropped_layers(side, i) else None
        if whole:
            raise PruneSpecError(name, f"the spec drops {whole} already, with this layer in it")
        depth = depths.mid if side == "mid" else getattr(depths, side)[i][j]
        if len(dropped) == depth:
            raise PruneSpecError(name, f"{owner}.attentions.{j} would keep no transformer layer; drop "
                                       f"{owner}.attentions to remove the attention")
    n = len(config["down_block_types"])
    if config.get("mid_block_type") != "UNetMidBlock2DCrossAttn" or plan.mid or plan.mid_attention:
        return
    kept = [j for j in range(len(depths.down[-1])) if j not in plan.dropped_layers("down", n - 1)]
    tied = depths.down[-1][kept[0]] - len(plan.dropped_transformers("down", n - 1, kept[0]))
    wanted = depths.mid - len(plan.dropped_transformers("mid", 0, 0))
    if tied != wanted:
        raise PruneSpecError("mid_block.attentions.0", f"diffusers' config gives the mid block the depth of "
                                                       f"down_blocks.{n - 1}'s first kept layer ({tied}); the spec "
                                                       f"leaves the mid block {wanted}: drop as many of its "
                                                       f"transformer layers, or mid_block.attentions")


def level_spec(config, level: int) -> list[str]:
    """The structural recipe of each pruning level, for any SD-style UNet.
    1: BK-SDM-Small's cut: the mid block, the last layer of every down block with two or more and a middle
       resnet (with its attention) of the mirror up block.
    2: level 1, and the cross-attention of the innermost stage that has any, down and up.
    3: SSD-1B's cut (SDXL -> SSD-1B exactly): the mid block to one resnet; the innermost cross-attention
       stage's stacks to ceil(0.4 x depth), down and up, but the up block's last layer; the next stage's up
       block to ceil(depth / 2) but its first layer."""
    if level not in (1, 2, 3):
        raise PruneSpecError(f"level {level}", "pruning levels are 1, 2 and 3")
    if level == 3:
        return _ssd1b_spec(config)
    spec = ["mid_block"] if config.get("mid_block_type") else []
    layers, n = layers_per_block(config), len(config["down_block_types"])
    for i, count in enumerate(layers):
        if count >= 2:
            spec += [f"down_blocks.{i}.resnets.{count - 1}", f"up_blocks.{n - 1 - i}.resnets.1"]
    if level == 2:
        inner = max(i for i, t in enumerate(config["down_block_types"]) if t in CROSS_ATTENTION)
        spec.append(f"down_blocks.{inner}.attentions")
        if config["up_block_types"][n - 1 - inner] in CROSS_ATTENTION:
            spec.append(f"up_blocks.{n - 1 - inner}.attentions")
    return spec


def _ssd1b_spec(config) -> list[str]:
    depths, n = Depths.of(config), len(config["down_block_types"])
    spec = ["mid_block.attentions"] if config.get("mid_block_type") == "UNetMidBlock2DCrossAttn" else []

    def thin(owner: str, per_layer: list[int], layers, keep) -> list[str]:
        return [f"{owner}.attentions.{j}.transformer_blocks.{k}"
                for j in layers for k in range(keep(per_layer[j]), per_layer[j])]

    inner = max(i for i, t in enumerate(config["down_block_types"]) if t in CROSS_ATTENTION)

    def to_40(depth: int) -> int:
        return math.ceil(0.4 * depth)  # SDXL: 10 -> 4

    spec += thin(f"down_blocks.{inner}", depths.down[inner], range(len(depths.down[inner])), to_40)
    k = n - 1 - inner
    if config["up_block_types"][k] in CROSS_ATTENTION:
        spec += thin(f"up_blocks.{k}", depths.up[k], range(len(depths.up[k]) - 1), to_40)
    if k + 1 < n and config["up_block_types"][k + 1] in CROSS_ATTENTION:
        spec += thin(f"up_blocks.{k + 1}", depths.up[k + 1], range(1, len(depths.up[k + 1])),
                     lambda depth: math.ceil(depth / 2))
    return spec
