"""The diffusers LoRA folder (``pytorch_lora_weights.safetensors``) that ``load_lora_weights`` reads."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict

from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.export.lora_layers import has_lora
from pdm_lightning.training.lora import ADAPTER_NAME

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def diffusers_lora_layers(model: torch.nn.Module, dtype: torch.dtype, key_prefix: str = "") -> dict[str, torch.Tensor]:
    """The adapter of ``model`` in diffusers' LoRA key layout, as detached CPU tensors in ``dtype``."""
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    return {key_prefix + key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}


def text_encoder_key_prefix(text_encoder: torch.nn.Module) -> str:
    """``text_model.`` where the text encoder lacks that level (transformers >= 5.6).

    Older transformers releases, ComfyUI and diffusers itself all understand the keys with the
    prefix (diffusers strips it when the model has no such level), so the file loads everywhere.
    """
    return "" if hasattr(text_encoder, "text_model") else "text_model."


def lora_adapter_metadata(model: torch.nn.Module) -> dict:
    """The adapter's LoraConfig as a dict; diffusers stores it in the file so rank and alpha load back."""
    return model.peft_config[ADAPTER_NAME].to_dict()


def write_lora_folder(
    destination: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Writes the folder atomically; returns the tensors written (keys as in the file).

    The text encoder's adapter is included when it has one (``train_text_encoder`` with LoRA).
    """
    kwargs = {
        "unet_lora_layers": diffusers_lora_layers(unet, dtype),
        "unet_lora_adapter_metadata": lora_adapter_metadata(unet),
    }
    if has_lora(text_encoder):
        kwargs["text_encoder_lora_layers"] = diffusers_lora_layers(text_encoder, dtype, text_encoder_key_prefix(text_encoder))
        kwargs["text_encoder_lora_adapter_metadata"] = lora_adapter_metadata(text_encoder)
    with staged_directory(destination) as staging:
        StableDiffusionPipeline.save_lora_weights(staging, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    written = {f"unet.{key}": value for key, value in kwargs["unet_lora_layers"].items()}
    written.update({f"text_encoder.{key}": value for key, value in kwargs.get("text_encoder_lora_layers", {}).items()})
    return written
