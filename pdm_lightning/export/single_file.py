"""Diffusers Stable Diffusion 1.x weights -> one ``.safetensors`` file in the original (LDM) key layout.

AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` load checkpoints laid out like the
original CompVis release: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.transformer.text_model.*`` (CLIP text encoder). The renaming is computed from
the models' configs (levels, layers per block, which blocks have attention), so it holds for any
SD1.x-shaped model, the tiny test model included. Every tensor is mapped: a key that no rule
covers raises instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."

# Parameter names inside a residual block: diffusers -> LDM.
_UNET_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_PARTS = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class UnsupportedModelError(ValueError):
    """The model cannot be written in the original SD1.x layout (e.g. SD 2.x's OpenCLIP text encoder)."""


def unet_module_map(config: Mapping) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers UNet module path -> (LDM module path, renames of the parts inside it).

    LDM numbers the UNet's layers flatly: ``input_blocks.0`` is conv_in, then each level has
    ``layers_per_block`` (resnet, attention) pairs and, except the last level, a downsampler;
    ``output_blocks`` has ``layers_per_block + 1`` pairs per level, the last one ending with the
    upsampler (after the attention when the level has one).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnsupportedModelError("single-file export needs the same layers_per_block on every level (SD1.x).")
    if config.get("class_embed_type") or config.get("addition_embed_type"):
        raise UnsupportedModelError("single-file export covers SD1.x UNets, not ones with class or added embeddings (SDXL).")
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    mapping: dict[str, tuple[str, dict[str, str]]] = {
        "time_embedding.linear_1": ("time_embed.0", {}),
        "time_embedding.linear_2": ("time_embed.2", {}),
        "conv_in": ("input_blocks.0.0", {}),
        "conv_norm_out": ("out.0", {}),
        "conv_out": ("out.2", {}),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET_PARTS),
        "mid_block.attentions.0": ("middle_block.1", {}),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET_PARTS),
    }
    for level, block_type in enumerate(down_types):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            mapping[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET_PARTS)
            if _has_attention(block_type):
                mapping[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
        if level < len(down_types) - 1:
            index = 1 + level * (layers + 1) + layers
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
    for level, block_type in enumerate(up_types):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            mapping[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET_PARTS)
            if _has_attention(block_type):
                mapping[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
        if level < len(up_types) - 1:
            index = level * (layers + 1) + layers
            slot = 2 if _has_attention(block_type) else 1
            mapping[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{index}.{slot}.conv", {})
    return mapping


def vae_module_map(config: Mapping) -> dict[str, tuple[str, dict[str, str]]]:
    """Diffusers AutoencoderKL module path -> (LDM module path, renames inside it).

    LDM counts the decoder's levels from the lowest resolution up, diffusers from the first one
    applied, so decoder level ``i`` is LDM's ``up.{n - 1 - i}``.
    """
    levels = len(config["down_block_types"])
    layers = config["layers_per_block"]
    mapping: dict[str, tuple[str, dict[str, str]]] = {
        "quant_conv": ("quant_conv", {}),
        "post_quant_conv": ("post_quant_conv", {}),
    }
    for part in ("encoder", "decoder"):
        mapping[f"{part}.conv_in"] = (f"{part}.conv_in", {})
        mapping[f"{part}.conv_norm_out"] = (f"{part}.norm_out", {})
        mapping[f"{part}.conv_out"] = (f"{part}.conv_out", {})
        mapping[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET_PARTS)
        mapping[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET_PARTS)
        mapping[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTENTION_PARTS)
    for level in range(levels):
        for layer in range(layers):
            mapping[f"encoder.down_blocks.{level}.resnets.{layer}"] = (f"encoder.down.{level}.block.{layer}", _VAE_RESNET_PARTS)
        if level < levels - 1:
            mapping[f"encoder.down_blocks.{level}.downsamplers.0.conv"] = (f"encoder.down.{level}.downsample.conv", {})
        ldm_level = levels - 1 - level
        for layer in range(layers + 1):
            mapping[f"decoder.up_blocks.{level}.resnets.{layer}"] = (f"decoder.up.{ldm_level}.block.{layer}", _VAE_RESNET_PARTS)
        if level < levels - 1:
            mapping[f"decoder.up_blocks.{level}.upsamplers.0.conv"] = (f"decoder.up.{ldm_level}.upsample.conv", {})
    return mapping


def rename_state_dict(
    state_dict: Mapping[str, torch.Tensor], module_map: Mapping[str, tuple[str, Mapping[str, str]]], what: str
) -> dict[str, str]:
    """Diffusers key -> LDM key for every key of ``state_dict`` (longest matching module path wins).

    Raises on a key no module path covers, and on two keys landing on one name, so nothing is
    silently lost.
    """
    by_length = sorted(module_map, key=len, reverse=True)
    renamed: dict[str, str] = {}
    unmapped = []
    for key in state_dict:
        source = next((path for path in by_length if key.startswith(path + ".")), None)
        if source is None:
            unmapped.append(key)
            continue
        target, parts = module_map[source]
        rest = key[len(source) + 1 :]
        part = next((p for p in sorted(parts, key=len, reverse=True) if rest.startswith(p + ".")), None)
        if part is not None:
            rest = parts[part] + rest[len(part) :]
        renamed[key] = f"{target}.{rest}"
    if unmapped:
        raise UnsupportedModelError(
            f"{len(unmapped)} {what} weights have no place in the original SD layout (e.g. {unmapped[0]}): "
            "this model is not SD1.x-shaped; export the diffusers pipeline folder instead."
        )
    if len(set(renamed.values())) != len(renamed):
        raise UnsupportedModelError(f"two {what} weights map to one original-layout name: the {what} config is not SD1.x-shaped.")
    return renamed


def check_text_encoder_is_sd1(config: object) -> None:
    """SD1.x's text encoder is OpenAI CLIP (quick_gelu); SD 2.x's OpenCLIP has another original layout."""
    activation = getattr(config, "hidden_act", None)
    if activation != "quick_gelu":
        raise UnsupportedModelError(
            f"the text encoder uses {activation!r} activations, not SD1.x's CLIP ('quick_gelu'): single-file export "
            "writes the SD1.x layout only. Set --export.single_file false and use the diffusers pipeline folder."
        )


def check_single_file_support(unet_config: Mapping, vae_config: Mapping, text_encoder_config: object) -> None:
    """Raises UnsupportedModelError, before any training, when the model cannot be written as a single file."""
    check_text_encoder_is_sd1(text_encoder_config)
    unet_module_map(unet_config)
    vae_module_map(vae_config)


def to_original_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_config: Mapping,
) -> dict[str, torch.Tensor]:
    """One state dict in the original SD1.x checkpoint layout from the three diffusers state dicts.

    The VAE's mid-block attention is a 1x1 convolution in LDM, a linear layer in diffusers: its
    weights get the two trailing unit dimensions back.
    """
    checkpoint: dict[str, torch.Tensor] = {}
    for key, ldm_key in rename_state_dict(unet, unet_module_map(unet_config), "UNet").items():
        checkpoint[UNET_PREFIX + ldm_key] = unet[key]
    for key, ldm_key in rename_state_dict(vae, vae_module_map(vae_config), "VAE").items():
        tensor = vae[key]
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        checkpoint[VAE_PREFIX + ldm_key] = tensor
    for key, tensor in text_encoder.items():
        # transformers >= 5.6 dropped CLIPTextModel's ``text_model`` level; older releases keep it.
        checkpoint[TEXT_ENCODER_PREFIX + key.removeprefix("text_model.")] = tensor
    return {key: value.detach().contiguous() for key, value in checkpoint.items()}


def _has_attention(block_type: str) -> bool:
    return "CrossAttn" in block_type or block_type.startswith("Attn")

