import os

import pytest
import torch

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
