"""LoRA state dicts -> one (A, B) pair per UNet layer, through diffusers' own readers and converters.

diffusers' `lora_state_dict` reads every layout it knows (its own "lora.down/up", peft's "lora_A/B", kohya's
and A1111's "lora_unet_*" with per-layer alphas) into diffusers keys, and `convert_unet_state_dict_to_peft`
names them the peft way. A kohya layer's alpha is folded into its up factor first (B * alpha / rank, the
file's own "<layer>.alpha" beside "<layer>.lora_up.weight"): exact per layer, where diffusers' own loading
gives attention layers the file's most common alpha instead of theirs; a layer without one keeps scale 1
(alpha = rank, as in kohya and A1111). Refused with the reason, never dropped: text-encoder LoRA (prompts
are encoded without adapters, so only UNet LoRA can be applied per request), DoRA, and any key that is not
UNet LoRA down/up (LoHa, LoKr, biases, whatever diffusers leaves unconverted). Internal layer keys come
from the file, never from user-given names (peft#3780: with peft's hotswap an adapter whose name is a
substring of another's keys can wipe it; here a name is only a dictionary key).
"""

from __future__ import annotations

from pathlib import Path
from textwrap import shorten

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_unet_state_dict_to_peft
from torch import nn

from distillery.adapters.files import AdapterError

SUFFIXES = ((".lora_A.weight", "A"), (".lora_B.weight", "B"))
PEFT_KEYS = tuple(suffix for suffix, _ in SUFFIXES)
LORA_KEYS = ("down.weight", "up.weight", "lora_A.weight", "lora_B.weight", ".alpha")  # every layout diffusers reads
DOWN_KEYS = ("down.weight", "lora_A.weight")  # one per layer
TEXT_ENCODER_KEYS = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoder_2.")
DORA_KEYS = ("dora_scale", "lora_magnitude_vector")


def _some(keys: list[str]) -> str:
    return ", ".join(map(repr, keys[:3])) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _refuse_unservable(lora: dict[str, torch.Tensor], source: Path) -> None:
    """AdapterError for what a per-request UNet LoRA cannot be: text-encoder LoRA, DoRA, other networks."""
    text = [k for k in lora if k.startswith(TEXT_ENCODER_KEYS)]
    if text:
        layers = sum(k.endswith(DOWN_KEYS) for k in text)
        raise AdapterError(f"{source}: LoRA on {layers} text-encoder layers ({_some(text)}); only UNet LoRA is "
                           f"served (prompts are encoded without adapters, so a per-request text-encoder LoRA "
                           f"cannot be applied): use a UNet-only LoRA (kohya: --network_train_unet_only)")
    dora = [k for k in lora if any(part in k for part in DORA_KEYS)]
    if dora:
        raise AdapterError(f"{source}: DoRA ({_some(dora)}) is not supported: it rescales each layer's merged weight "
                           f"by a learned magnitude, which is no low-rank term added to W0; only plain LoRA is served")
    unknown = [k for k in lora if not k.endswith(LORA_KEYS)]
    if unknown:
        raise AdapterError(f"{source}: not LoRA down/up weights or alphas: {_some(unknown)} (LoHa, LoKr and other "
                           f"networks are not served, nor LoRA biases)")


