"""The SDXL-shaped presets: the tiny model has SDXL's structure; the real shapes give SDXL's parameter counts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from pdm_lightning.tiny_sdxl import (
    SDXL_PUBLISHED_COUNTS,
    SDXL_UNET_CONFIG,
    TINY_SDXL_MODELS,
    TINY_SDXL_PARAMETER_COUNTS,
    TINY_SDXL_RESOLUTION,
    build_tiny_sdxl_pipeline,
    meta_models,
    parameter_counts,
    sdxl_meta_parameter_counts,
)


def test_published_sdxl_shapes_give_the_published_parameter_counts() -> None:
    assert sdxl_meta_parameter_counts() == SDXL_PUBLISHED_COUNTS
    # The added conditioning: 6 size numbers x 256 + the 1280-d pooled text = 2816 inputs, 2048-d cross-attention.
    assert SDXL_UNET_CONFIG["projection_class_embeddings_input_dim"] == 6 * 256 + 1280
    assert SDXL_UNET_CONFIG["cross_attention_dim"] == 768 + 1280


def test_tiny_sdxl_has_sdxls_structure(tiny_sdxl_model_dir: Path) -> None:
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    unet, text_encoder, text_encoder_2 = pipeline.unet, pipeline.text_encoder, pipeline.text_encoder_2
    assert unet.config.down_block_types == SDXL_UNET_CONFIG["down_block_types"]
    assert unet.config.up_block_types == SDXL_UNET_CONFIG["up_block_types"]
    assert unet.config.addition_embed_type == "text_time" and unet.config.use_linear_projection
    assert unet.config.cross_attention_dim == text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    assert unet.add_embedding.linear_1.in_features == 6 * unet.config.addition_time_embed_dim + text_encoder_2.config.projection_dim
    assert type(text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipeline.vae.config.scaling_factor == 0.13025 and pipeline.vae.config.force_upcast
    scheduler = pipeline.scheduler.config
    assert type(pipeline.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_schedule, scheduler.beta_start, scheduler.beta_end, scheduler.prediction_type) == (
        "scaled_linear", 0.00085, 0.012, "epsilon")
    assert pipeline.tokenizer_2.pad_token == "!" and pipeline.tokenizer.pad_token == "<|endoftext|>"
    assert pipeline.default_sample_size * pipeline.vae_scale_factor == TINY_SDXL_RESOLUTION
    built = {name: getattr(pipeline, name) for name in TINY_SDXL_PARAMETER_COUNTS}
    assert parameter_counts(built) == parameter_counts(meta_models(TINY_SDXL_MODELS)) == TINY_SDXL_PARAMETER_COUNTS


def test_tiny_sdxl_is_deterministic_per_seed() -> None:
    first, again, other = (build_tiny_sdxl_pipeline(seed=s).unet.conv_in.weight for s in (0, 0, 1))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_real_sdxl_preset_assembles_with_clips_tokenizers(clip_tokenizer) -> None:  # noqa: ANN001 - fixture: the cached vocabulary
    from pdm_lightning.tiny_sdxl import SDXL_MODELS, sdxl_pipeline

    pipeline = sdxl_pipeline(meta_models(SDXL_MODELS))  # meta weights: the pipeline around SDXL's shapes, no memory
    assert isinstance(pipeline, StableDiffusionXLPipeline) and pipeline.watermark is None
    assert len(pipeline.tokenizer) == len(pipeline.tokenizer_2) == 49408
    # SDXL's tokenizer_2 pads with "!" (id 0), its first tokenizer with <|endoftext|> (49407).
    assert pipeline.tokenizer_2.pad_token_id == 0 and pipeline.tokenizer.pad_token_id == pipeline.tokenizer.eos_token_id == 49407
    assert pipeline.default_sample_size * pipeline.vae_scale_factor == 1024


@pytest.mark.slow
def test_real_sdxl_preset_builds_and_conditions_its_unet() -> None:
    """SDXL base's shapes with random weights: 3.5 B parameters, 14 GB in float32 (on the 2-core CPU: 97 s, 14.2 GB peak)."""
    from pdm_lightning.core.conditioning import encode_prompts, sdxl_time_ids, tokenize, unet_conditioning
    from pdm_lightning.tiny_sdxl import build_sdxl_pipeline

    pipeline = build_sdxl_pipeline(seed=0)
    built = {name: getattr(pipeline, name) for name in SDXL_PUBLISHED_COUNTS}
    assert parameter_counts(built) == SDXL_PUBLISHED_COUNTS
    with torch.no_grad():
        embeddings = encode_prompts((pipeline.text_encoder, pipeline.text_encoder_2),
                                    tokenize((pipeline.tokenizer, pipeline.tokenizer_2), ["a photo of sks dog"]))
        assert embeddings.encoder_hidden_states.shape == (1, 77, 2048) and embeddings.pooled.shape == (1, 1280)
        conditioning = unet_conditioning(embeddings, sdxl_time_ids((256, 256), (0, 0), (256, 256)))
        prediction = pipeline.unet(torch.randn(1, 4, 32, 32), torch.tensor([500]), **conditioning).sample
    assert prediction.shape == (1, 4, 32, 32) and torch.isfinite(prediction).all()
