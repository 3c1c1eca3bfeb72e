"""SDXL-shaped pipelines with random weights: a tiny one for tests, and one with SDXL base 1.0's real shapes.

``build_tiny_sdxl_pipeline`` has SDXL's topology in miniature: a 3-level UNet (DownBlock2D then two
CrossAttnDownBlock2D; CrossAttnUpBlock2D x2 then UpBlock2D), 2 layers per block (so the PDM layer
``up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q`` exists, as in SDXL), linear attention
projections, the ``text_time`` added conditioning (pooled text embedding + 6 size/crop numbers), two
CLIP text encoders whose hidden states are concatenated (``cross_attention_dim = hidden_1 + hidden_2``)
and whose second one has a projection (the pooled embedding), an 8x VAE with SDXL's scaling factor, and
SDXL's Euler scheduler config. Both tokenizers are the small offline tokenizer of ``pdm_lightning.tiny``;
the second pads with ``!`` like SDXL's ``tokenizer_2``. It runs every SDXL code path in seconds on a CPU.

``build_sdxl_pipeline`` builds SDXL base 1.0's published configs (``SDXL_*_CONFIG``, copied from the
``stabilityai/stable-diffusion-xl-base-1.0`` folder's config files) with CLIP's real tokenizer
(pdm_lightning/clip_vocab.py); its parameter counts are ``SDXL_PUBLISHED_COUNTS`` (checked by building
on the meta device). It weighs 14 GB in float32.

The presets ``tiny-sdxl`` and ``sdxl`` of ``pdm_lightning.tiny`` are made of this module's pieces
(``*_MODELS`` constructors, ``sdxl_pipeline``, ``*_PARAMETER_COUNTS`` / ``SDXL_PUBLISHED_COUNTS``,
``*_DESCRIPTION``); the pipelines built here are the same as those presets' for the same seed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

TINY_SDXL_RESOLUTION = 64
SDXL_RESOLUTION = 1024  # SDXL's native size (the UNet's sample_size 128 latents x 8)

TINY_SDXL_DESCRIPTION = (
    "SDXL's topology at toy width (3.0M parameters: 3-level UNet with text_time conditioning, two CLIP text "
    f"encoders), a small word-level vocabulary, Euler scheduler, epsilon, {TINY_SDXL_RESOLUTION} px: seconds on a CPU"
)
SDXL_DESCRIPTION = (
    "SDXL base 1.0's exact shapes (UNet 2.57B, CLIP ViT-L/14 123M + OpenCLIP ViT-bigG/14 695M text encoders, "
    f"VAE 84M), CLIP's tokenizer (the second padding with '!'), Euler scheduler, epsilon, {SDXL_RESOLUTION} px"
)
# stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/, text_encoder_2/, scheduler/ config.json.
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "force_upcast": True,  # SDXL's VAE overflows in float16 (hence the fp16-fix VAEs)
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
# OpenAI CLIP ViT-L/14's text tower (as SD1.5's).
SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# OpenCLIP ViT-bigG/14's text tower, with its projection (the pooled embedding).
SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
# Parameter counts of the published weights (component -> parameters).
SDXL_PUBLISHED_COUNTS: dict[str, int] = {
    "unet": 2_567_463_684,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
    "vae": 83_653_863,
}

# The tiny model: SDXL's structure, sizes chosen to keep every tensor small.
TINY_SDXL_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
    "max_position_embeddings": 77, "projection_dim": 32, "hidden_act": "quick_gelu",
}
TINY_SDXL_TEXT_ENCODER_2_CONFIG: dict[str, Any] = {
    "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
    "max_position_embeddings": 77, "projection_dim": 40, "hidden_act": "gelu",
}
TINY_ADDITION_TIME_EMBED_DIM = 8
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": TINY_SDXL_RESOLUTION // 8,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (2, 4, 4),  # as in SDXL's config: the number of heads per level
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "cross_attention_dim": TINY_SDXL_TEXT_ENCODER_CONFIG["hidden_size"] + TINY_SDXL_TEXT_ENCODER_2_CONFIG["hidden_size"],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": TINY_ADDITION_TIME_EMBED_DIM,
    # 6 numbers (original size, crop top-left, target size), each embedded, + the pooled text embedding.
    "projection_class_embeddings_input_dim": 6 * TINY_ADDITION_TIME_EMBED_DIM + TINY_SDXL_TEXT_ENCODER_2_CONFIG["projection_dim"],
}
TINY_SDXL_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": TINY_SDXL_RESOLUTION,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
SDXL_TOKENIZER_2_PAD = "!"  # SDXL's tokenizer_2 (OpenCLIP's) pads with "!", not with <|endoftext|>
# The tiny model's own counts: not published anywhere, kept so that it never changes by accident.
TINY_SDXL_PARAMETER_COUNTS: dict[str, int] = {"unet": 2_580_740, "vae": 248_079, "text_encoder": 43_680, "text_encoder_2": 98_688}


def _unet(config: Mapping[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    return build


def _vae(config: Mapping[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL(**config)

    return build


def _text_encoder(config: Mapping[str, Any] | Callable[[], Mapping[str, Any]], projection: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        settings = config() if callable(config) else config
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**settings))

    return build


def _tiny_token_ids(pad: str) -> dict[str, int]:
    """The small offline vocabulary's size and special ids, padding with ``pad``."""
    from pdm_lightning.clip_vocab import BOS, EOS
    from pdm_lightning.tiny import build_bpe_files  # lazy: pdm_lightning.tiny registers this module's presets

    vocab, _ = build_bpe_files()
    return {"vocab_size": len(vocab), "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[pad]}


# Component -> constructor with random weights, in the order they are built after seeding (a
# pdm_lightning.tiny PresetSpec's ``models``; each also builds on the meta device).
TINY_SDXL_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "unet": _unet(TINY_SDXL_UNET_CONFIG),
    "vae": _vae(TINY_SDXL_VAE_CONFIG),
    "text_encoder": _text_encoder(lambda: {**TINY_SDXL_TEXT_ENCODER_CONFIG, **_tiny_token_ids("<|endoftext|>")}, projection=False),
    "text_encoder_2": _text_encoder(lambda: {**TINY_SDXL_TEXT_ENCODER_2_CONFIG, **_tiny_token_ids(SDXL_TOKENIZER_2_PAD)}, projection=True),
}
SDXL_MODELS: dict[str, Callable[[], torch.nn.Module]] = {
    "unet": _unet(SDXL_UNET_CONFIG),
    "vae": _vae(SDXL_VAE_CONFIG),
    "text_encoder": _text_encoder(SDXL_TEXT_ENCODER_CONFIG, projection=False),
    "text_encoder_2": _text_encoder(SDXL_TEXT_ENCODER_2_CONFIG, projection=True),
}


