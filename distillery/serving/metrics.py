"""Prometheus metrics, prefix distillery_; each is listed once in docs/metrics.md.

Events (requests, steps, errors) are counted where they happen; state (device memory, the
adapters resident, loads and evictions, the queue) is read at scrape time by a custom
collector, so no route has to remember to refresh a gauge.
"""

from __future__ import annotations

from collections.abc import Sized

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from distillery.serving.memory import device_memory, memory_kind

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class StateCollector:
    """Device memory, and (once `watch` was called) the adapter residency and the queue, read per scrape."""

    def __init__(self):
        self.adapters = None  # the engine's AdapterRegistry
        self.queue: Sized = ()

    def collect(self):
        memory = GaugeMetricFamily("distillery_device_memory_bytes",
                                   "Device memory (CUDA allocator, or process RSS on CPU)", labels=["kind", "source"])
        source = memory_kind()
        for kind, value in device_memory().items():
            memory.add_metric([kind, source], value)
        yield memory
        yield GaugeMetricFamily("distillery_queue_depth", "Requests waiting to enter the batch", value=len(self.queue))
        if self.adapters is None:
            return
        figures = self.adapters.figures()
        yield GaugeMetricFamily("distillery_adapters_resident", "Adapters resident in device memory",
                                value=figures["resident"])
        yield GaugeMetricFamily("distillery_adapters_resident_bytes", "Bytes of resident adapter weights",
                                value=figures["resident_bytes"])
        yield CounterMetricFamily("distillery_adapter_loads", "Adapter loads from disk", value=figures["loads"])
        yield CounterMetricFamily("distillery_adapter_evictions", "Adapters evicted by the byte budget",
                                  value=figures["evictions"])
        yield from lora_backend_metrics(self.adapters.choice)


def lora_backend_metrics(choice):
    """The LoRA backends' start-up timings and which one each kind of call runs on (adapters/backends/choice.py)."""
    timings = GaugeMetricFamily("distillery_lora_backend_ms", "Median ms of one UNet call of the configured batch "
                                "per LoRA backend and kind of call, timed at start-up", labels=["backend", "case"])
    for case, times in choice.timings_ms.items():
        for backend, ms in times.items():
            timings.add_metric([backend, case], ms)
    yield timings
    chosen = GaugeMetricFamily("distillery_lora_backend_chosen", "1 for the LoRA backend each kind of call runs on",
                               labels=["backend", "case"])
    for case in ("one_set", "mixed"):
        chosen.add_metric([getattr(choice, case), case], 1)
    yield chosen


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Histogram("distillery_request_latency_seconds", "Request latency from enqueue to answer",
                                  ["mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_rows = Histogram("distillery_batch_rows", "UNet rows per engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.unet_evaluations = Counter("distillery_unet_evaluations", "UNet rows evaluated", registry=r)
        self.errors = Counter("distillery_errors", "Errors by type", ["type"], registry=r)
        self.state = StateCollector()
        r.register(self.state)
        ProcessCollector(registry=r)  # the standard process_* figures (RSS, CPU seconds, open files)

    def exposition(self) -> bytes:
        """Prometheus text format of every metric here."""
        return generate_latest(self.registry)

    def watch(self, adapters, queue: Sized) -> None:
        """Report these adapters' residency and this queue's length at every scrape."""
        self.state.adapters, self.state.queue = adapters, queue
