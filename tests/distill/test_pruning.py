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
from distillery.distill.methods.prune_spec import PruneSpecError, level_spec, plan_pruning
from distillery.distill.methods.pruned_unet import parameter_count, prune_unet
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
    with pytest.raises(PruneSpecError, match="levels are 1, 2 and 3"):
        level_spec(toy_model.unet.config, 4)


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


# SSD-1B's cut: transformer depth per layer, a mid block of one resnet, separate up-block depths


@pytest.fixture(scope="module")
def toy_xl_unet():
    """The SDXL-family toy's architecture (2 transformer layers in each inner attention), random weights."""
    from distillery.distill.toy.architecture import build_xl_unet

    torch.manual_seed(0)
    return build_xl_unet().eval()


def test_level_3_on_sdxls_config_is_ssd1bs_published_shape():
    from distillery.testing.sdxl import sdxl_unet_config, ssd1b_unet_config

    config = ssd1b_unet_config()
    assert config["transformer_layers_per_block"] == [[1, 1], [2, 2], [4, 4]]
    assert config["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], [1, 1, 1]]
    assert config["mid_block_type"] == "UNetMidBlock2D"
    with torch.device("meta"):
        full, small = UNet2DConditionModel(**sdxl_unet_config()), UNet2DConditionModel.from_config(config)
    assert 0.50 < parameter_count(small) / parameter_count(full) < 0.54  # SSD-1B: 1.3B of SDXL's 2.6B


def test_thinned_attentions_and_the_one_resnet_mid_block_keep_the_teachers_weights(toy_xl_unet):
    before = {k: v.clone() for k, v in toy_xl_unet.state_dict().items()}
    spec = level_spec(toy_xl_unet.config, 3)
    assert spec == ["mid_block.attentions", "down_blocks.2.attentions.0.transformer_blocks.1",
                    "up_blocks.0.attentions.0.transformer_blocks.1", "up_blocks.1.attentions.1.transformer_blocks.1"]
    student, plan = prune_unet(toy_xl_unet, spec + ["up_blocks.1.attentions.0.transformer_blocks.0"])
    for key, value in toy_xl_unet.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    weights = student.state_dict()
    assert student.config.reverse_transformer_layers_per_block == [[1, 2], [1, 1], [1, 1]]
    assert [len(a.transformer_blocks) for a in student.up_blocks[1].attentions] == [1, 1]
    # a dropped transformer layer's successors move down an index
    torch.testing.assert_close(weights["up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
                               before["up_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.weight"])
    torch.testing.assert_close(weights["up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2.weight"],
                               before["up_blocks.0.attentions.1.transformer_blocks.1.ff.net.2.weight"])
    assert type(student.mid_block).__name__ == "UNetMidBlock2D" and len(student.mid_block.resnets) == 1
    torch.testing.assert_close(weights["mid_block.resnets.0.conv2.weight"], before["mid_block.resnets.0.conv2.weight"])
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, toy_xl_unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        assert student(x, torch.tensor([500, 20]), text, added_cond_kwargs=added).sample.shape == x.shape


@pytest.mark.parametrize("drops, block, says", [
    (["mid_block.attentions", "down_blocks.2.attentions.0.transformer_blocks.0",
      "down_blocks.2.attentions.0.transformer_blocks.1"], "down_blocks.2.attentions.0.transformer_blocks.1",
     "would keep no transformer layer; drop down_blocks.2.attentions"),
    (["up_blocks.0.attentions", "up_blocks.0.attentions.1.transformer_blocks.0"],
     "up_blocks.0.attentions.1.transformer_blocks.0", "drops up_blocks.0.attentions already"),
    (["down_blocks.2.attentions.0.transformer_blocks.1"], "mid_block.attentions.0",
     "gives the mid block the depth of down_blocks.2's first kept layer (1)"),
    (["down_blocks.1.attentions.0.transformer_blocks.2"], "down_blocks.1.attentions.0.transformer_blocks.2",
     "no such block"),
])
def test_a_depth_spec_that_cannot_be_built_is_refused_naming_the_layer(toy_xl_unet, drops, block, says):
    with pytest.raises(PruneSpecError) as caught:
        plan_pruning(toy_xl_unet.config, drops)
    assert caught.value.block == block and says in str(caught.value)


def test_the_mid_blocks_tied_depth_is_allowed_when_the_spec_thins_both(toy_xl_unet):
    student, _ = prune_unet(toy_xl_unet, ["down_blocks.2.attentions.0.transformer_blocks.1",
                                          "mid_block.attentions.0.transformer_blocks.0"])
    assert len(student.mid_block.attentions[0].transformer_blocks) == 1
    torch.testing.assert_close(student.state_dict()["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
                               toy_xl_unet.state_dict()["mid_block.attentions.0.transformer_blocks.1.attn2.to_k.weight"])


def test_ssd1b_feature_kd_matches_down_layers_and_the_reduced_mid_block_to_the_full_one(toy_xl_unet):
    from distillery.distill.methods.prune import feature_pairs

    spec = level_spec(toy_xl_unet.config, 3)
    student, plan = prune_unet(toy_xl_unet, spec)
    pairs = dict(feature_pairs(toy_xl_unet, plan, "layers"))
    assert pairs["mid_block"] == "mid_block" and pairs["down_blocks.1.attentions.0"] == "down_blocks.1.attentions.0"
    assert "down_blocks.0.resnets.0" in pairs and "up_blocks.2" in pairs and "down_blocks.1" not in pairs
    teacher_out, student_out = BlockOutputs(toy_xl_unet, list(pairs)), BlockOutputs(student, list(pairs.values()))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, toy_xl_unet.config.cross_attention_dim)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        toy_xl_unet(x, torch.tensor([500, 20]), text, added_cond_kwargs=added)
        student(x, torch.tensor([500, 20]), text, added_cond_kwargs=added)
    teacher_out.remove()  # the fixture is shared: leave it as it was
    for t, s in pairs.items():
        assert teacher_out.outputs[t].shape == student_out.outputs[s].shape, t
    torch.testing.assert_close(student_out.outputs["down_blocks.1.attentions.0"],  # before the first thinned stack
                               teacher_out.outputs["down_blocks.1.attentions.0"])
    assert not torch.allclose(student_out.outputs["mid_block"], teacher_out.outputs["mid_block"])


def test_an_ssd1b_style_pruned_toy_xl_loads_in_stock_sdxl_and_is_served(random_toy_xl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    code = main(["prune", "--model", str(random_toy_xl_folder), "--level", "3", "--features", "layers",
                 "--data", "toy:12", "--steps", "2", "--batch", "4", "--out", str(tmp_path / "ssd"),
                 "--work", str(tmp_path / "work")])
    assert code == 0
    unet, info = UNet2DConditionModel.from_pretrained(tmp_path / "ssd", subfolder="unet", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert unet.config.mid_block_type == "UNetMidBlock2D" and unet.config.reverse_transformer_layers_per_block
    stock = StableDiffusionXLPipeline.from_pretrained(tmp_path / "ssd")
    assert parameter_count(stock.unet) == json.loads((tmp_path / "ssd" / PRUNING_FILE).read_text())["parameters"]
    pruned = DiffusionModel.from_pretrained(tmp_path / "ssd")
    assert pruned.family == "sdxl"
    out = generate(pruned, ["a red circle"], [0], 2.0, 2)
    assert out.images[0].size == (pruned.default_size, pruned.default_size)
