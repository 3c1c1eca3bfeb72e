"""Building a sampling pipeline from what a run leaves behind: an exported pipeline, a LoRA, or a checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from pdm_lightning.data.images import InputDataError
from pdm_lightning.model.inference import inference_pipeline
from pdm_lightning.model.loading import check_model_source, load_pipeline
from pdm_lightning.model.module import DreamBoothModule


def _existing(path: str | Path, role: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputDataError(f"{role} {path} does not exist: {fix}")
    return path


def pipeline_from_folder(pipeline_dir: str | Path, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """An exported pipeline folder (``<run>/export/pipeline``) or any diffusers SD folder."""
    path = _existing(pipeline_dir, "--pipeline", "point it at <run>/export/pipeline or a diffusers folder.")
    check_model_source(str(path))
    return load_pipeline(str(path), dtype=dtype)


def pipeline_with_lora(
    pretrained_model_name_or_path: str, lora: str | Path, dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """The base model with LoRA weights: a diffusers LoRA folder (``pytorch_lora_weights.safetensors``)
    or a single ``.safetensors`` file (diffusers or kohya layout; diffusers converts kohya keys)."""
    lora_path = _existing(lora, "--lora", "give the exported LoRA folder or a .safetensors file.")
    check_model_source(pretrained_model_name_or_path)
    pipeline = load_pipeline(pretrained_model_name_or_path, dtype=dtype)
    if lora_path.is_file():
        pipeline.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    else:
        weights = sorted(lora_path.glob("*.safetensors")) + sorted(lora_path.glob("*.bin"))
        if not weights:
            raise InputDataError(f"--lora {lora_path} holds no .safetensors/.bin LoRA weights: give the LoRA folder "
                                 "written by the export (pytorch_lora_weights.safetensors) or the file itself.")
        pipeline.load_lora_weights(str(lora_path), weight_name=weights[0].name)
    return pipeline


def module_from_checkpoint(
    checkpoint: str | Path, pretrained_model_name_or_path: str | None = None
) -> DreamBoothModule:
    """The DreamBoothModule a training checkpoint was saved from, with its trained weights loaded.

    Lightning rebuilds it from the saved hyper-parameters (through the CLI's instantiator, so nested
    settings such as ``lora`` come back as their classes), calls ``configure_model`` and loads the
    weights. Checkpoints hold only the trainable weights: the frozen ones come from the base model
    recorded in the checkpoint, or from ``pretrained_model_name_or_path`` when it has moved.
    """
    path = _existing(checkpoint, "--checkpoint", "give a .ckpt from <run>/checkpoints (e.g. last.ckpt).")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "hyper_parameters" not in state or "state_dict" not in state:
        raise InputDataError(f"--checkpoint {path} is not a pdm_lightning training checkpoint (no hyper_parameters / "
                             "state_dict): give a .ckpt from <run>/checkpoints.")
    base = pretrained_model_name_or_path or state["hyper_parameters"]["pretrained_model_name_or_path"]
    check_model_source(base, state["hyper_parameters"].get("revision"))
    with warnings.catch_warnings():
        # Every frozen weight is "missing" from the checkpoint by design (they come from the base model).
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        module = DreamBoothModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=False, pretrained_model_name_or_path=base
        )
    return module.eval()


def pipeline_from_checkpoint(
    checkpoint: str | Path,
    pretrained_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> StableDiffusionPipeline:
    """A pipeline over the checkpoint's module (LoRA adapters active, if it trained LoRA)."""
    module = module_from_checkpoint(checkpoint, pretrained_model_name_or_path)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return inference_pipeline(module)


def build_pipeline(
    pipeline_dir: str | Path | None = None,
    pretrained_model_name_or_path: str | None = None,
    lora: str | Path | None = None,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[StableDiffusionPipeline, str]:
    """The pipeline for exactly one source, and a description of it for the images' metadata."""
    chosen = [name for name, value in (("--pipeline", pipeline_dir), ("--lora", lora), ("--checkpoint", checkpoint))
              if value]
    if len(chosen) != 1:
        raise InputDataError(
            "Give exactly one model source: --pipeline FOLDER, or --pretrained_model_name_or_path BASE --lora "
            f"LORA, or --checkpoint CKPT (got {', '.join(chosen) or 'none'})."
        )
    if pipeline_dir:
        return pipeline_from_folder(pipeline_dir, dtype), str(pipeline_dir)
    if lora:
        if not pretrained_model_name_or_path:
            raise InputDataError("--lora needs --pretrained_model_name_or_path: the base model the LoRA was trained on")
        description = f"{pretrained_model_name_or_path} + {lora}"
        return pipeline_with_lora(pretrained_model_name_or_path, lora, dtype), description
    return pipeline_from_checkpoint(checkpoint, pretrained_model_name_or_path, dtype), str(checkpoint)
