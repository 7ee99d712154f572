"""What the GPU suite (bench/gpu_*.py, `python -m bench gpu`) shares: its model, its timing, its setup record.

On CUDA: SD-1.5-shaped components with random weights (UNet ~860M, VAE, CLIP ViT-L/14 text encoder, from
distillery/testing/sd15.py) in fp16, 512x512 images (64x64 latents), built on the GPU; the embedded toy
model's tokenizer stands in for CLIP's (ids within the vocabulary, 77 tokens). Random weights are all a
benchmark of time needs.
With `--device cpu --quick` (the CPU smoke path `make test` runs, so the suite cannot rot where no GPU is):
the same code on the embedded toy model in fp32, 1-2 steps; recorded as `<bench>_cpu_smoke`, never as GPU
figures (its numbers only show that the code runs).
"""

from __future__ import annotations

import copy
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from bench import common
from distillery.adapters import LORA_FILE
from distillery.kernels import backend
from distillery.model import DiffusionModel, unet_fingerprint
from distillery.paths import EMBEDDED_MODEL
from distillery.testing.sd15 import sd15_scheduler, sd15_text_encoder, sd15_unet, sd15_vae
from distillery.testing.synthetic_adapters import write_random_adapter

PROMPT = "a small blue triangle on a yellow background"
W = 2.0  # guidance weight (diffusers' guidance_scale = 1 + w)


@dataclass(frozen=True)
class Plan:
    """Where and how big: the GPU run (full or quick) or the CPU smoke run."""

    device: torch.device
    quick: bool

    @property
    def smoke(self) -> bool:
        return self.device.type != "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.float16

    def pick(self, full, quick, smoke):
        """A size for this run: the GPU figures (full), the GPU quick mode, the CPU smoke path."""
        return smoke if self.smoke else quick if self.quick else full

    @property
    def rank(self) -> int:
        return self.pick(64, 64, 8)  # the toy's layers are 32-96 wide


def plan_for(device: str, quick: bool) -> Plan:
    """The run's plan; called first by each benchmark's run() (in a benchmark process, never at import)."""
    # diffusers warns of keys "missing" for the adapters already loaded when it loads another (they are not:
    # each adapter's layers and weights are checked against its file, check_peft_adapter) and of dtype casts
    diffusers_logging.set_verbosity_error()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the GPU suite needs a CUDA GPU; this machine has none (CPU smoke path: --device cpu --quick)")
    if dev.type != "cuda" and not quick:
        raise ValueError("the GPU suite on CPU is a smoke run only: --device cpu needs --quick")
    return Plan(dev, quick)


def base_model(plan: Plan) -> DiffusionModel:
    """The unserved model (no serving layers yet): SD-1.5 shapes in fp16 on CUDA, the toy in fp32 on CPU."""
    if plan.smoke:
        return DiffusionModel.from_pretrained(EMBEDDED_MODEL, device=plan.device, dtype=plan.dtype)
    torch.manual_seed(0)
    with torch.device(plan.device):  # initialised on the GPU: seconds, not a minute of CPU init
        unet, vae, text_encoder = sd15_unet(), sd15_vae(), sd15_text_encoder()
    for module in (unet, vae, text_encoder):
        module.to(dtype=plan.dtype).eval().requires_grad_(False)
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL, subfolder="tokenizer")
    tokenizer.model_max_length = text_encoder.config.max_position_embeddings  # 77, as SD 1.5's
    return DiffusionModel(unet, vae, text_encoder, tokenizer, dict(sd15_scheduler().config), {}, unet_fingerprint(unet))


def stock_unet(model: DiffusionModel):
    """A copy of the base UNet before any registry wraps it: what diffusers and peft run on (same weights)."""
    return copy.deepcopy(model.unet)


def random_adapter(plan: Plan, folder: Path, model: DiffusionModel, kind: str = "style", seed: int = 0) -> Path:
    """A random adapter at the suite's rank on distillery's default targets (attention and feed-forward Linears)."""
    return write_random_adapter(folder, model.unet, model.fingerprint, kind=kind, rank=plan.rank, std=0.01, seed=seed)