def tiny_tokenizers() -> tuple[Any, Any]:
    """The small offline CLIP tokenizer twice: as ``tokenizer`` and, padding with ``!``, as ``tokenizer_2``."""
    from transformers import CLIPTokenizer

    from pdm_lightning.tiny import build_tokenizer  # lazy: pdm_lightning.tiny registers this module's presets

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
        tokenizer_2 = CLIPTokenizer.from_pretrained(tmp, model_max_length=77, pad_token=SDXL_TOKENIZER_2_PAD)
    return tokenizer, tokenizer_2


def clip_tokenizers() -> tuple[Any, Any]:
    """CLIP's real BPE tokenizer twice (pdm_lightning/clip_vocab.py), the second padding with ``!`` as SDXL's."""
    from pdm_lightning.clip_vocab import load_clip_tokenizer

    return load_clip_tokenizer(), load_clip_tokenizer(pad_token=SDXL_TOKENIZER_2_PAD)


def sdxl_pipeline(
    models: Mapping[str, torch.nn.Module], prediction_type: str = "epsilon", tokenizers: tuple[Any, Any] | None = None
):  # noqa: ANN201 - diffusers StableDiffusionXLPipeline
    """A StableDiffusionXLPipeline around built ``models``, with SDXL's Euler scheduler and no invisible watermark.

    ``tokenizers`` default to the small offline one for the tiny model's vocabulary and to CLIP's real
    BPE for the published vocabulary size (a pdm_lightning.tiny PresetSpec's ``pipeline``).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if tokenizers is None:
        real = models["text_encoder"].config.vocab_size == SDXL_TEXT_ENCODER_CONFIG["vocab_size"]
        tokenizers = clip_tokenizers() if real else tiny_tokenizers()
    tokenizer, tokenizer_2 = tokenizers
    return StableDiffusionXLPipeline(
        **{name: models[name] for name in ("unet", "vae", "text_encoder", "text_encoder_2")},
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        # from_config keeps the keys Euler does not use (clip_sample...), as SDXL's folder has them: the
        # DDPM scheduler training builds from the same config reads them.
        scheduler=EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER_CONFIG, "prediction_type": prediction_type}),
        add_watermarker=False,
    )


def build_models(constructors: Mapping[str, Callable[[], torch.nn.Module]], seed: int | None = None) -> dict[str, torch.nn.Module]:
    """Each component built in order (after seeding, when ``seed`` is given), without autograd records."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return {name: build() for name, build in constructors.items()}


def build_tiny_sdxl_pipeline(
    seed: int = 0, prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
):  # noqa: ANN201 - diffusers StableDiffusionXLPipeline
    """The tiny random SDXL-shaped pipeline in memory (deterministic for a given seed)."""
    return sdxl_pipeline(build_models(TINY_SDXL_MODELS, seed), prediction_type, tiny_tokenizers())


def build_sdxl_pipeline(seed: int = 0, tokenizers: tuple[Any, Any] | None = None):  # noqa: ANN201
    """SDXL base 1.0's architecture with random weights (deterministic for a given seed; 14 GB in float32).

    ``tokenizers`` (tokenizer, tokenizer_2) default to CLIP's real BPE (fetched once by
    pdm_lightning/clip_vocab.py).
    """
    return sdxl_pipeline(build_models(SDXL_MODELS, seed), "epsilon", tokenizers)


def parameter_counts(models: Mapping[str, torch.nn.Module]) -> dict[str, int]:
    """Component -> number of parameters."""
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def meta_models(constructors: Mapping[str, Callable[[], torch.nn.Module]]) -> dict[str, torch.nn.Module]:
    """The components on the meta device: shapes and names without memory or initialisation (under a second)."""
    with torch.device("meta"):
        return {name: build() for name, build in constructors.items()}


def sdxl_meta_parameter_counts() -> dict[str, int]:
    """SDXL base 1.0's parameter counts from its configs, built on the meta device."""
    return parameter_counts(meta_models(SDXL_MODELS))
