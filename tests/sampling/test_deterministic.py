"""The two modes of pipeline.unet_step.

Deterministic mode: a request's result is bit-identical alone and among any other requests (other
timesteps, w, adapter sets incl. LoRA on 1 x 1 and 3 x 3 convolutions, composed and weighted sets,
schedulers, image sizes), because every UNet call holds one image row whose inputs are made from
that request alone: each operation then sees the same shapes, strides and values, so the guarantee
does not rest on a BLAS rounding every M or operand layout alike (it differs by CPU vendor).
Throughput mode: rows batched per latent shape, equal to the row alone within float tolerance.
"""

import random

import pytest
import torch

from distillery.adapters import AdapterRegistry
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.pipeline import start_denoising, unet_step
from distillery.sampling.plan import SamplingPlan
from distillery.testing.synthetic_adapters import write_random_adapter

CONV_TARGETS = ["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out", "time_emb_proj",
                "downsamplers.0.conv", "upsamplers.0.conv"]
SIZES = [(32, 32), (24, 64), (64, 40), (16, 32)]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    registry = AdapterRegistry(model)
    tmp = tmp_path_factory.mktemp("adapters")
    g = registry.load("g", EMBEDDED_ADAPTERS / "guidance-toy")
    s1 = registry.load("s1", write_random_adapter(tmp / "s1", model.unet, model.fingerprint, rank=8, seed=1))
    s2 = registry.load("s2", write_random_adapter(tmp / "s2", model.unet, model.fingerprint, rank=4, seed=2,
                                                  targets=CONV_TARGETS))
    assert any(a.dim() == 4 for a, _ in s2.layers.values())  # 3 x 3 conv LoRA present
    lcm = registry.load("lcm", EMBEDDED_ADAPTERS / "lcm-toy")  # LCM: noise between steps, from the request's seed
    sets = [(), ((g, 1.0),), ((s1, 0.7),), ((g, 1.0), (s1, 0.5)), ((s2, 1.0),), ((g, 1.0), (s2, 0.8), (s1, 0.3)),
            ((lcm, 1.0), (s1, 0.6))]
    return model, registry, sets


def _request(model, sets, seed: int, size=(32, 32)):
    rng = random.Random(seed)
    chosen = sets[seed % len(sets)]
    lcm = any(a.meta.kind == "consistency" for a, _ in chosen)
    steps, scheduler = (rng.randrange(2, 9), "lcm") if lcm else (rng.randrange(2, 30), rng.choice(["ddim", "euler", "dpm"]))
    distilled = next((a for a, _ in chosen if a.single_eval), None)
    plan = SamplingPlan(rng.uniform(0, 5), steps, scheduler, distilled is not None, width=size[1], height=size[0],
                        scheduler_overrides=dict(distilled.meta.scheduler_config) if distilled else {})
    return start_denoising(model, f"a red circle {seed}", seed, plan, chosen)


def _after_steps(model, registry, probe_seed: int, others: list[int], sets, steps: int, deterministic: bool,
                 size=(32, 32)) -> torch.Tensor:
    probe = _request(model, sets, probe_seed, size)
    crowd = [_request(model, sets, s, SIZES[s % len(SIZES)]) for s in others]
    for _ in range(steps):
        live = [r for r in crowd if not r.sampler.done]
        assert unet_step(model, registry, live[: len(live) // 2] + [probe] + live[len(live) // 2:], deterministic) == []
    return probe.sampler.latents


@pytest.mark.parametrize("merged_bytes", [0, 64 << 20, 1], ids=["per-row", "merged", "merged-evicting"])
def test_deterministic_mode_every_request_is_bit_identical_to_the_request_alone(served, merged_bytes):
    """Per-row LoRA, merged weights, and merged weights evicted and re-merged between calls."""
    model, registry, sets = served
    registry.merged_budget_bytes = merged_bytes
    rng = random.Random(0)
    try:
        for probe_seed in range(len(sets)):
            size = SIZES[probe_seed % len(SIZES)]
            alone = _after_steps(model, registry, probe_seed, [], sets, 2, True, size)
            for _ in range(1):
                others = [rng.randrange(100, 10_000) for _ in range(rng.randrange(1, 5))]
                shared = _after_steps(model, registry, probe_seed, others, sets, 2, True, size)
                assert torch.equal(shared, alone), (probe_seed, others, (shared - alone).abs().max().item())
    finally:
        registry.merged_budget_bytes = 0


def test_deterministic_mode_runs_one_contiguous_image_row_per_unet_call(served):
    """What the guarantee rests on, checked on every UNet call: batch 1, contiguous, fresh memory."""
    model, registry, sets = served
    seen = []
    hook = model.unet.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape[0], args[0].is_contiguous(),
                                             kwargs["encoder_hidden_states"].is_contiguous())), with_kwargs=True)
    try:
        _after_steps(model, registry, 3, [101, 102, 103, 104], sets, 2, True)
    finally:
        hook.remove()
    assert len(seen) > 5 and set(seen) == {(1, True, True)}


