"""What the engine takes and gives: a Job, its Result, the reasons it refuses one, and its torch thread."""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from distillery.adapters import AdapterSet
from distillery.sampling.pipeline import Denoising
from distillery.sampling.plan import SamplingPlan
from distillery.serving.memory import MemoryTracker

log = logging.getLogger("distillery.jobs")


class QueueFull(Exception):
    """The queue holds `queue_size` requests already: 429 with Retry-After."""


class RequestTimeout(Exception):
    """Not answered within the request timeout (queued and running): 503 with Retry-After."""


class EngineUnavailable(Exception):
    """Not warmed up yet, stopping, or its worker died: 503 with Retry-After."""


# Every torch call of the server runs on this ONE thread. Each thread that enters torch gets its
# own OpenMP pool, and once a process has two, every parallel region in it ran ~2.4x slower on
# this 2-core machine (measured: a toy generation 0.5 s -> 1.2 s, whichever thread ran it).
TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distillery-torch")


async def on_torch_thread(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(TORCH_THREAD, fn, *args)


SEED_RANGE = 2**32  # a seed the server picks: what A1111 and ComfyUI users are used to seeing


def random_seed() -> int:
    """For a request that gives none; reported back, so the image can be made again."""
    return secrets.randbelow(SEED_RANGE)


@dataclass(frozen=True)
class Job:
    """One image as a client asked for it, in the native API's names (None: the plan's default). The engine's
    Result carries it back settled: every None replaced by what the plan chose."""

    prompt: str
    guidance: float | None
    steps: int | None
    seed: int
    scheduler: str | None = None
    adapters: tuple[tuple[str, float], ...] = ()
    height: int | None = None
    width: int | None = None
    negative_prompt: str = ""
    guidance_rescale: float | None = None  # CFG's std rescale; None: the model's
    eta: float = 0.0  # DDIM's eta (the A1111 API's); other schedulers take none


@dataclass
class Result:
    image: object  # PIL.Image
    job: Job
    mode: str
    unet_evaluations: int
    timings_ms: dict[str, float]
    peak_memory: dict[str, float]

    @property
    def png(self) -> bytes:
        return self.encoded()

    def encoded(self, fmt: str = "png", quality: int | None = None) -> bytes:
        """PNG (or JPEG / WebP at `quality`) bytes of the image."""
        buf = io.BytesIO()
        self.image.save(buf, format=fmt.upper(), **({"quality": quality} if quality is not None else {}))
        return buf.getvalue()


@dataclass(eq=False)  # identity: the queue finds and removes this very request
class InFlight:
    """A job inside the engine: waiting, then in flight, until it is answered."""

    job: Job  # settled by the plan
    plan: SamplingPlan
    adapters: AdapterSet
    future: asyncio.Future
    enqueued: float
    cost: float  # native-size rows: UNet rows x latent pixels / the model's native latent pixels
    denoising: Denoising | None = None
    started: float = 0.0
    overtaken: int = 0  # later requests admitted while this one waited (admission.py: MAX_OVERTAKES)
    image: object = None
    memory: MemoryTracker = field(default_factory=MemoryTracker)
    on_step: Callable[[int, int], None] | None = None  # (steps done, steps): live progress, on the event loop

    def report_step(self) -> None:
        """Tell the caller's `on_step` (on the event loop); a callback that raises never stops the engine."""
        if self.on_step is not None:
            try:
                self.on_step(self.denoising.sampler.step_index, len(self.denoising.sampler.timesteps))
            except Exception:
                log.exception("a progress listener failed")

    @property
    def rows(self) -> int:
        return self.plan.rows_per_step
