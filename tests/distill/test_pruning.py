"""Block pruning: spec validation, the smaller UNet and its copied weights, the KD run, the folder it writes."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from distillery.adapters import LORA_FILE, AdapterError, AdapterRegistry
from distillery.cli import main
from distillery.distill.methods.guidance import GuidanceDistillConfig, distill_guidance
from distillery.distill.methods.prune import PRUNING_FILE, BlockOutputs, PruneConfig, prune
from distillery.distill.methods.pruned_unet import PruneSpecError, level_spec, parameter_count, plan_pruning, prune_unet
from distillery.model import DiffusionModel, unet_fingerprint
from distillery.sampling.pipeline import generate
from distillery.testing.sd15 import sd15_unet
from distillery.testing.synthetic_adapters import write_random_adapter


@pytest.fixture(scope="module")
def narrow_sd15():
    """SD 1.5's block structure (2 layers a down block, 4 stages) with narrow channels: 32, 32, 64, 64."""
    torch.manual_seed(0)
    return sd15_unet(block_out_channels=(32, 32, 64, 64), cross_attention_dim=32, attention_head_dim=4,
                     norm_num_groups=8, sample_size=16).eval()


def _inputs(unet, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, unet.config.in_channels, 16, 16, generator=g)
    text = torch.randn(b, 5, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([500, 20])[:b], text


@pytest.mark.parametrize("drops, block, says", [
    (["down_blocks.9.resnets.0"], "down_blocks.9.resnets.0", "no such block"),
    (["down_blocks.1.attentions.0"], "down_blocks.1.attentions.0", "cannot be dropped on its own"),
    (["up_blocks.1.resnets.1"], "up_blocks.1.resnets.1", "takes one skip connection per resnet from down_blocks.2"),
    (["down_blocks.1.resnets.1"], "down_blocks.1.resnets.1", "needs 1 resnet(s) of up_blocks.2 dropped"),
    (["down_blocks.1.resnets.0", "down_blocks.1.resnets.1", "up_blocks.2.resnets.0", "up_blocks.2.resnets.1"],
     "down_blocks.1.resnets.1", "would keep no layer"),
    (["down_blocks.2.resnets.0", "up_blocks.1.resnets.1"], "down_blocks.2.resnets.0", "only layer taking 32 channels to 64"),
    (["down_blocks.2.resnets.1", "up_blocks.1.resnets.2"], "up_blocks.1.resnets.2", "skip connection from down_blocks.1's downsampler"),
    (["down_blocks.1.resnets.1", "up_blocks.1.resnets.1"], "down_blocks.1.resnets.1", "needs 1 resnet(s) of up_blocks.2"),
])
def test_a_spec_that_breaks_the_unet_is_refused_naming_the_block(narrow_sd15, drops, block, says):
    with pytest.raises(PruneSpecError) as caught:
        plan_pruning(narrow_sd15.config, drops)
    assert caught.value.block == block and says in str(caught.value) and str(caught.value).startswith(block)


def test_pruned_unet_holds_the_teachers_remaining_weights_and_the_teacher_is_untouched(narrow_sd15):
    before = {k: v.clone() for k, v in narrow_sd15.state_dict().items()}
    drops = ["mid_block", "down_blocks.1.resnets.1", "up_blocks.2.resnets.1", "down_blocks.2.attentions"]
    student, _ = prune_unet(narrow_sd15, drops)
    for key, value in narrow_sd15.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    weights = student.state_dict()
    # layers after a dropped one move down an index; the others keep theirs
    torch.testing.assert_close(weights["up_blocks.2.resnets.1.conv1.weight"], before["up_blocks.2.resnets.2.conv1.weight"])
    torch.testing.assert_close(weights["up_blocks.2.attentions.1.proj_in.weight"],
                               before["up_blocks.2.attentions.2.proj_in.weight"])
    torch.testing.assert_close(weights["down_blocks.1.resnets.0.conv1.weight"], before["down_blocks.1.resnets.0.conv1.weight"])
    assert student.mid_block is None and not hasattr(student.down_blocks[2], "attentions")
    assert student.config.layers_per_block == [2, 1, 2, 2] and student.config.down_block_types[2] == "DownBlock2D"
    assert len(student.up_blocks[2].resnets) == 2 and len(student.up_blocks[1].resnets) == 3
    assert parameter_count(student) < parameter_count(narrow_sd15)
    x, t, text = _inputs(narrow_sd15)
    with torch.no_grad():
        assert student(x, t, text).sample.shape == narrow_sd15(x, t, text).sample.shape


def test_dropping_the_mid_block_leaves_the_down_path_exactly_as_it_was(narrow_sd15):
    student, _ = prune_unet(narrow_sd15, ["mid_block"])
    teacher_blocks, student_blocks = BlockOutputs(narrow_sd15), BlockOutputs(student)
    x, t, text = _inputs(narrow_sd15)
    with torch.no_grad():
        narrow_sd15(x, t, text), student(x, t, text)
    teacher_blocks.remove()  # the fixture is shared: leave it as it was
    assert not any(b._forward_hooks for b in narrow_sd15.down_blocks)
    for i in range(4):
        torch.testing.assert_close(student_blocks.outputs[f"down_blocks.{i}"], teacher_blocks.outputs[f"down_blocks.{i}"])
    assert not torch.allclose(student_blocks.outputs["up_blocks.0"], teacher_blocks.outputs["up_blocks.0"])


def test_levels_are_structural_recipes_for_any_sd_style_unet(narrow_sd15, toy_model):
    sd = level_spec(narrow_sd15.config, 1)
    assert sd[0] == "mid_block" and "down_blocks.0.resnets.1" in sd and "up_blocks.3.resnets.1" in sd
    assert set(level_spec(narrow_sd15.config, 2)) - set(sd) == {"down_blocks.2.attentions", "up_blocks.1.attentions"}
    assert level_spec(toy_model.unet.config, 1) == ["mid_block"]  # one layer a block: nothing more to cut
    for level in (1, 2):
        for unet in (narrow_sd15, toy_model.unet):
            student, _ = prune_unet(unet, level_spec(unet.config, level))
            assert parameter_count(student) < parameter_count(unet)
    with pytest.raises(PruneSpecError, match="levels are 1 and 2"):
        level_spec(toy_model.unet.config, 3)


def test_cli_refuses_a_bad_spec_before_training_starts(random_toy_folder, tmp_path, capsys):
    code = main(["prune", "--model", str(random_toy_folder), "--level", "0", "--drop", "mid_block,up_blocks.0.resnets.1",
                 "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: up_blocks.0.resnets.1:") and "skip connection" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def _prune(model_folder, root, steps: int, checkpoint_every: int):
    cfg = PruneConfig(model=str(model_folder), data="toy:12", out=str(root / "pruned"), work=str(root / "work"),
                      steps=steps, batch=4, checkpoint_every=checkpoint_every, level=2)  # in warmup: lr as if never stopped
    return prune(cfg)


@pytest.fixture(scope="module")
def pruned_folder(random_toy_folder, tmp_path_factory):
    """4 steps, stopped after step 2 and resumed from its checkpoint."""
    root = tmp_path_factory.mktemp("prune")
    _prune(random_toy_folder, root, steps=2, checkpoint_every=2)
    return _prune(random_toy_folder, root, steps=4, checkpoint_every=2)


def test_a_resumed_pruning_run_equals_one_that_never_stopped(pruned_folder, random_toy_folder, tmp_path):
    straight = _prune(random_toy_folder, tmp_path, steps=4, checkpoint_every=100)
    resumed, uninterrupted = (load_file(str(f / "unet" / "diffusion_pytorch_model.safetensors"))
                              for f in (pruned_folder, straight))
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6, msg=key)
    base = DiffusionModel.from_pretrained(random_toy_folder)
    initial, _ = prune_unet(base.unet, level_spec(base.unet.config, 2))
    assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in resumed.items())  # it trained


