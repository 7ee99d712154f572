"""Helpers shared by benchmarks: the embedded model with its guidance adapter, interleaved timing."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from distillery.adapters import AdapterRegistry, LoadedAdapter
from distillery.model import DiffusionModel, unet_fingerprint
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import guidance_embedding
from distillery.testing.sd15 import sd15_scheduler, sd15_unet
from distillery.testing.synthetic_adapters import write_random_adapter

GUIDANCE_ADAPTER = "guidance-toy"
CONSISTENCY_ADAPTER = "lcm-toy"
PROGRESSIVE_ADAPTER = "progressive-toy-{}"  # one per trained step count
STYLE_ADAPTER = "stripes-toy"


def toy_with_guidance_adapter() -> tuple[DiffusionModel, AdapterRegistry, LoadedAdapter]:
    """The embedded model, served (its registry installed the serving layers), with the guidance adapter."""
    model, registry, adapters = toy_with_adapters([GUIDANCE_ADAPTER])
    return model, registry, adapters[GUIDANCE_ADAPTER]


def toy_with_adapters(names: list[str], folder: Path = EMBEDDED_MODEL,
                      ) -> tuple[DiffusionModel, AdapterRegistry, dict[str, LoadedAdapter]]:
    """The embedded model (or the one at `folder`), served, with the shipped adapters `names` resident."""
    model = DiffusionModel.from_pretrained(folder)
    registry = AdapterRegistry(model)
    return model, registry, {name: registry.load(name, EMBEDDED_ADAPTERS / name) for name in names}


def progressive_adapters() -> dict[int, str]:
    """The shipped progressive adapters by their step count."""
    return {int(p.name.rsplit("-", 1)[1]): p.name
            for p in sorted(EMBEDDED_ADAPTERS.glob(PROGRESSIVE_ADAPTER.format("*")))}


def sd15_with_adapter(folder: Path, quick: bool, kind: str, rank: int) -> tuple[DiffusionModel, AdapterRegistry, LoadedAdapter]:
    """A random-weight SD-1.5-shaped UNet (quick: narrow channels) with a random adapter of `kind`, served."""
    torch.manual_seed(0)
    unet = (sd15_unet(block_out_channels=(32, 32, 64, 64)) if quick else sd15_unet()).eval().requires_grad_(False)
    model = DiffusionModel(unet, None, None, None, dict(sd15_scheduler().config), {}, unet_fingerprint(unet))
    write_random_adapter(folder / "adapter", unet, model.fingerprint, kind=kind, rank=rank, std=0.01)
    registry = AdapterRegistry(model)
    return model, registry, registry.load("sd15-" + kind, folder / "adapter")


def interleaved_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                        device: torch.device | None = None, events: bool = True) -> dict[str, float]:
    """Median seconds of each callable, run A B A B ... so drift hits all of them alike.

    On a CUDA `device`, `events`: timed by CUDA events around the call, the stream idle before each (the GPU's
    wait for the host's launches counts, as it does for a user); otherwise wall clock, on CUDA between two
    synchronizations (whole images, host work included)."""
    cuda = device is not None and device.type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    if cuda:
        torch.cuda.synchronize(device)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            if cuda and events:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[k].append(start.elapsed_time(end) / 1e3)
                continue
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


async def timed_submits(engine, jobs: list) -> list[float]:
    """One client: submit `jobs` to the engine one after another; each one's latency in seconds."""
    latencies = []
    for job in jobs:
        t0 = time.perf_counter()
        await engine.submit(job)
        latencies.append(time.perf_counter() - t0)
    return latencies


def image_parts(model: DiffusionModel, registry: AdapterRegistry, adapter: LoadedAdapter, prompt: str, w: float,
                rounds: int) -> dict[str, float]:
    """Median seconds of an image's components, each as its sampler runs it: a UNet call of W0 alone and of
    the student at batch 1, the CFG teacher's batch-2 call, text encoding of 1 and 2 prompts, decoding."""
    shape = model.latent_shape(model.default_size, model.default_size)
    x1, x2 = torch.randn(1, *shape), torch.randn(2, *shape)
    size = (model.default_size, model.default_size)
    text1, text2 = model.encode_prompts([prompt]).sized(*size), model.encode_prompts([prompt, None]).sized(*size)
    t = torch.tensor(500)

    def unet_call(x, text, row_sets):
        with torch.no_grad(), registry.active(row_sets):
            model.unet(x, t, **text.unet_kwargs(), timestep_cond=guidance_embedding(torch.full((len(x),), w)))

    return interleaved_medians({
        "unet_b1_base": lambda: unet_call(x1, text1, [()]),
        "unet_b1_student": lambda: unet_call(x1, text1, [((adapter, 1.0),)]),
        "unet_b2_teacher": lambda: unet_call(x2, text2, [(), ()]),
        "text_1": lambda: model.encode_prompts([prompt]), "text_2": lambda: model.encode_prompts([prompt, None]),
        "decode": lambda: model.decode(x1),
    }, rounds)


def image_limit(parts: dict[str, float], b1: float, student_steps: int, teacher_steps: int) -> float:
    """The best whole-image latency ratio of a single-eval student over the CFG teacher, from component times."""
    teacher = parts["text_2"] + teacher_steps * parts["unet_b2_teacher"] + parts["decode"]
    return (parts["text_1"] + student_steps * b1 + parts["decode"]) / teacher
