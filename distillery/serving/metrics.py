"""Prometheus metrics, prefix distillery_; each is listed once in docs/metrics.md."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from distillery.serving.memory import device_memory, memory_kind

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Histogram("distillery_request_latency_seconds", "Request latency from enqueue to answer",
                                  ["mode", "outcome"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("distillery_queue_depth", "Requests waiting to enter the batch", registry=r)
        self.batch_rows = Histogram("distillery_batch_rows", "UNet rows per engine step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.unet_evaluations = Counter("distillery_unet_evaluations", "UNet rows evaluated", registry=r)
        self.memory = Gauge("distillery_device_memory_bytes", "Device memory (CUDA allocator, or process RSS on CPU)",
                            ["kind", "source"], registry=r)
        self.adapters_resident = Gauge("distillery_adapters_resident", "Adapters resident in device memory", registry=r)
        self.adapter_bytes = Gauge("distillery_adapters_resident_bytes", "Bytes of resident adapter weights", registry=r)
        self.adapter_loads = Counter("distillery_adapter_loads", "Adapter loads from disk", registry=r)
        self.adapter_evictions = Counter("distillery_adapter_evictions", "Adapters evicted by the byte budget",
                                         registry=r)
        self.errors = Counter("distillery_errors", "Errors by type", ["type"], registry=r)
        self._loads_seen = self._evictions_seen = 0
        self.observe_memory()

    def observe_memory(self) -> None:
        source = memory_kind()
        for kind, value in device_memory().items():
            self.memory.labels(kind, source).set(value)

    def observe_registry(self, registry) -> None:
        self.adapters_resident.set(len(registry.resident))
        self.adapter_bytes.set(registry.resident_bytes)
        self.adapter_loads.inc(registry.loads - self._loads_seen)
        self.adapter_evictions.inc(registry.evictions - self._evictions_seen)
        self._loads_seen, self._evictions_seen = registry.loads, registry.evictions
