"""soak: the real server (`distillery serve`, uvicorn) under a mixed load from concurrent HTTP clients.

16 clients (quick: 4) for 120 s (quick: 10 s) on loopback, each sending one request at a time:
every allowed image size (GET /model: multiples of size_step in [size_step, 2 x native]; the
(width, height) pairs, mostly width != height, taken in turn from one shuffled cycle over all of
them, so a long enough run asks for each), CFG and single-eval requests
(the guidance adapter, w within its range from GET /adapters), the three schedulers, 2-12 steps.
A 429 is counted apart (`rejected_429`) and the client waits its Retry-After; anything else that is
not a 200 carrying a PNG of the size and mode asked is a failure. p50/p99: latency of the 200s
(queue_p50/p99: the part of it they waited in the server's queue, from their X-Latency-Queue-Ms).
rss_growth: the server's RSS (its own /metrics gauge) at the end over the RSS after the warm-up
phase, minus 1. The warm-up ends once every allowed size has been answered (at least 10% and at
most half of the run): each new latent shape and batch size fills kernel caches once (oneDNN
primitives), which is growth a leak test must not count; rss_growth_since_10pct is measured from
10% of the run regardless, and `rss_mb` is printed as the run goes.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
from PIL import Image

from bench.common import GUIDANCE_ADAPTER
from distillery.distill.toy.data import COLOURS, SHAPES
from distillery.testing.launch import serve_subprocess

SCHEDULERS = ("ddim", "euler", "dpm")
STEPS = (2, 12)
WARMUP_FRACTION = 0.1  # the warm-up lasts at least this share of the run...
WARMUP_MAX_FRACTION = 0.5  # ...and at most this one, ending once every allowed size was answered
REQUEST_TIMEOUT_S = 180.0  # beyond the server's own 120 s request timeout (a 503 then, counted as a failure)
MAX_REQUESTS_PER_S = 50  # per client: bounds each client's loop in count as well as in time
RSS_SERIES = 'distillery_device_memory_bytes{kind="allocated",source="process_rss"}'
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    rejected_429: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    queue_ms: list[float] = field(default_factory=list)  # the server's own queue time of each 200 (X-Latency-Queue-Ms)
    failures: Counter = field(default_factory=Counter)  # kind -> count
    examples: dict[str, str] = field(default_factory=dict)  # kind -> first detail seen
    sizes_ok: set[tuple[int, int]] = field(default_factory=set)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        self.examples.setdefault(kind, detail[:300])


class Mix:
    """The request mix: sizes from one shared shuffled cycle over all (width, height) pairs; the rest per client."""

    def __init__(self, model_info: dict, adapters_info: dict):
        step, native = model_info["size_step"], model_info["native_size"]
        self.sides = list(range(step, 2 * native + 1, step))
        pairs = list(itertools.product(self.sides, self.sides))
        random.Random(0).shuffle(pairs)
        self.sizes = itertools.cycle(pairs)
        self.n_sizes = len(pairs)
        adapter = next((a for a in adapters_info["adapters"] if a["name"] == GUIDANCE_ADAPTER), None)
        if adapter is None or "w_range" not in adapter:
            raise RuntimeError(f"the server lists no resident guidance adapter {GUIDANCE_ADAPTER!r}: {adapters_info}")
        self.w_range = tuple(adapter["w_range"])

    def next(self, rng: random.Random) -> tuple[dict, tuple[int, int], str]:
        width, height = next(self.sizes)
        body = {"prompt": f"a {rng.choice(['small', 'large'])} {rng.choice(list(COLOURS))} {rng.choice(list(SHAPES))}",
                "seed": rng.randrange(2**31), "steps": rng.randint(*STEPS), "scheduler": rng.choice(SCHEDULERS),
                "width": width, "height": height}
        if rng.random() < 0.5:
            mode = "single-eval"
            body.update(guidance=round(rng.uniform(*self.w_range), 2), adapters=[{"name": GUIDANCE_ADAPTER}])
        else:
            mode = "cfg"
            body["guidance"] = round(rng.uniform(0.0, 5.0), 2)
            if rng.random() < 0.25:
                body["negative_prompt"] = f"a {rng.choice(list(COLOURS))} background"
        return body, (width, height), mode


async def _client(index: int, http: httpx.AsyncClient, url: str, mix: Mix, deadline: float, max_requests: int,
                  tally: Tally) -> None:
    """One user: one request at a time until the deadline or `max_requests`, whichever comes first."""
    rng = random.Random(1000 + index)
    for _ in range(max_requests):
        if time.monotonic() >= deadline:
            return
        body, size, mode = mix.next(rng)
        tally.requests += 1
        t0 = time.perf_counter()
        try:
            resp = await http.post(f"{url}/generate", json=body)
        except httpx.HTTPError as exc:
            tally.fail(f"transport {type(exc).__name__}", f"{exc!r} for {body}")
            continue
        latency_ms = (time.perf_counter() - t0) * 1e3
        if resp.status_code == 429:
            tally.rejected_429 += 1
            retry_after = resp.headers.get("retry-after", "")
            if not retry_after.isdigit() or int(retry_after) < 1:
                tally.fail("429 without a positive integer Retry-After", repr(retry_after))
                continue
            await asyncio.sleep(max(0.0, min(int(retry_after), deadline - time.monotonic())))
            continue
        if resp.status_code != 200:
            tally.fail(f"http {resp.status_code}", f"{resp.text[:200]} for {body}")
            continue
        problem = _image_problem(resp, size, mode)
        if problem:
            tally.fail(problem, f"for {body}")
            continue
        tally.ok += 1
        tally.latencies_ms.append(latency_ms)
        if "x-latency-queue-ms" in resp.headers:
            tally.queue_ms.append(float(resp.headers["x-latency-queue-ms"]))
        tally.sizes_ok.add(size)


def _image_problem(resp: httpx.Response, size: tuple[int, int], mode: str) -> str | None:
    """Why a 200 is not what was asked, or None: a PNG of `size` (width, height) made in `mode`."""
    if not resp.content.startswith(PNG_MAGIC):
        return "200 not a PNG"
    try:
        image = Image.open(io.BytesIO(resp.content))
        image.load()
    except Exception:  # noqa: BLE001 - any decoding error is the finding
        return "200 unreadable PNG"
    if image.size != size:
        return "200 PNG of the wrong size"
    if resp.headers.get("x-mode") != mode:
        return "200 in the wrong mode"
    return None


async def _rss_bytes(http: httpx.AsyncClient, url: str) -> float | None:
    """The server's own RSS from its /metrics (None where it reports another kind of memory, e.g. CUDA)."""
    resp = await http.get(f"{url}/metrics")
    resp.raise_for_status()
    for line in resp.text.splitlines():
        if line.startswith(RSS_SERIES + " "):
            return float(line.split()[-1])
    return None


