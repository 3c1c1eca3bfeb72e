"""Whole-model exports: the diffusers pipeline folder and the single original-layout file."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.core.atomic import write_safetensors_atomically
from pdm_lightning.core.loading import TEXT_ENCODER_NAMES, family_of_pipeline
from pdm_lightning.export.parts import base_source, text_encoders
from pdm_lightning.export.single_file import check_single_file_support, to_original_layout, to_original_sdxl_layout

def weighted_components(pipeline: DiffusionPipeline) -> tuple[str, ...]:
    """The parts whose weights a pipeline export holds (tokenizers and scheduler have none); SDXL adds text_encoder_2."""
    return ("unet", "vae", *TEXT_ENCODER_NAMES[family_of_pipeline(pipeline)])


def fine_tuned_pipeline(module, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:  # noqa: ANN001 - DreamBoothModule
    """The base model with the module's fully fine-tuned UNet (and text encoders when trained), in ``dtype``.

    Frozen parts are read again from the base model (with the run's replacement VAE, if any) rather
    than taken from the module, where they may be stored in a reduced training dtype.
    """
    trained = {"unet": module.unet}
    if module.hparams.train_text_encoder:
        trained.update(text_encoders(module))
    # Never cast the live modules (a round trip through half precision would lose their weights).
    trained = {name: _in_dtype(part, dtype) for name, part in trained.items()}
    return base_source(module).pipeline(dtype, **trained)


def merged_lora_pipeline(base: DiffusionPipeline, lora_folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    """``base`` (float32, no adapters) with the exported LoRA fused into its weights, then cast to ``dtype``.

    Fusing goes through diffusers' own loader, so the merged model is what a user would get from
    ``load_lora_weights`` + ``fuse_lora``. ``base`` is modified in place and returned.
    """
    base.load_lora_weights(str(lora_folder), adapter_name="merge")
    base.fuse_lora(components=["unet", *TEXT_ENCODER_NAMES[family_of_pipeline(base)]], lora_scale=1.0)
    base.unload_lora_weights()
    return base.to(dtype=dtype)


def pipeline_state_dicts(pipeline: DiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipeline, name).state_dict() for name in weighted_components(pipeline)}


def write_pipeline_folder(pipeline: DiffusionPipeline, destination: Path) -> None:
    """``save_pretrained`` (safetensors) into a staging folder that replaces ``destination`` when complete."""
    with staged_directory(destination) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)


def single_file_checkpoint(pipeline: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original SD1.x or SDXL layout (as CPU tensors); UnsupportedModelError for others."""
    check_single_file_support(pipeline.unet.config, pipeline.vae.config, pipeline.text_encoder.config)
    if family_of_pipeline(pipeline) == "sdxl":
        checkpoint = to_original_sdxl_layout(
            pipeline.unet.state_dict(),
            pipeline.vae.state_dict(),
            pipeline.text_encoder.state_dict(),
            pipeline.text_encoder_2.state_dict(),
            pipeline.unet.config,
            pipeline.vae.config,
        )
    else:
        checkpoint = to_original_layout(
            pipeline.unet.state_dict(),
            pipeline.vae.state_dict(),
            pipeline.text_encoder.state_dict(),
            pipeline.unet.config,
            pipeline.vae.config,
        )
    return {key: value.cpu() for key, value in checkpoint.items()}


def write_single_file(checkpoint: dict[str, torch.Tensor], destination: Path) -> None:
    write_safetensors_atomically(destination, checkpoint, metadata={"format": "pt"})


def _in_dtype(part: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    if all(p.dtype == dtype for p in part.parameters()):
        return part
    return copy.deepcopy(part).to(dtype=dtype)
