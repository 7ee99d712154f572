"""Step distillation over the shared W0: consistency (LCM-LoRA, w an input) and progressive halving."""

import json
import warnings

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from distillery.adapters import LORA_FILE, PROJECTION_FILE, AdapterRegistry
from distillery.adapters.keys import unet_lora_pairs
from distillery.distill.methods.consistency import ConsistencyDistillConfig, boundary_scalings, distill_consistency
from distillery.distill.methods.progressive import ProgressiveDistillConfig, distill_progressive, two_step_grid
from distillery.distill.training.student import load_adapter_into
from distillery.model import DiffusionModel
from distillery.paths import EMBEDDED_ADAPTERS, EMBEDDED_MODEL
from distillery.sampling.pipeline import generate

GUIDANCE = EMBEDDED_ADAPTERS / "guidance-toy"
TINY = dict(model=str(EMBEDDED_MODEL), data="toy:16", batch=4, warmup=0, checkpoint_every=1)


def test_a_student_starts_as_exactly_the_adapter_it_is_loaded_from():
    """Every LoRA layer of the file (diffusers writes attention layers in another key layout than the rest)
    and the w projection; two adapters on one UNet, only the student trainable."""
    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # peft warns when a state dict misses targeted layers
        load_adapter_into(model.unet, GUIDANCE, "teacher", trainable=False)
        _, projection = load_adapter_into(model.unet, GUIDANCE, "student", trainable=True)
    pairs = unet_lora_pairs(load_file(str(GUIDANCE / LORA_FILE)), GUIDANCE)
    for layer, (a, b) in pairs.items():
        served = model.unet.get_submodule(layer)
        for name in ("teacher", "student"):
            assert torch.equal(served.lora_A[name].weight, a) and torch.equal(served.lora_B[name].weight, b), layer
    assert torch.equal(projection.weight, load_file(str(GUIDANCE / PROJECTION_FILE))["weight"])
    trainable = {n for n, p in model.unet.named_parameters() if p.requires_grad}
    assert trainable and all(".student." in n for n in trainable) and len(trainable) == 2 * len(pairs)


def test_boundary_scalings_make_the_consistency_function_the_identity_at_t0():
    c_skip, c_out = boundary_scalings(torch.tensor([0, 999]), 10.0)
    assert c_skip[0].item() == 1 and c_out[0].item() == 0
    assert c_skip[1].item() < 1e-6 and abs(c_out[1].item() - 1) < 1e-6


def test_progressive_grid_is_the_students_ddim_grid_with_the_teachers_midpoints():
    scheduler = DDIMScheduler.from_pretrained(EMBEDDED_MODEL, subfolder="scheduler")
    starts, mids, ends = two_step_grid(scheduler, 4)
    scheduler.set_timesteps(4)
    assert starts.tolist() == scheduler.timesteps.tolist()  # the student trains where it will sample
    assert ends.tolist() == starts.tolist()[1:] + [-1]
    assert all(s > m > e for s, m, e in zip(starts.tolist(), mids.tolist(), ends.tolist()))


def test_consistency_adapter_starts_from_the_guidance_adapter_and_serves_with_lcm_in_few_steps(tmp_path):
    out = distill_consistency(ConsistencyDistillConfig(**TINY, steps=2, out=str(tmp_path / "lcm"),
                                                       work=str(tmp_path / "work")))
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["kind"] == "consistency" and meta["schedulers"] == ["lcm"] and meta["recommended_steps"] == 4
    assert meta["steps"] == list(range(1, 9)) and meta["scheduler_config"]["original_inference_steps"] == 50
    assert meta["training"]["init_from"] == "models/adapters/guidance-toy" and meta["training"]["steps"] == 2

    model = DiffusionModel.from_pretrained(EMBEDDED_MODEL)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    registry = AdapterRegistry(model)
    adapter = registry.load("lcm", out)
    runs = [generate(model, ["a red circle"], [seed], 1.0, 4, adapters=[(adapter, 1.0)], registry=registry)
            for seed in (3, 3, 4)]
    assert runs[0].mode == "single-eval" and runs[0].unet_evaluations == 4  # one row per step, LCM's 4 steps
    assert runs[0].images[0].tobytes() == runs[1].images[0].tobytes()  # LCM's step noise comes from the seed
    assert runs[0].images[0].tobytes() != runs[2].images[0].tobytes()
    after = {k.replace(".base.", "."): v for k, v in model.unet.state_dict().items()}  # serving layers wrap W0
    assert all(torch.equal(before[k], after[k]) for k in before)  # sampling never changed W0


def test_progressive_rounds_chain_teacher_to_student_and_a_finished_round_is_not_rerun(tmp_path):
    cfg = ProgressiveDistillConfig(**TINY, steps=1, rounds=[4, 2], out=str(tmp_path / "prog"), work=str(tmp_path / "w"))
    last = distill_progressive(cfg)
    first = json.loads((tmp_path / "prog-4" / "adapter.json").read_text())
    second = json.loads((last / "adapter.json").read_text())
    assert last == tmp_path / "prog-2"
    assert first["kind"] == "progressive" and first["steps"] == [4] and first["schedulers"] == ["ddim"]
    assert first["training"]["teacher"] == "models/adapters/guidance-toy" and first["training"]["teacher_steps"] == 8
    assert second["training"]["teacher"] == str(tmp_path / "prog-4") and second["recommended_steps"] == 2
    mtime = (last / "adapter.json").stat().st_mtime_ns
    assert distill_progressive(cfg) == last and (last / "adapter.json").stat().st_mtime_ns == mtime