def _fold_kohya_alphas(lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each "<layer>.alpha" folded into "<layer>.lora_up.weight" as alpha / rank (the rank: lora_down's rows)."""
    folded = dict(lora)
    for key in [k for k in lora if k.endswith(".alpha")]:
        layer = key[:-len(".alpha")]
        down, up = lora.get(f"{layer}.lora_down.weight"), lora.get(f"{layer}.lora_up.weight")
        if down is not None and up is not None:
            alpha = folded.pop(key).item() or down.shape[0]  # alpha 0 means none, as in kohya: scale 1
            folded[f"{layer}.lora_up.weight"] = up.float() * (alpha / down.shape[0])  # fp32: files are often fp16
    return folded


def peft_unet_lora(lora: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """The UNet LoRA of a state dict of any layout diffusers reads, in peft keys ("...to_q.lora_A.weight"), each
    kohya alpha folded into its B. AdapterError naming `source` for anything that is not UNet LoRA down/up."""
    _refuse_unservable(lora, source)
    try:
        state, alphas = StableDiffusionPipeline.lora_state_dict(_fold_kohya_alphas(lora))
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError) as exc:  # the converters' own errors
        raise AdapterError(f"{source}: diffusers cannot convert this LoRA file: "
                           f"{shorten(f'{type(exc).__name__}: {exc}', 400)}") from None
    if alphas:  # never today: diffusers takes an alpha only beside its layer's lora_down/up, folded above
        raise AdapterError(f"{source}: per-layer alphas left unfolded: {_some(list(alphas))}")
    peft = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})
    left = [k for k in state if not k.startswith("unet.")] + [k for k in peft if not k.endswith(PEFT_KEYS)]
    if left:
        raise AdapterError(f"{source}: not UNet LoRA down/up weights after diffusers' conversion: {_some(left)}")
    return peft


def unet_lora_pairs(lora: dict[str, torch.Tensor], source: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (A, B)} for the UNet's layers in a LoRA state dict of any layout diffusers reads (see
    `peft_unet_lora`); ranks may differ per layer."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in peft_unet_lora(lora, source).items():
        suffix, part = next((s, p) for s, p in SUFFIXES if key.endswith(s))
        pairs.setdefault(key[:-len(suffix)], {})[part] = tensor
    if not pairs:
        raise AdapterError(f"{source} holds no UNet LoRA weights")
    unpaired = [layer for layer, p in pairs.items() if len(p) != 2]
    if unpaired:
        raise AdapterError(f"{source}: LoRA keys must come in down/up (A/B) pairs per layer; unpaired: "
                           f"{_some(unpaired)}")
    return {layer: (p["A"], p["B"]) for layer, p in pairs.items()}


def fit_to_layer(folder: Path, layer: str, base: nn.Module, a: torch.Tensor, b: torch.Tensor):
    """A LoRA pair checked against its base layer, in owned memory: A (r, K) and B (N, r) for a Linear
    or a 1 x 1 conv, A (r, C, k, k) and B (N, r, 1, 1) for a k x k conv (peft's conv layout), r >= 1, finite.
    Owned: copied once, not the file's memory map (the first write into a mapping pays page faults)."""
    if isinstance(base, nn.Linear):
        want_a, want_b = (base.in_features,), (base.out_features,)
    else:  # nn.Conv2d
        out_ch, in_ch, kh, kw = base.weight.shape
        want_a, want_b = (in_ch, kh, kw), (out_ch, 1, 1)
    shapes = f"A {tuple(a.shape)}, B {tuple(b.shape)}; the base layer's weight is {tuple(base.weight.shape)}"
    if a.dim() != 1 + len(want_a) or b.dim() != 1 + len(want_b):
        raise AdapterError(f"{folder}: layer {layer!r} has {shapes}: A must be {1 + len(want_a)}-D and B "
                           f"{1 + len(want_b)}-D for a {type(base).__name__}")
    if a.shape[0] != b.shape[1] or a.shape[0] < 1:
        raise AdapterError(f"{folder}: layer {layer!r} has {shapes}: A's rows and B's columns are the rank, the same "
                           f"number, at least 1")
    if a.shape[1:] != want_a or b.shape[0] != want_b[0] or b.shape[2:] != want_b[1:]:
        raise AdapterError(f"{folder}: layer {layer!r} has {shapes}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise AdapterError(f"{folder}: layer {layer!r} holds NaN or infinite values")
    if a.dim() == 4 and a.shape[2:] == (1, 1):
        a = a.flatten(1)  # a 1 x 1 conv is linear over channels
    b = b.flatten(1)
    own = {"device": base.weight.device, "dtype": base.weight.dtype, "copy": True}
    return a.to(**own).contiguous(), b.to(**own).contiguous()
