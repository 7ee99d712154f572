import os
from pathlib import Path

# Triton runs on CPU only in its interpreter, which must be chosen before anything imports triton.
if not Path("/dev/nvidia0").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("DISTILLERY_TEST_THREADS", "2")))

from distillery.model import DiffusionModel  # noqa: E402
from distillery.paths import EMBEDDED_MODEL  # noqa: E402
from distillery.testing.launch import serve_subprocess  # noqa: E402


@pytest.fixture(scope="session")
def toy_model() -> DiffusionModel:
    return DiffusionModel.from_pretrained(EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def random_toy_folder(tmp_path_factory):
    """The toy architecture with random weights: for mechanics that need no trained model."""
    from diffusers import StableDiffusionPipeline

    from distillery.distill.toy import architecture

    torch.manual_seed(0)
    tokenizer = architecture.build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=architecture.build_vae(), text_encoder=architecture.build_text_encoder(len(tokenizer)), tokenizer=tokenizer,
        unet=architecture.build_unet(), scheduler=architecture.build_scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("random_toy")
    pipe.save_pretrained(folder)
    return folder


READY_WITHIN_S = 60  # the README promises an answer within a minute of `make serve`


@pytest.fixture(scope="session")
def running_server():
    """`distillery serve` (uvicorn, the embedded model) on a loopback port; yields its URL."""
    with serve_subprocess(ready_within_s=READY_WITHIN_S) as url:
        yield url