def lora_layers(folder: Path) -> set[str]:
    """The layers an adapter folder's LoRA file holds."""
    return {k.removeprefix("unet.").rsplit(".lora", 1)[0] for k in load_file(str(Path(folder) / LORA_FILE))}


def peft_layers(unet, adapter_name: str) -> set[str]:
    """The layers peft injected adapter `adapter_name` into (a LoraLayer holding it)."""
    return {n for n, m in unet.named_modules() if hasattr(m, "lora_A") and adapter_name in m.lora_A}


def check_peft_adapter(unet, adapter_name: str, folder: Path) -> None:
    """Raise unless peft holds adapter `adapter_name` in exactly the file's layers, with the file's weights:
    a comparison with peft/diffusers is like for like only then."""
    lora = load_file(str(Path(folder) / LORA_FILE))
    modules = dict(unet.named_modules())
    injected = peft_layers(unet, adapter_name)
    if injected != lora_layers(folder):
        raise RuntimeError(f"peft took adapter {adapter_name!r} into {len(injected)} layers, its file holds "
                           f"{len(lora_layers(folder))}")
    for layer in injected:
        got_a, got_b = modules[layer].lora_A[adapter_name].weight, modules[layer].lora_B[adapter_name].weight
        want_a, want_b = (lora[f"unet.{layer}.lora.{k}.weight"].to(got_a.device, got_a.dtype) for k in ("down", "up"))
        if not (torch.equal(got_a, want_a.reshape(got_a.shape)) and torch.equal(got_b, want_b.reshape(got_b.shape))):
            raise RuntimeError(f"peft's adapter {adapter_name!r} holds other weights than its file in layer {layer!r}")


def to_plan(plan: Plan, module):
    """`module` on the plan's device and dtype (cast only if needed: diffusers warns on every cast)."""
    if any(p.device != plan.device or p.dtype != plan.dtype for p in module.parameters()):
        module.to(device=plan.device, dtype=plan.dtype)
    return module


def with_peft_adapters(plan: Plan, stock, folders: dict[str, Path]):
    """A copy of the stock UNet with each folder loaded as a peft adapter through diffusers' load_lora_adapter
    (distillery.distill.training.student's loader: every layer, attention ones included), checked layer by layer."""
    from distillery.distill.training.student import load_adapter_into

    unet = copy.deepcopy(stock)
    for name, folder in folders.items():
        with warnings.catch_warnings():  # peft: "Already found a peft_config ... multiple adapters": as meant
            warnings.simplefilter("ignore", UserWarning)
            load_adapter_into(unet, folder, name, trainable=False)
    to_plan(plan, unet).eval().requires_grad_(False)
    for name, folder in folders.items():
        check_peft_adapter(unet, name, folder)
    return unet


def interleaved_medians(plan: Plan, fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        events: bool = True) -> dict[str, float]:
    """bench.common's, on the plan's device (CUDA events or synchronized wall clock)."""
    return common.interleaved_medians(fns, rounds, warmup, device=plan.device, events=events)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def setup(plan: Plan) -> dict:
    """What the figures were measured on (bench/__main__.py records it with the environment)."""
    cuda = plan.device.type == "cuda"
    return {
        "suite": "cpu smoke (NOT GPU figures)" if plan.smoke else ("gpu quick" if plan.quick else "gpu"),
        "device": torch.cuda.get_device_name(plan.device) if cuda else "cpu",
        "dtype": str(plan.dtype).removeprefix("torch."),
        "model": "toy (models/toy)" if plan.smoke else "SD-1.5-shaped, random weights, 512x512 (64x64 latents)",
        "lora_rank": plan.rank, "lora_backend": backend(plan.device),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "triton": _version("triton"),
        "diffusers": _version("diffusers"), "peft": _version("peft"), "transformers": _version("transformers"),
    }
