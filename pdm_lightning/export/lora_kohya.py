"""One LoRA ``.safetensors`` file in the kohya-ss / AUTOMATIC1111 key layout.

Each adapted layer ``L`` becomes three tensors: ``L.lora_down.weight`` (rank x in),
``L.lora_up.weight`` (out x rank) and ``L.alpha`` (a scalar; the update is scaled by
alpha / rank). ``L`` is the layer's module path with dots turned into underscores and a prefix:

* SD 1.x/2.x: ``lora_unet_`` + the diffusers UNet path (kohya trains SD1 on diffusers' UNet),
  ``lora_te_`` + the CLIP path from ``text_model`` (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
* SDXL: ``lora_unet_`` + the path in Stability's original (sgm) UNet, which kohya trains SDXL on
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` for diffusers'
  ``down_blocks.1.attentions.0...``), ``lora_te1_`` and ``lora_te2_`` + each text encoder's CLIP path.

diffusers' own ``convert_state_dict_to_kohya`` is not used: it keeps diffusers' UNet paths, names
the text encoder ``lora_te1_`` whatever the model, and writes alpha = rank whatever the adapter's alpha.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from pdm_lightning.core.atomic import write_safetensors_atomically
from pdm_lightning.core.loading import ModelFamily
from pdm_lightning.export.lora_layers import LoraWeights
from pdm_lightning.export.single_file import ldm_module_path, unet_module_map

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
# Component -> kohya prefix, per family.
TEXT_ENCODER_PREFIXES: dict[ModelFamily, dict[str, str]] = {
    "sd": {"text_encoder": TEXT_ENCODER_PREFIX},
    "sdxl": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}
BASE_MODEL_VERSIONS: dict[ModelFamily, str] = {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # ss_base_model_version


def kohya_layer_name(module_path: str, prefix: str) -> str:
    """``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`` -> ``lora_unet_down_blocks_0_..._to_out_0``."""
    return prefix + module_path.replace(".", "_")


def text_encoder_module_path(module_path: str) -> str:
    """The CLIP path kohya names start from (transformers >= 5.6 dropped CLIPTextModel's ``text_model`` level;
    SDXL's ``text_projection`` lies outside it)."""
    return module_path if module_path.startswith(("text_model.", "text_projection")) else f"text_model.{module_path}"


def unet_kohya_path(module_path: str, family: ModelFamily, unet_config: Mapping | None) -> str:
    """The UNet path a kohya name is made of: diffusers' for SD, the original (sgm) layout's for SDXL."""
    if family == "sd":
        return module_path
    if unet_config is None:
        raise ValueError("SDXL's kohya names follow the original UNet layout: give the UNet's config.")
    return ldm_module_path(module_path, unet_module_map(unet_config))


def kohya_state_dict(
    layers: Mapping[str, Mapping[str, LoraWeights]],
    dtype: torch.dtype = torch.float32,
    family: ModelFamily = "sd",
    unet_config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """The file's tensors: lora_down, lora_up and alpha for every adapted layer, nothing else.

    ``layers`` maps components (``unet``, ``text_encoder``, SDXL's ``text_encoder_2``) to their adapted
    layers; ``unet_config`` is needed for SDXL (its kohya names follow the original UNet layout).
    """
    prefixes = TEXT_ENCODER_PREFIXES[family]
    unknown = set(layers) - {"unet", *prefixes}
    if unknown:
        raise ValueError(f"no kohya prefix for {', '.join(sorted(unknown))} in a {family} model")
    named = [
        (kohya_layer_name(unet_kohya_path(path, family, unet_config), UNET_PREFIX), layer)
        for path, layer in layers.get("unet", {}).items()
    ]
    for component, prefix in prefixes.items():
        named += [
            (kohya_layer_name(text_encoder_module_path(path), prefix), layer)
            for path, layer in layers.get(component, {}).items()
        ]
    state: dict[str, torch.Tensor] = {}
    for name, layer in named:
        if f"{name}.alpha" in state:
            raise ValueError(f"two adapted layers share the kohya name {name}")
        state[f"{name}.lora_down.weight"] = layer.down.detach().to("cpu", dtype).contiguous()
        state[f"{name}.lora_up.weight"] = layer.up.detach().to("cpu", dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype)
    return state


def kohya_metadata(layers: Mapping[str, Mapping[str, LoraWeights]], base_model: str, family: ModelFamily = "sd") -> dict[str, str]:
    """The ``ss_*`` header fields kohya's tools and the UIs' LoRA browsers read (all strings)."""
    any_layer = next(layer for component in layers.values() for layer in component.values())
    modules = ", ".join(name.replace("_", " ") for name, component in layers.items() if component)
    return {
        "format": "pt",
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(any_layer.rank),
        "ss_network_alpha": json.dumps(any_layer.alpha),
        "ss_base_model_version": BASE_MODEL_VERSIONS[family],
        "ss_sd_model_name": base_model,
        "ss_training_comment": f"pdm_lightning LoRA ({modules})",
    }


def write_kohya_file(
    destination: Path,
    layers: Mapping[str, Mapping[str, LoraWeights]],
    dtype: torch.dtype = torch.float32,
    base_model: str = "",
    family: ModelFamily = "sd",
    unet_config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """Writes the file atomically; returns the tensors written (see ``kohya_state_dict`` for ``layers``)."""
    state = kohya_state_dict(layers, dtype, family, unet_config)
    write_safetensors_atomically(destination, state, kohya_metadata(layers, base_model, family))
    return state
