"""Guidance distillation mechanics on the toy architecture (random weights: fast)."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from distillery.adapters import LORA_FILE, AdapterError, AdapterRegistry
from distillery.distill.methods.guidance import GuidanceDistillConfig, attach_student, distill_guidance
from distillery.distill.toy import architecture
from distillery.model import DiffusionModel, unet_fingerprint
from distillery.sampling.guidance import guidance_embedding
from distillery.sampling.pipeline import generate


def _inputs(model, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, 4, 16, 16, generator=g)
    t = torch.tensor([500, 20])[:b]
    cond = model.encode_prompts(["a red circle", "a blue square"][:b])
    return x, t, cond


def test_untrained_student_equals_conditional_teacher_and_shares_w0(random_toy_folder):
    model = DiffusionModel.from_pretrained(random_toy_folder)
    base_params = {id(p) for p in model.unet.parameters()}
    n_base = sum(p.numel() for p in model.unet.parameters())
    x, t, cond = _inputs(model)
    teacher = model.unet(x, t, **cond.unet_kwargs()).sample
    projection = attach_student(model.unet, GuidanceDistillConfig(rank=4))
    w = torch.tensor([3.0, 0.5])
    student = model.unet(x, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w)).sample
    torch.testing.assert_close(student, teacher)  # B = 0 and a zero w projection
    # one UNet: the base weights are the very same tensors, only LoRA and the projection were added
    assert base_params <= {id(p) for p in model.unet.parameters()}
    added = sum(p.numel() for p in model.unet.parameters()) - n_base
    trainable = sum(p.numel() for p in model.unet.parameters() if p.requires_grad)
    assert added == trainable and 0 < trainable < 0.2 * n_base
    with torch.no_grad():
        projection.weight.normal_()
    moved = model.unet(x, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w)).sample
    assert not torch.allclose(moved, teacher)  # w really reaches the UNet through timestep_cond
    model.unet.disable_adapters()
    torch.testing.assert_close(model.unet(x, t, **cond.unet_kwargs()).sample, teacher)  # teacher intact


def _distill(model_folder, root, steps: int, checkpoint_every: int):
    cfg = GuidanceDistillConfig(model=str(model_folder), data="toy:12", out=str(root / "adapter"), work=str(root / "work"),
                                steps=steps, batch=4, checkpoint_every=checkpoint_every, rank=4)  # 3 batches an epoch
    return distill_guidance(cfg)


@pytest.fixture(scope="module")
def trained_adapter(random_toy_folder, tmp_path_factory):
    """4 steps, stopped after step 2 and resumed from its checkpoint (the resume crosses an epoch's end)."""
    root = tmp_path_factory.mktemp("gd")
    _distill(random_toy_folder, root, steps=2, checkpoint_every=2)
    return _distill(random_toy_folder, root, steps=4, checkpoint_every=2)


def test_a_resumed_run_equals_one_that_never_stopped(trained_adapter, random_toy_folder, tmp_path):
    """accelerate's save_state/load_state with the data position: same batches, noise, optimizer and lr."""
    straight = _distill(random_toy_folder, tmp_path, steps=4, checkpoint_every=100)
    resumed, uninterrupted = (load_file(str(folder / LORA_FILE)) for folder in (trained_adapter, straight))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    assert not all(torch.equal(v, torch.zeros_like(v)) for v in resumed.values())  # it trained


def test_adapter_folder_format(trained_adapter, random_toy_folder):
    meta = json.loads((trained_adapter / "adapter.json").read_text())
    assert meta["kind"] == "guidance" and meta["w_min"] == 0.0 and meta["w_max"] == 5.0
    assert meta["base_fingerprint"] == DiffusionModel.from_pretrained(random_toy_folder).fingerprint
    assert meta["embedding_dim"] == 256 and meta["rank"] == 4
    assert meta["recommended_scheduler"] == "ddim" and meta["training"]["steps"] == 4


def test_lora_part_loads_into_stock_diffusers_pipeline(trained_adapter, random_toy_folder):
    pipe = StableDiffusionPipeline.from_pretrained(random_toy_folder, safety_checker=None)
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    before = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(trained_adapter)
    after = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(after - before).max() > 0  # the trained LoRA (B != 0 after 4 steps) changes the output


def test_server_loads_adapter_and_samples_one_evaluation_per_step(trained_adapter, random_toy_folder):
    model = DiffusionModel.from_pretrained(random_toy_folder)
    registry = AdapterRegistry(model)
    adapter = registry.load("guidance-toy", trained_adapter)
    rows = []
    hook = model.unet.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    single = generate(model, ["a red circle"], [0], 2.0, steps=3, adapters=[(adapter, 1.0)], registry=registry)
    assert rows == [1, 1, 1] and single.mode == "single-eval" and single.unet_evaluations == 3
    rows.clear()
    cfg = generate(model, ["a red circle"], [0], 2.0, steps=3, registry=registry)
    hook.remove()
    assert rows == [2, 2, 2] and cfg.mode == "cfg" and cfg.unet_evaluations == 6
    again = generate(model, ["a red circle"], [0], 2.0, steps=3)  # the adapter leaves no trace on the CFG path
    assert again.images[0].tobytes() == cfg.images[0].tobytes()


@pytest.mark.parametrize("backend, merged_bytes", [("torch", 0), ("torch", 64 << 20), ("triton", 0)])
def test_served_adapter_equals_the_peft_student_it_was_trained_as(trained_adapter, random_toy_folder, backend, merged_bytes,
                                                                  monkeypatch):
    """The serving path (own LoRA layers + per-row w projection; merged weights, the per-row torch
    reference, or the Triton kernel in its interpreter) computes what peft computed in training."""
    monkeypatch.setenv("DISTILLERY_LORA_BACKEND", backend)

    meta = json.loads((trained_adapter / "adapter.json").read_text())
    peft_model = DiffusionModel.from_pretrained(random_toy_folder)
    lora = load_file(str(trained_adapter / "pytorch_lora_weights.safetensors"))
    peft_model.unet.load_lora_adapter(lora, prefix="unet", adapter_name="g")
    proj = torch.nn.Linear(meta["embedding_dim"], peft_model.unet.time_embedding.linear_1.in_features, bias=False)
    proj.weight.data = load_file(str(trained_adapter / "guidance_projection.safetensors"))["weight"]
    peft_model.unet.time_embedding.cond_proj = proj
    served = DiffusionModel.from_pretrained(random_toy_folder)
    registry = AdapterRegistry(served, merged_budget_bytes=merged_bytes)
    adapter = registry.load("g", trained_adapter)
    x, t, cond = _inputs(served)
    w = torch.tensor([3.0, 0.5])
    with torch.no_grad():
        expected = peft_model.unet(x, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w)).sample
        with registry.active([((adapter, 1.0),), ((adapter, 1.0),)]):
            got = served.unet(x, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w)).sample
        with registry.active([((adapter, 1.0),), ()]):  # row 1 without the adapter: the plain base
            mixed = served.unet(x, t, **cond.unet_kwargs(), timestep_cond=guidance_embedding(w)).sample
        peft_model.unet.disable_adapters()
        base = peft_model.unet(x, t, **cond.unet_kwargs()).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-4)
    torch.testing.assert_close(mixed[0], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mixed[1], base[1], rtol=1e-4, atol=1e-5)


def test_adapter_for_another_base_is_refused_and_nothing_is_loaded(trained_adapter, random_toy_folder):
    model = DiffusionModel.from_pretrained(random_toy_folder)
    torch.manual_seed(1)
    model.unet.load_state_dict(architecture.build_unet().state_dict())  # same shapes, other weights
    model.fingerprint = unet_fingerprint(model.unet)
    registry = AdapterRegistry(model)
    with pytest.raises(AdapterError, match="trained on base model"):
        registry.load("guidance-toy", trained_adapter)
    assert registry.known == {} and not registry.resident
