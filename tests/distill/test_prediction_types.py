"""The step and style distillers on a v-prediction base (SD 2.x 768): the same algebra as on an eps base.

An eps UNet wrapped to output v is the same model in another parametrisation, so every loss of the step
distillers must come out the same through either; and x0 and eps from v are products, defined at zero
terminal SNR where x0 from eps divides by zero."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from distillery.adapters import AdapterRegistry
from distillery.distill.methods.consistency import ConsistencyDistillConfig, consistency_step, distill_consistency
from distillery.distill.methods.progressive import STUDENT, TEACHER, progressive_step, two_step_grid
from distillery.distill.training.ddim import eps_and_x0, noise_target, require_supported_prediction
from distillery.distill.training.loop import Batch
from distillery.distill.training.student import load_adapter_into
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.pipeline import generate

GUIDANCE = EMBEDDED_ADAPTERS / "guidance-toy"


class AsV(torch.nn.Module):
    """An eps UNet made a v-prediction one: v = sqrt(a) eps - sqrt(1 - a) x0 at its input's noise level."""

    def __init__(self, unet, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.unet, self.alphas = unet, alphas_cumprod

    def forward(self, x, t, **kwargs):
        eps = self.unet(x, t, **kwargs).sample
        a = self.alphas[t.long()].view(-1, 1, 1, 1)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)

    @property
    def time_embedding(self):
        return self.unet.time_embedding

    def disable_adapters(self):
        self.unet.disable_adapters()

    def enable_adapters(self):
        self.unet.enable_adapters()

    def set_adapter(self, name):
        self.unet.set_adapter(name)


@pytest.fixture(scope="module")
def toy():
    """The toy with guidance-toy as both the progressive teacher and the student, and a batch of two."""
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    _, teacher = load_adapter_into(model.unet, GUIDANCE, TEACHER, trainable=False)
    _, student = load_adapter_into(model.unet, GUIDANCE, STUDENT, trainable=False)
    model.unet.set_adapter(STUDENT)
    model.unet.time_embedding.cond_proj = student
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        batch = Batch(latents=torch.randn(2, *model.latent_shape(32, 32), generator=g),
                      cond=model.encode_prompts(["a red circle", "a blue square"]),
                      uncond=model.encode_prompts([None, None]), guidance=torch.tensor([1.0, 2.5]))
    return model, batch, {TEACHER: teacher, STUDENT: student}


def _as_v(scheduler_class, config):
    return scheduler_class.from_config(config), scheduler_class.from_config(config, prediction_type="v_prediction")


@torch.no_grad()
def test_consistency_loss_is_the_same_through_eps_or_v(toy):
    model, batch, _ = toy
    eps_scheduler, v_scheduler = _as_v(DDPMScheduler, model.scheduler_config)
    v_unet, cfg = AsV(model.unet, eps_scheduler.alphas_cumprod), ConsistencyDistillConfig()
    for seed in range(3):
        eps_loss = consistency_step(model.unet, model.unet, batch, eps_scheduler, cfg,
                                    torch.Generator().manual_seed(seed))
        v_loss = consistency_step(v_unet, v_unet, batch, v_scheduler, cfg, torch.Generator().manual_seed(seed))
        assert eps_loss > 0 and torch.isclose(v_loss, eps_loss, rtol=2e-3), (seed, eps_loss, v_loss)


@torch.no_grad()
def test_progressive_loss_is_the_same_through_eps_or_v(toy):
    model, batch, projections = toy
    eps_scheduler, v_scheduler = _as_v(DDIMScheduler, model.scheduler_config)
    grid = two_step_grid(eps_scheduler, 2)
    v_unet = AsV(model.unet, eps_scheduler.alphas_cumprod)
    for seed in range(3):
        eps_loss = progressive_step(model.unet, model.unet, batch, eps_scheduler, grid, projections,
                                    torch.Generator().manual_seed(seed))
        v_loss = progressive_step(v_unet, v_unet, batch, v_scheduler, grid, projections,
                                  torch.Generator().manual_seed(seed))
        assert eps_loss > 0 and torch.isclose(v_loss, eps_loss, rtol=2e-3), (seed, eps_loss, v_loss)


def test_eps_and_x0_from_v_hold_at_every_noise_level_zero_terminal_snr_included():
    scheduler = DDPMScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert scheduler.alphas_cumprod[-1] < 1e-6  # the last step is pure noise
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 800, 999])
    x_t = scheduler.add_noise(x0, noise, t)
    v = noise_target(scheduler, x0, noise, t)  # diffusers' get_velocity
    eps, x0_back = eps_and_x0(v, x_t, scheduler.alphas_cumprod[t], "v_prediction")
    torch.testing.assert_close(eps, noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_back, x0, rtol=1e-4, atol=1e-4)
    assert torch.equal(noise_target(DDPMScheduler(), x0, noise, t), noise)


def test_a_prediction_type_the_distillers_do_not_take_is_refused_naming_the_field():
    assert require_supported_prediction({"prediction_type": "v_prediction"}, "train-style") == "v_prediction"
    with pytest.raises(ValueError, match=r"distill-consistency: .* predicts 'sample' \(scheduler_config.json "
                                         r"prediction_type\); the distillers take \['epsilon', 'v_prediction'\]"):
        require_supported_prediction({"prediction_type": "sample"}, "distill-consistency")


def test_a_consistency_adapter_trains_on_a_v_prediction_zero_snr_base_and_serves(sd2_style_folder, tmp_path):
    cfg = ConsistencyDistillConfig(model=str(sd2_style_folder), data="toy:16", batch=4, warmup=0, steps=2,
                                   checkpoint_every=1, init_from="", out=str(tmp_path / "lcm"), work=str(tmp_path / "w"))
    folder = distill_consistency(cfg)
    model = DiffusionModel.from_pretrained(sd2_style_folder)
    registry = AdapterRegistry(model)
    adapter = registry.load("lcm", folder)
    out = generate(model, ["a red circle"], [0], 1.0, 4, adapters=((adapter, 1.0),), registry=registry)
    assert out.mode == "single-eval" and out.unet_evaluations == 4
    assert 0 < np.asarray(out.images[0]).std()  # a finite picture, not the black of NaN latents
