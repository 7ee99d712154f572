"""The embedded toy models' architecture: the Stable Diffusion component sets, shrunk.

Same classes and folder layout as SD 1.5 (AutoencoderKL, UNet2DConditionModel,
CLIPTextModel, CLIPTokenizer, a diffusers scheduler), so every loader, sampler and
adapter path exercised on the toy is the one that runs on a real SD folder. The SDXL
family's toy (`build_xl_*`) has SDXL's parts: two text encoders, the second with a pooled
projection, `text_time` added conditioning, linear projections, and two transformer
layers per inner block, so that depth can be pruned as SSD-1B prunes SDXL's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distillery.distill.toy.data import BACKGROUNDS, IMAGE_SIZE, SHAPES, SIZES

MAX_TOKENS = 16  # longest caption is 10 tokens with BOS/EOS
TEXT_DIM = 64
LATENT_FACTOR = 2
LATENT_CHANNELS = 4


def build_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose merges turn every caption word into one token.

    Trained offline on the toy vocabulary with byte-level fallback characters, so any
    text tokenizes (unknown words split into characters).
    """
    words = ["a", "on", "background", *BACKGROUNDS, *SHAPES, *SIZES]
    bpe = Tokenizer(models.BPE(continuing_subword_prefix="", end_of_word_suffix="</w>"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)], trainer)
    with tempfile.TemporaryDirectory() as d:
        bpe.model.save(d)
        vocab = json.loads(Path(d, "vocab.json").read_text())
        merges = [tuple(m.split(" ")) for m in Path(d, "merges.txt").read_text().splitlines()[1:] if m]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def save_tokenizer(tokenizer: CLIPTokenizer, folder: Path) -> None:
    """tokenizer.json for transformers >= 5, plus vocab.json/merges.txt for the slow CLIPTokenizer."""
    tokenizer.save_pretrained(folder)
    bpe = tokenizer.backend_tokenizer.model
    bpe.save(str(folder))


def _text_config(vocab_size: int, width: int, layers: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 4,
                          num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=MAX_TOKENS,
                          projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def build_text_encoder(vocab_size: int) -> CLIPTextModel:
    return CLIPTextModel(_text_config(vocab_size, TEXT_DIM, 2))


XL_TIME_EMBED_DIM = 8  # per size id (6 of them), as diffusers' smallest SDXL test model


def build_xl_text_encoders(vocab_size: int) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Half the toy's text width each (SDXL: 768 + 1280): their penultimate states side by side are TEXT_DIM
    wide; the second's pooled projection is TEXT_DIM // 2. Three layers: the penultimate is not the first."""
    half = TEXT_DIM // 2
    return (CLIPTextModel(_text_config(vocab_size, half, 3)),
            CLIPTextModelWithProjection(_text_config(vocab_size, half, 3)))


def build_vae() -> AutoencoderKL:
    """Two encoder blocks: one downsampling, so 32x32 RGB <-> 16x16x4 latents."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
    )


def build_unet(**family) -> UNet2DConditionModel:
    """The toy UNet; `family`: the config entries another family's shape adds (build_xl_unet)."""
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // LATENT_FACTOR,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        # Cross-attention at 8x8 and 4x4 only: at 16x16 it tripled the CPU step time.
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 96),
        layers_per_block=1,
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
        **family,
    )


def build_xl_unet() -> UNet2DConditionModel:
    """The toy UNet as SDXL shapes its own: `text_time` added conditioning (pooled text + 6 size ids), linear
    projections into attention, and 2 transformer layers in each cross-attention block (SDXL: 2 and 10)."""
    return build_unet(transformer_layers_per_block=(1, 2, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=XL_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=6 * XL_TIME_EMBED_DIM + TEXT_DIM // 2)


def build_scheduler() -> DDIMScheduler:
    """DDPM's linear betas reach near-zero signal at t=T, which suits a 16x16 latent.

    "trailing" spacing starts sampling at t = T - 1 (Lin et al. 2023, arXiv 2305.08891) and
    allows any number of steps up to T.
    """
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=0,
        timestep_spacing="trailing",
    )