@pytest.mark.parametrize("merged_bytes", [0, 64 << 20], ids=["per-row", "merged"])
def test_throughput_mode_batches_by_shape_and_matches_the_row_alone(served, merged_bytes):
    """Every size in one step: one UNet call per latent shape, each row close to the row alone, with
    several adapter sets in a call (per-row LoRA of every slot at once; or each slot's rows on its merged
    Linear weights and per-row LoRA on convolutions)."""
    model, registry, sets = served
    registry.merged_budget_bytes = merged_bytes
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        shared = _after_steps(model, registry, 3, [201, 202, 203, 204, 205, 206], sets, 1, False)
    finally:
        hook.remove()
    shapes = {c[1:] for c in calls}
    assert len(calls) == len(shapes) == len({(4, h // 2, w // 2) for h, w in SIZES})  # one call per shape
    assert max(c[0] for c in calls) > 2  # and rows of several requests in a call
    alone = _after_steps(model, registry, 3, [], sets, 1, False)
    registry.merged_budget_bytes = 0
    torch.testing.assert_close(shared, alone, rtol=1e-4, atol=1e-4)


def _row(model, sets, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens, dim = model.tokenizer.model_max_length, model.unet.config.cross_attention_dim
    return (torch.randn(4, 16, 16, generator=g), torch.randint(0, 1000, (), generator=g),
            torch.randn(tokens, dim, generator=g), torch.rand((), generator=g) * 5, sets[seed % len(sets)])


def _call(model, registry, rows):
    x, t, text, guidance = (torch.stack([r[i] for r in rows]) for i in range(4))
    with torch.no_grad(), registry.active([r[4] for r in rows]):
        return model.unet(x, t, encoder_hidden_states=text, timestep_cond=guidance_embedding(guidance)).sample


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_conv_lora_changes_the_output_and_matches_peft(served, tmp_path, backend, monkeypatch):
    """The style LoRA on convolutions is really applied, as peft applies it: 1 x 1 convolutions
    through the LoRA op (the Triton kernel, in its interpreter here), 3 x 3 through the torch reference."""
    from safetensors.torch import load_file

    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", backend)
    model, registry, sets = served
    probe = _row(model, sets, 4)  # sets[4]: s2 alone at weight 1
    base = _call(model, registry, [probe[:4] + ((),)])[0]
    served_out = _call(model, registry, [probe, _row(model, sets, 0)])[0]  # beside a base row: per-row LoRA
    assert not torch.allclose(base, served_out, atol=1e-4)

    reference = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    folder = write_random_adapter(tmp_path / "s2", reference.unet, reference.fingerprint, rank=4, seed=2,
                                  targets=CONV_TARGETS)
    reference.unet.load_lora_adapter(load_file(str(folder / "pytorch_lora_weights.safetensors")), prefix="unet",
                                     adapter_name="s2")
    x, t, text, _ = probe[:4]
    with torch.no_grad():
        expected = reference.unet(x[None], t[None], encoder_hidden_states=text[None]).sample[0]
    torch.testing.assert_close(served_out, expected, rtol=1e-4, atol=1e-4)
