"""Whole-model exports: the diffusers pipeline folder and the single original-layout file."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.core.atomic import write_safetensors_atomically
from pdm_lightning.export.single_file import to_original_layout
from pdm_lightning.core.loading import load_pipeline

# The parts whose weights a pipeline export holds (tokenizer and scheduler have none).
WEIGHTED_COMPONENTS = ("unet", "vae", "text_encoder")


def fine_tuned_pipeline(module, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:  # noqa: ANN001 - DreamBoothModule
    """The base model with the module's fully fine-tuned UNet (and text encoder when trained), in ``dtype``.

    Frozen parts are read again from the base model rather than taken from the module, where they
    may be stored in a reduced training dtype.
    """
    trained = {"unet": module.unet}
    if module.hparams.train_text_encoder:
        trained["text_encoder"] = module.text_encoder
    # Never cast the live modules (a round trip through half precision would lose their weights).
    trained = {name: _in_dtype(part, dtype) for name, part in trained.items()}
    hparams = module.hparams
    return load_pipeline(hparams.pretrained_model_name_or_path, hparams.revision, hparams.variant, dtype, **trained)


def merged_lora_pipeline(base: StableDiffusionPipeline, lora_folder: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    """``base`` (float32, no adapters) with the exported LoRA fused into its weights, then cast to ``dtype``.

    Fusing goes through diffusers' own loader, so the merged model is what a user would get from
    ``load_lora_weights`` + ``fuse_lora``. ``base`` is modified in place and returned.
    """
    base.load_lora_weights(str(lora_folder), adapter_name="merge")
    base.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0)
    base.unload_lora_weights()
    return base.to(dtype=dtype)


def pipeline_state_dicts(pipeline: StableDiffusionPipeline) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipeline, name).state_dict() for name in WEIGHTED_COMPONENTS}


def write_pipeline_folder(pipeline: StableDiffusionPipeline, destination: Path) -> None:
    """``save_pretrained`` (safetensors) into a staging folder that replaces ``destination`` when complete."""
    with staged_directory(destination) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)


def single_file_checkpoint(pipeline: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """The pipeline's weights in the original SD1.x layout (as CPU tensors)."""
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
