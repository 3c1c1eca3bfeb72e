"""The diffusers LoRA folder (``pytorch_lora_weights.safetensors``) that ``load_lora_weights`` reads."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_diffusers
from peft import get_peft_model_state_dict

from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.core.loading import ModelFamily, pipeline_class
from pdm_lightning.export.lora_layers import has_lora
from pdm_lightning.training.lora import ADAPTER_NAME

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


# What diffusers' converter names an attention projection's down / up matrices (UNet, text encoder).
UNET_DOWN_UP = (".lora.down.", ".lora.up.")
TEXT_ENCODER_DOWN_UP = (".lora_linear_layer.down.", ".lora_linear_layer.up.")


def diffusers_lora_layers(
    model: torch.nn.Module, dtype: torch.dtype, key_prefix: str = "", down_up: tuple[str, str] = UNET_DOWN_UP
) -> dict[str, torch.Tensor]:
    """The adapter of ``model`` in diffusers' LoRA key layout, as detached CPU tensors in ``dtype``.

    diffusers' ``convert_state_dict_to_diffusers`` renames only the attention projections and leaves
    peft's ``lora_A`` / ``lora_B`` on every other layer (``time_emb_proj``, ``proj_in``, ``ff``...);
    ``load_lora_weights`` then looks at the FIRST key alone to decide the layout and silently drops the
    layers of the other one. Every key is written in one layout (``down_up``) so all of them load.
    """
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME))
    down, up = down_up
    return {
        key_prefix + key.replace(".lora_A.", down).replace(".lora_B.", up): value.detach().to("cpu", dtype).contiguous()
        for key, value in state.items()
    }


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
    destination: Path,
    unet: torch.nn.Module,
    text_encoders: Mapping[str, torch.nn.Module | None],
    dtype: torch.dtype = torch.float32,
    family: ModelFamily = "sd",
) -> dict[str, torch.Tensor]:
    """Writes the folder atomically; returns the tensors written (keys as in the file).

    ``text_encoders`` maps component names (``text_encoder``, and SDXL's ``text_encoder_2``) to the
    encoders; each one's adapter is included when it has one (``train_text_encoder`` with LoRA). The
    file is written by the family's pipeline class (``save_lora_weights``), so that class's
    ``load_lora_weights`` reads it.
    """
    kwargs = {
        "unet_lora_layers": diffusers_lora_layers(unet, dtype),
        "unet_lora_adapter_metadata": lora_adapter_metadata(unet),
    }
    for name, encoder in text_encoders.items():
        if has_lora(encoder):
            kwargs[f"{name}_lora_layers"] = diffusers_lora_layers(
                encoder, dtype, text_encoder_key_prefix(encoder), TEXT_ENCODER_DOWN_UP
            )
            kwargs[f"{name}_lora_adapter_metadata"] = lora_adapter_metadata(encoder)
    with staged_directory(destination) as staging:
        pipeline_class(family).save_lora_weights(staging, weight_name=LORA_WEIGHT_NAME, safe_serialization=True, **kwargs)
    written = {f"unet.{key}": value for key, value in kwargs["unet_lora_layers"].items()}
    for name in text_encoders:
        written.update({f"{name}.{key}": value for key, value in kwargs.get(f"{name}_lora_layers", {}).items()})
    return written
