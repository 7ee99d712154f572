"""The engine's stepping, on the torch thread: start the admitted requests (prompts encoded together,
samplers made), one step for everything in flight (pipeline.unet_step: one UNet call per latent shape
in throughput mode, one per image row in deterministic mode), decoding, and each answer's Result.

No request fails because of another: a failing shared UNet call or decode is retried request by
request, and only a request that fails alone gets the error.
"""

from __future__ import annotations

import logging

import torch

from distillery.adapters import AdapterRegistry
from distillery.model import DiffusionModel
from distillery.sampling.pipeline import encode_together, finish_denoising, start_denoising, unet_step
from distillery.serving.jobs import InFlight, Result
from distillery.serving.memory import step_peak
from distillery.serving.metrics import Metrics

log = logging.getLogger("distillery.engine")

Failed = list[tuple[InFlight, Exception]]


class NonFiniteLatents(RuntimeError):
    """A request's own sampling diverged: it fails alone, never answered as a black image."""


class Stepping:
    def __init__(self, model: DiffusionModel, registry: AdapterRegistry, metrics: Metrics, deterministic: bool):
        self.model, self.registry, self.metrics, self.deterministic = model, registry, metrics, deterministic

    def start(self, items: list[InFlight]) -> Failed:
        """Encode the admitted requests' prompts (throughput mode: in one text-encoder call) and make their
        samplers; returns those that failed to start."""
        encoded = [None] * len(items)
        if not self.deterministic and len(items) > 1:
            try:
                texts, ms = encode_together(self.model, [i.plan.prompts(i.job.prompt) for i in items])
                encoded = [(text, ms) for text in texts]
            except Exception:  # noqa: BLE001 - each request encodes alone below, and fails alone
                log.exception("encoding %d prompts together failed; encoding them one by one", len(items))
        failed = []
        for item, enc in zip(items, encoded):
            try:
                item.denoising = start_denoising(self.model, item.job.prompt, item.job.seed, item.plan, item.adapters,
                                                 encoded=enc, eta=item.job.eta)
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                failed.append((item, exc))
        return failed

    def step(self, active: list[InFlight]) -> tuple[list[InFlight], Failed]:
        """One step for all in flight: (finished and decoded, failed). If a shared UNet call fails (nothing has
        advanced then), each request steps alone, and only those that fail alone fail."""
        try:
            failed = self._unet_step(active)
        except Exception:  # noqa: BLE001 - find the request that fails alone
            log.exception("a batched step failed; stepping its %d requests one by one", len(active))
            failed = []
            for item in active:
                try:
                    failed += self._unet_step([item])
                except Exception as exc:  # noqa: BLE001
                    failed.append((item, exc))
        finished = [a for a in active if a.denoising.sampler.done and not any(a is f for f, _ in failed)]
        broken = [a for a in finished if not torch.isfinite(a.denoising.sampler.latents).all()]
        failed += [(a, NonFiniteLatents("the sampler produced NaN or infinite latents: no image is answered for them "
                                        "(the plan refuses the schedules known to do it)")) for a in broken]
        failed += self._decode([a for a in finished if a not in broken])
        peak = step_peak()  # this step's and its decode's: every request in the batch had its share in it
        for item in active:
            item.memory.sample(peak)
        return [a for a in finished if a.image is not None and a not in broken], failed

    def _unet_step(self, items: list[InFlight]) -> Failed:
        """unet_step over the items; returns the items whose own scheduler step failed."""
        failed = unet_step(self.model, self.registry, [a.denoising for a in items], self.deterministic)
        rows = sum(a.rows for a in items)
        self.metrics.batch_rows.observe(rows)
        self.metrics.unet_evaluations.inc(rows)
        return [(next(a for a in items if a.denoising is den), exc) for den, exc in failed]

    def _decode(self, finished: list[InFlight]) -> Failed:
        """Decode the finished requests' latents into their `image` (throughput mode: one VAE call per shape)."""
        try:
            images = finish_denoising(self.model, [a.denoising for a in finished], together=not self.deterministic)
        except Exception:  # noqa: BLE001 - decode one by one: only a request that fails alone fails
            log.exception("decoding %d images together failed; decoding them one by one", len(finished))
            images, failed = [], []
            for item in finished:
                try:
                    images += finish_denoising(self.model, [item.denoising])
                except Exception as exc:  # noqa: BLE001
                    images.append(None)
                    failed.append((item, exc))
        else:
            failed = []
        for item, image in zip(finished, images):
            item.image = image
        return failed


def result_of(item: InFlight, now: float) -> Result:
    """A finished request's answer: its image, the settled job, and where its time went."""
    den = item.denoising
    timings = {"queue": (item.started - item.enqueued) * 1e3, **den.timings_ms, "total": (now - item.enqueued) * 1e3}
    timings["denoise"] = (now - item.started) * 1e3 - den.timings_ms["text_encode"] - den.timings_ms["decode"]
    return Result(item.image, item.job, den.mode, den.unet_evaluations, timings, item.memory.peak())
