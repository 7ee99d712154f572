import os
import socket
import subprocess
import sys
import time

from pathlib import Path

# Triton runs on CPU only in its interpreter, which must be chosen before anything imports triton.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DISTILLERY_TEST_THREADS", "2")))

from server.config import EMBEDDED_MODEL  # noqa: E402
from server.model import DiffusionModel  # noqa: E402


@pytest.fixture(scope="session")
def toy_model() -> DiffusionModel:
    return DiffusionModel.from_pretrained(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def random_toy_folder(tmp_path_factory):
    """The toy architecture with random weights: for mechanics that need no trained model."""
    from diffusers import StableDiffusionPipeline

    from distill import toy_model

    torch.manual_seed(0)
    tokenizer = toy_model.build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=toy_model.build_vae(), text_encoder=toy_model.build_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=toy_model.build_unet(), scheduler=toy_model.build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("random_toy")
    pipe.save_pretrained(folder)
    return folder


READY_WITHIN_S = 60  # the README promises an answer within a minute of `make serve`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def running_server():
    """`distillery serve` (uvicorn, the embedded model) on a loopback port; yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "distill.cli", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_WITHIN_S
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"server not ready within {READY_WITHIN_S} s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
