"""Start `distillery serve` in a subprocess and wait until it is ready (for tests and benchmarks)."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

from distillery.serving.app import READY_LOG

READY_LINE = READY_LOG.encode()  # logged once the model is loaded and warm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_subprocess(port: int | None = None, ready_within_s: float = 60.0, env: dict[str, str] | None = None):
    """Yield the base URL once the server has logged its readiness; stop it afterwards.
    `env`: extra environment variables (settings such as DISTILLERY_QUEUE_SIZE)."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distillery.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        _wait_for_line(proc, READY_LINE, ready_within_s)
        # keep draining the log so a full pipe never blocks the server
        threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:  # stuck in shutdown: it must not outlive the test or benchmark
            proc.kill()
            proc.wait(timeout=20)


def _wait_for_line(proc: subprocess.Popen, needle: bytes, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    seen = []
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"server not ready within {within_s} s; log tail: {b''.join(seen[-20:])!r}")
            if not sel.select(remaining):
                continue
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server exited ({proc.wait()}); log tail: {b''.join(seen[-20:])!r}")
            seen.append(line)
            if needle in line:
                return
