"""One LoRA ``.safetensors`` file in the kohya-ss / AUTOMATIC1111 key layout.

Each adapted layer ``L`` becomes three tensors: ``L.lora_down.weight`` (rank x in),
``L.lora_up.weight`` (out x rank) and ``L.alpha`` (a scalar; the update is scaled by
alpha / rank). ``L`` is the layer's diffusers module path with dots turned into underscores,
prefixed ``lora_unet_`` for the UNet and ``lora_te_`` for the SD1.x text encoder, whose path
starts at ``text_model`` (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). diffusers'
own ``convert_state_dict_to_kohya`` is not used: it names the text encoder ``lora_te1_`` (the
SDXL convention) and writes alpha = rank whatever the adapter's alpha.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdm_lightning.core.atomic import write_safetensors_atomically
from pdm_lightning.export.lora_layers import LoraWeights

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"


def kohya_layer_name(module_path: str, prefix: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_blocks_0_..._to_out_0``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_module_path(module_path: str) -> str:
    """The SD1.x CLIP path kohya names start from (transformers >= 5.6 dropped the ``text_model`` level)."""
    return module_path if module_path.startswith("text_model.") else f"text_model.{module_path}"


def kohya_state_dict(
    unet_layers: dict[str, LoraWeights], text_encoder_layers: dict[str, LoraWeights], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The file's tensors: lora_down, lora_up and alpha for every adapted layer, nothing else."""
    named = [(kohya_layer_name(path, UNET_PREFIX), layer) for path, layer in unet_layers.items()]
    named += [
        (kohya_layer_name(text_encoder_module_path(path), TEXT_ENCODER_PREFIX), layer)
        for path, layer in text_encoder_layers.items()
    ]
    state: dict[str, torch.Tensor] = {}
    for name, layer in named:
        if f"{name}.alpha" in state:
            raise ValueError(f"two adapted layers share the kohya name {name}")
        state[f"{name}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
        state[f"{name}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return state


def kohya_metadata(unet_layers: dict[str, LoraWeights], text_encoder_layers: dict[str, LoraWeights], base_model: str) -> dict[str, str]:
    """The ``ss_*`` header fields kohya's tools and the UIs' LoRA browsers read (all strings)."""
    any_layer = next(iter({**unet_layers, **text_encoder_layers}.values()))
    modules = "unet" if not text_encoder_layers else "unet, text encoder"
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(any_layer.rank),
        "ss_network_alpha": json.dumps(any_layer.alpha),
        "ss_base_model_version": "sd_v1",
        "ss_sd_model_name": base_model,
        "ss_training_comment": f"pdm_lightning LoRA ({modules})",
    }


def write_kohya_file(
    destination: Path,
    unet_layers: dict[str, LoraWeights],
    text_encoder_layers: dict[str, LoraWeights],
    dtype: torch.dtype = torch.float32,
    base_model: str = "",
) -> dict[str, torch.Tensor]:
    """Writes the file atomically; returns the tensors written."""
    state = kohya_state_dict(unet_layers, text_encoder_layers, dtype)
    write_safetensors_atomically(destination, state, kohya_metadata(unet_layers, text_encoder_layers, base_model))
    return state