def test_pruned_folder_is_a_base_the_server_loads_and_original_adapters_are_refused(pruned_folder, random_toy_folder,
                                                                                      tmp_path):
    record = json.loads((pruned_folder / PRUNING_FILE).read_text())
    base = DiffusionModel.from_pretrained(random_toy_folder)
    pruned = DiffusionModel.from_pretrained(pruned_folder)
    assert record["dropped"] == level_spec(base.unet.config, 2) and record["base_fingerprint"] == base.fingerprint
    assert record["fingerprint"] == pruned.fingerprint != base.fingerprint
    assert pruned.unet.mid_block is None and record["parameters"] == parameter_count(pruned.unet)
    assert pruned.fingerprint == unet_fingerprint(UNet2DConditionModel.from_pretrained(pruned_folder, subfolder="unet"))
    for part in ("vae", "text_encoder", "tokenizer", "scheduler"):  # the base's, unchanged
        for f in (random_toy_folder / part).iterdir():
            assert (pruned_folder / part / f.name).read_bytes() == f.read_bytes()
    write_random_adapter(tmp_path / "for-base", base.unet, base.fingerprint)
    write_random_adapter(tmp_path / "for-pruned", pruned.unet, pruned.fingerprint)
    registry = AdapterRegistry(pruned)
    with pytest.raises(AdapterError, match="trained on base model"):
        registry.load("for-base", tmp_path / "for-base")
    adapter = registry.load("for-pruned", tmp_path / "for-pruned")
    out = generate(pruned, ["a red circle"], [0], 1.0, 2, adapters=((adapter, 1.0),), registry=registry)
    assert out.images[0].size == (pruned.default_size, pruned.default_size) and out.unet_evaluations == 2 * 2  # CFG


def test_a_student_on_the_pruned_base_starts_from_the_unpruned_bases_adapter(pruned_folder, random_toy_folder, tmp_path):
    """distill-guidance --init-from: the layers the pruned UNet keeps start with the adapter's weights, the
    dropped blocks' layers are left out; the result is an adapter of the pruned base (0 steps: the start)."""
    base = DiffusionModel.from_pretrained(random_toy_folder)
    source = write_random_adapter(tmp_path / "for-base", base.unet, base.fingerprint, kind="guidance")
    cfg = GuidanceDistillConfig(model=str(pruned_folder), data="toy:12", out=str(tmp_path / "started"),
                                work=str(tmp_path / "work"), steps=0, batch=4, init_from=str(source))
    started = distill_guidance(cfg)
    before, after = load_file(str(source / LORA_FILE)), load_file(str(started / LORA_FILE))
    kept = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    dropped = "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    [a_key] = [k for k in after if kept in k and ("lora_A" in k or "lora.down" in k)]
    torch.testing.assert_close(after[a_key], before[f"unet.{kept}.lora.down.weight"])
    assert any(dropped in k for k in before) and not any(dropped in k for k in after)
    pruned = DiffusionModel.from_pretrained(pruned_folder)
    assert json.loads((started / "adapter.json").read_text())["base_fingerprint"] == pruned.fingerprint
    AdapterRegistry(pruned).load("started", started)  # served on the pruned base