async def _soak(url: str, clients: int, seconds: float, progress_every_s: float) -> dict:
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0), limits=limits,
                                 trust_env=False) as http, \
            httpx.AsyncClient(timeout=30.0, trust_env=False) as probe:
        mix = Mix((await probe.get(f"{url}/model")).json(), (await probe.get(f"{url}/adapters")).json())
        rss_start = await _rss_bytes(probe, url)
        tally = Tally()
        start = time.monotonic()
        deadline = start + seconds
        max_requests = int(seconds * MAX_REQUESTS_PER_S) + 1
        tasks = [asyncio.create_task(_client(i, http, url, mix, deadline, max_requests, tally)) for i in range(clients)]
        warm_at, next_report = start + WARMUP_FRACTION * seconds, start + progress_every_s
        warm_latest = start + WARMUP_MAX_FRACTION * seconds
        rss_10pct = rss_warm = None
        warm_read = False
        pending = set(tasks)
        while pending:  # every client stops by itself (deadline or count); this only watches
            now = time.monotonic()
            wake = next_report if warm_read else min(warm_at if rss_10pct is None else now + 1.0, next_report)
            _, pending = await asyncio.wait(pending, timeout=max(0.0, wake - now))
            now = time.monotonic()
            if rss_10pct is None and now >= warm_at:
                rss_10pct = await _rss_bytes(probe, url)
            if not warm_read and now >= warm_at and (len(tally.sizes_ok) == mix.n_sizes or now >= warm_latest):
                rss_warm, warm_read, warm_s = await _rss_bytes(probe, url), True, now - start
            if now >= next_report and pending:
                next_report += progress_every_s
                rss = await _rss_bytes(probe, url)
                print(f"soak {now - start:5.0f}/{seconds:.0f} s  requests {tally.requests}  ok {tally.ok}  "
                      f"sizes {len(tally.sizes_ok)}  rss {rss / 2**20 if rss else float('nan'):.0f} MB  "
                      f"429 {tally.rejected_429}  failures {sum(tally.failures.values())}"
                      + ("  (no new requests; waiting for those in flight)" if now >= deadline else ""), flush=True)
        for task in tasks:
            task.result()  # a client that crashed is a bug in this benchmark: raise it
        elapsed = time.monotonic() - start
        rss_end = await _rss_bytes(probe, url)

    failures = sum(tally.failures.values())
    if failures:
        print(f"soak: {failures} failures of {tally.requests} requests:")
        for kind, count in tally.failures.most_common():
            print(f"  {count:6d}  {kind}  e.g. {tally.examples[kind]}")
    figures = {"clients": clients, "seconds": round(elapsed, 1), "requests": tally.requests, "ok": tally.ok,
               "rejected_429": tally.rejected_429, "failures": failures,
               "failures_http": sum(n for k, n in tally.failures.items() if k.startswith("http ")),
               "failures_transport": sum(n for k, n in tally.failures.items() if k.startswith("transport ")),
               "failures_image": sum(n for k, n in tally.failures.items() if k.startswith("200 ")),
               "ok_per_s": tally.ok / elapsed, "sizes_allowed": mix.n_sizes, "sizes_ok": len(tally.sizes_ok)}
    if tally.latencies_ms:  # no 200s, no latency figures (rather than made-up ones)
        figures["p50_ms"] = float(np.percentile(tally.latencies_ms, 50))
        figures["p99_ms"] = float(np.percentile(tally.latencies_ms, 99))
    if tally.queue_ms:  # how much of that latency was waiting to enter the batch
        figures["queue_p50_ms"] = float(np.percentile(tally.queue_ms, 50))
        figures["queue_p99_ms"] = float(np.percentile(tally.queue_ms, 99))
    if rss_warm and rss_end:
        figures.update(rss_start_mb=rss_start / 2**20, rss_after_warmup_mb=rss_warm / 2**20, warmup_s=warm_s,
                       rss_end_mb=rss_end / 2**20, rss_growth=rss_end / rss_warm - 1,
                       rss_growth_since_10pct=rss_end / rss_10pct - 1)
    else:
        print("soak: the server reports no process_rss memory series; rss_growth not measured")
    return figures


def run(quick: bool = False) -> dict:
    clients, seconds, progress_every_s = (4, 10.0, 5.0) if quick else (16, 120.0, 15.0)
    with serve_subprocess(ready_within_s=120) as url:
        return asyncio.run(_soak(url, clients, seconds, progress_every_s))
