"""The original-SD-layout single file: known SD1.x key names, exact round trip through from_single_file, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file

from pdm_lightning.export.pipeline import pipeline_state_dicts, single_file_checkpoint, write_pipeline_folder, write_single_file
from pdm_lightning.export.single_file import (
    TEXT_ENCODER_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    UnsupportedModelError,
    check_single_file_support,
)
from pdm_lightning.export.verify import ExportVerificationError, verify_single_file
from pdm_lightning.core.loading import load_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_model_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)


@pytest.fixture(scope="module")
def checkpoint(tiny_pipeline: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    return single_file_checkpoint(tiny_pipeline)


def test_keys_follow_the_original_sd1_layout(checkpoint: dict[str, torch.Tensor]) -> None:
    # Names as they appear in the released SD1.5 checkpoint, which the tiny model's topology shares.
    for key in (
        "model.diffusion_model.input_blocks.0.0.weight",
        "model.diffusion_model.time_embed.2.bias",
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight",
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "model.diffusion_model.middle_block.2.emb_layers.1.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler of a level without attention
        "model.diffusion_model.output_blocks.5.2.conv.weight",  # upsampler after an attention
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight",
        "model.diffusion_model.out.2.weight",
        "first_stage_model.encoder.down.0.block.0.norm1.weight",
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
        "first_stage_model.encoder.mid.attn_1.proj_out.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.norm_out.bias",
        "first_stage_model.post_quant_conv.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.1.self_attn.out_proj.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ):
        assert key in checkpoint, key
    for absent in ("model.diffusion_model.output_blocks.11.2.conv.weight", "first_stage_model.decoder.up.0.upsample.conv.weight",
                   "first_stage_model.encoder.down.3.downsample.conv.weight"):
        assert absent not in checkpoint
    assert all(key.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_ENCODER_PREFIX)) for key in checkpoint)
    # The VAE's attention is a 1x1 convolution in the original layout.
    assert checkpoint["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4


def test_every_tensor_maps_to_one_key(tiny_pipeline: StableDiffusionPipeline, checkpoint: dict[str, torch.Tensor]) -> None:
    assert len(checkpoint) == sum(len(state) for state in pipeline_state_dicts(tiny_pipeline).values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_through_from_single_file_is_exact(
    tmp_path: Path, tiny_model_dir: Path, dtype: torch.dtype
) -> None:
    pipeline = load_pipeline(str(tiny_model_dir), dtype=dtype)
    folder, file = tmp_path / "pipeline", tmp_path / "model.safetensors"
    write_pipeline_folder(pipeline, folder)
    checkpoint = single_file_checkpoint(pipeline)
    write_single_file(checkpoint, file)
    assert {tensor.dtype for tensor in load_file(file).values()} == {dtype}
    verify_single_file(file, folder, checkpoint, pipeline_state_dicts(pipeline))  # raises on any difference
    loaded = StableDiffusionPipeline.from_single_file(str(file), config=str(folder), local_files_only=True)
    for name, state in pipeline_state_dicts(pipeline).items():
        loaded_state = getattr(loaded, name).state_dict()
        assert loaded_state.keys() == state.keys()
        assert all(torch.equal(loaded_state[k].to(dtype), v) for k, v in state.items()), name


def test_a_missing_tensor_is_named(tmp_path: Path, tiny_pipeline: StableDiffusionPipeline, checkpoint: dict[str, torch.Tensor]) -> None:
    folder, file = tmp_path / "pipeline", tmp_path / "model.safetensors"
    write_pipeline_folder(tiny_pipeline, folder)
    broken = dict(checkpoint)
    del broken["model.diffusion_model.output_blocks.3.0.in_layers.2.weight"]
    write_single_file(broken, file)
    with pytest.raises(ExportVerificationError, match=r"1 missing \(model\.diffusion_model\.output_blocks\.3\.0\.in_layers\.2\.weight\)"):
        verify_single_file(file, folder, checkpoint, pipeline_state_dicts(tiny_pipeline))


def test_a_tensor_diffusers_ignores_is_reported(tmp_path: Path, tiny_pipeline: StableDiffusionPipeline, checkpoint: dict[str, torch.Tensor]) -> None:
    folder, file = tmp_path / "pipeline", tmp_path / "model.safetensors"
    write_pipeline_folder(tiny_pipeline, folder)
    extended = {**checkpoint, "model.diffusion_model.not_a_layer.weight": torch.zeros(2)}
    write_single_file(extended, file)
    with pytest.raises(ExportVerificationError, match="ignored by diffusers"):
        verify_single_file(file, folder, extended, pipeline_state_dicts(tiny_pipeline))


def test_sd2_text_encoder_is_refused_with_the_fix(tiny_pipeline: StableDiffusionPipeline) -> None:
    config = type(tiny_pipeline.text_encoder.config)(**{**tiny_pipeline.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    with pytest.raises(UnsupportedModelError, match="--export.single_file false"):
        check_single_file_support(tiny_pipeline.unet.config, tiny_pipeline.vae.config, config)
    check_single_file_support(tiny_pipeline.unet.config, tiny_pipeline.vae.config, tiny_pipeline.text_encoder.config)


def test_vae_with_sd15s_two_layers_per_block_round_trips(tmp_path: Path, tiny_pipeline: StableDiffusionPipeline) -> None:
    # The tiny VAE has one resnet per level; SD1.5's has two (three in the decoder), as built here.
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
    )
    pipeline = StableDiffusionPipeline(**{**tiny_pipeline.components, "vae": vae})
    folder, file = tmp_path / "pipeline", tmp_path / "model.safetensors"
    write_pipeline_folder(pipeline, folder)
    checkpoint = single_file_checkpoint(pipeline)
    assert "first_stage_model.decoder.up.0.block.2.conv2.weight" in checkpoint  # decoder level 3 of diffusers
    assert "first_stage_model.encoder.down.0.block.1.norm1.weight" in checkpoint
    write_single_file(checkpoint, file)
    verify_single_file(file, folder, checkpoint, pipeline_state_dicts(pipeline))
