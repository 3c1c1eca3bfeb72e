"""Diffusers Stable Diffusion 1.x / SDXL weights -> one ``.safetensors`` file in the original key layout.

AUTOMATIC1111, ComfyUI and diffusers' ``from_single_file`` load checkpoints laid out like the
original releases: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and, for SD1.x
(CompVis), ``cond_stage_model.transformer.text_model.*`` (CLIP text encoder); for SDXL (Stability's
sgm), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L) and
``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG, in open_clip's own layout: one fused
``in_proj`` per attention, ``resblocks``, a transposed ``text_projection``). The renaming is computed
from the models' configs (levels, layers per block, which blocks have attention), so it holds for
any SD1.x- or SDXL-shaped model, the tiny test models included. Every tensor is mapped: a key that
no rule covers raises instead of being dropped.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pdm_lightning.pdm.capture import block_has_attention

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer.text_model."
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_TEXT_ENCODER_2_PREFIX = "conditioner.embedders.1.model."
# Inside one transformers CLIP encoder layer -> open_clip's residual block (q/k/v are fused, see open_clip_layout).
_OPEN_CLIP_LAYER_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}

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
    upsampler (after the attention when the level has one). SDXL's UNet (Stability's ``sgm`` code) has
    the same layout plus ``label_emb`` (diffusers' ``add_embedding``, the size and pooled-text MLP).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise UnsupportedModelError("the original layout needs the same layers_per_block on every level (SD1.x, SDXL).")
    if config.get("class_embed_type") or config.get("addition_embed_type") not in (None, "text_time"):
        raise UnsupportedModelError("the original layout covers SD1.x and SDXL UNets, not ones with other class or added embeddings.")
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
    if config.get("addition_embed_type") == "text_time":
        mapping["add_embedding.linear_1"] = ("label_emb.0.0", {})
        mapping["add_embedding.linear_2"] = ("label_emb.0.2", {})
    for level, block_type in enumerate(down_types):
        for layer in range(layers):
            index = 1 + level * (layers + 1) + layer
            mapping[f"down_blocks.{level}.resnets.{layer}"] = (f"input_blocks.{index}.0", _UNET_RESNET_PARTS)
            if block_has_attention(block_type):
                mapping[f"down_blocks.{level}.attentions.{layer}"] = (f"input_blocks.{index}.1", {})
        if level < len(down_types) - 1:
            index = 1 + level * (layers + 1) + layers
            mapping[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", {})
    for level, block_type in enumerate(up_types):
        for layer in range(layers + 1):
            index = level * (layers + 1) + layer
            mapping[f"up_blocks.{level}.resnets.{layer}"] = (f"output_blocks.{index}.0", _UNET_RESNET_PARTS)
            if block_has_attention(block_type):
                mapping[f"up_blocks.{level}.attentions.{layer}"] = (f"output_blocks.{index}.1", {})
        if level < len(up_types) - 1:
            index = level * (layers + 1) + layers
            slot = 2 if block_has_attention(block_type) else 1
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


def ldm_module_path(module_path: str, module_map: Mapping[str, tuple[str, Mapping[str, str]]], what: str = "UNet") -> str:
    """The original-layout path of one diffusers module (a LoRA's adapted layer): longest mapped prefix wins."""
    renamed = rename_state_dict({f"{module_path}.weight": None}, module_map, what)  # a stand-in parameter
    return renamed[f"{module_path}.weight"].removesuffix(".weight")


def check_text_encoder_is_sd1(config: object) -> None:
    """SD1.x's text encoder is OpenAI CLIP (quick_gelu); SD 2.x's OpenCLIP has another original layout."""
    activation = getattr(config, "hidden_act", None)
    if activation != "quick_gelu":
        raise UnsupportedModelError(
            f"the text encoder uses {activation!r} activations, not SD1.x's CLIP ('quick_gelu'): single-file export "
            "writes the SD1.x layout only. Set --export.single_file false and use the diffusers pipeline folder."
        )


def is_sdxl_unet(unet_config: Mapping) -> bool:
    return unet_config.get("addition_embed_type") == "text_time"


def check_single_file_support(unet_config: Mapping, vae_config: Mapping, text_encoder_config: object) -> None:
    """Raises UnsupportedModelError, before any training, when the model cannot be written as a single file."""
    if not is_sdxl_unet(unet_config):  # SDXL's encoders have their own layouts (CLIP-L and open_clip's)
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
    checkpoint = _unet_and_vae(unet, vae, unet_config, vae_config)
    for key, tensor in text_encoder.items():
        # transformers >= 5.6 dropped CLIPTextModel's ``text_model`` level; older releases keep it.
        checkpoint[TEXT_ENCODER_PREFIX + key.removeprefix("text_model.")] = tensor
    return {key: value.detach().contiguous() for key, value in checkpoint.items()}


def to_original_sdxl_layout(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
    unet_config: Mapping,
    vae_config: Mapping,
) -> dict[str, torch.Tensor]:
    """One state dict in SDXL's original (sgm) checkpoint layout from the four diffusers state dicts."""
    checkpoint = _unet_and_vae(unet, vae, unet_config, vae_config)
    for key, tensor in text_encoder.items():
        checkpoint[SDXL_TEXT_ENCODER_PREFIX + key.removeprefix("text_model.")] = tensor
    for key, tensor in open_clip_layout(text_encoder_2).items():
        checkpoint[SDXL_TEXT_ENCODER_2_PREFIX + key] = tensor
    return {key: value.detach().contiguous() for key, value in checkpoint.items()}


def open_clip_layout(text_encoder: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection state dict in open_clip's layout (SDXL's second encoder).

    open_clip fuses each attention's query, key and value projections into one ``in_proj`` (rows in
    q, k, v order) and stores the text projection transposed (hidden x projection).
    """
    converted: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, tensor in text_encoder.items():
        name = key.removeprefix("text_model.")
        if name in _OPEN_CLIP_TOP:
            converted[_OPEN_CLIP_TOP[name]] = tensor
        elif name == "text_projection.weight":
            converted["text_projection"] = tensor.T
        elif name.startswith("encoder.layers."):
            index, rest = name.removeprefix("encoder.layers.").split(".", 1)
            block = f"transformer.resblocks.{index}."
            projection = rest.split(".")[:2]
            if projection[0] == "self_attn" and projection[1] in ("q_proj", "k_proj", "v_proj"):
                kind = rest.rsplit(".", 1)[-1]  # weight or bias
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[projection[1][0]] = tensor
                continue
            part = next((p for p in _OPEN_CLIP_LAYER_PARTS if rest.startswith(p + ".")), None)
            if part is None:
                unmapped.append(key)
                continue
            converted[block + _OPEN_CLIP_LAYER_PARTS[part] + rest[len(part) :]] = tensor
        else:
            unmapped.append(key)
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            unmapped.append(f"{name} (only {', '.join(sorted(parts))})")
            continue
        converted[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise UnsupportedModelError(
            f"{len(unmapped)} second text encoder weights have no place in open_clip's layout (e.g. {unmapped[0]}): "
            "this model is not SDXL-shaped; export the diffusers pipeline folder instead."
        )
    return converted


def fused_tensor_count(checkpoint: Mapping[str, torch.Tensor]) -> int:
    """How many more tensors a model loaded from ``checkpoint`` has than the file: each ``in_proj`` holds three."""
    return 2 * sum(1 for key in checkpoint if key.endswith((".in_proj_weight", ".in_proj_bias")))


def _unet_and_vae(
    unet: Mapping[str, torch.Tensor], vae: Mapping[str, torch.Tensor], unet_config: Mapping, vae_config: Mapping
) -> dict[str, torch.Tensor]:
    checkpoint: dict[str, torch.Tensor] = {}
    for key, ldm_key in rename_state_dict(unet, unet_module_map(unet_config), "UNet").items():
        checkpoint[UNET_PREFIX + ldm_key] = unet[key]
    for key, ldm_key in rename_state_dict(vae, vae_module_map(vae_config), "VAE").items():
        tensor = vae[key]
        if ".mid.attn_1." in ldm_key and ldm_key.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        checkpoint[VAE_PREFIX + ldm_key] = tensor
    return checkpoint
