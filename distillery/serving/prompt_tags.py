"""`<lora:name:weight>` in a prompt: the A1111 convention for choosing LoRAs, read by the A1111 and OpenAI APIs."""

from __future__ import annotations

import re

from distillery.sampling.plan import WEIGHT_RANGE
from distillery.serving.errors import unprocessable

# <lora:NAME> or <lora:NAME:WEIGHT>; A1111's third part (a separate UNet weight) is refused below, not dropped
TAG = re.compile(r"<lora:([^:<>]*)(?::([^<>]*))?>")


def lora_tags(prompt: str, field: str = "prompt") -> tuple[str, tuple[tuple[str, float], ...]]:
    """(the prompt without its tags, ((adapter, weight), ...) in order); a malformed tag is a 422 naming `field`."""
    found: dict[str, float] = {}
    for name, weight in TAG.findall(prompt):
        name = name.strip()
        try:
            value = 1.0 if weight.strip() == "" else float(weight)
        except ValueError:
            value = float("nan")
        if not name or not WEIGHT_RANGE[0] <= value <= WEIGHT_RANGE[1] or name in found:
            low, high = WEIGHT_RANGE
            raise unprocessable(field, f"{field}: <lora:{name}:{weight}> is not a usable LoRA tag (allowed: "
                                       f"<lora:NAME> or <lora:NAME:WEIGHT>, WEIGHT in [{low:g}, {high}], each NAME "
                                       f"once, NAME an adapter of GET /sdapi/v1/loras)")
        found[name] = value
    return " ".join(TAG.sub(" ", prompt).split()), tuple(found.items())
