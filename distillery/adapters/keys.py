"""LoRA state dicts -> one (A, B) pair per UNet layer, through diffusers' own readers and converters.

diffusers' `lora_state_dict` reads every layout it knows (its own "lora.down/up", peft's
"lora_A/B", kohya's "lora_unet_*" with per-layer alphas) into diffusers keys, and
`convert_unet_state_dict_to_peft` names them the peft way. Internal layer keys come from the
file, never from user-given names (peft#3780: with peft's hotswap an adapter whose name is a
substring of another's keys can wipe it; here a name is only a dictionary key).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn

from distillery.adapters.files import AdapterError

SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"))


def peft_unet_lora(lora: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """The UNet's part of a LoRA state dict of any layout diffusers reads, in peft keys ("...to_q.lora_A.weight")."""
    state, alphas = StableDiffusionPipeline.lora_state_dict(dict(lora))
    if alphas:
        raise AdapterError(f"{folder}: per-layer network alphas (kohya files) are not supported yet")
    return convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})


def unet_lora_pairs(lora: dict[str, torch.Tensor], folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, B)} for the UNet's layers in a LoRA state dict of any layout diffusers reads."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_unet_lora(lora, folder).items():
        for suffix, part in SUFFIXES:
            if key.endswith(suffix):
                pairs.setdefault(key[:-len(suffix)], {})[part] = tensor
    if not pairs or any(len(p) != 2 for p in pairs.values()):
        raise AdapterError(f"{folder}: LoRA keys must come in down/up (A/B) pairs per layer")
    return {layer: (p["A"], p["B"]) for layer, p in pairs.items()}


def fit_to_layer(folder: Path, layer: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """A LoRA pair checked against its base layer, in owned memory: A (r, K) and B (N, r) for a Linear
    or a 1 x 1 conv, A (r, C, k, k) and B (N, r) for a k x k conv (peft's conv layout). Owned: copied once,
    not the file's memory map (the first write into a mapping pays page faults)."""
    if isinstance(base, nn.Linear):
        want_a, want_b = (base.in_features,), (base.out_features,)
    else:  # nn.Conv2d
        out_ch, in_ch, kh, kw = base.weight.shape
        want_a, want_b = (in_ch, kh, kw), (out_ch, 1, 1)
    if a.shape[1:] != want_a or b.shape[0] != want_b[0] or b.shape[2:] != want_b[1:] or a.shape[0] != b.shape[1]:
        raise AdapterError(f"{folder}: layer {layer!r} has A {tuple(a.shape)}, B {tuple(b.shape)}; the base "
                           f"layer's weight is {tuple(base.weight.shape)}")
    if a.dim() == 4 and a.shape[2:] == (1, 1):
        a = a.flatten(1)  # a 1 x 1 conv is linear over channels
    b = b.flatten(1)
    own = dict(device=base.weight.device, dtype=base.weight.dtype, copy=True)
    return a.to(**own).contiguous(), b.to(**own).contiguous()
