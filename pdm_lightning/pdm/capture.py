"""Capturing the PDM layer's query projection (``to_q``) during a UNet forward, and switching LoRA off for the teacher."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

# docs/method.md: to_q of the first self-attention of the first transformer block of the last attention
# module of the last up block (SD1.5 at 512 px: 4096 tokens x 320). ``default_pdm_layer`` generalises it.
DEFAULT_PDM_LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"
QUERY_IN_BLOCK = "transformer_blocks.0.attn1.to_q"


def block_has_attention(block_type: str) -> bool:
    """Whether a UNet block of this diffusers type (``CrossAttnUpBlock2D``, ``AttnDownBlock2D``, ...) has attention."""
    return "CrossAttn" in block_type or block_type.startswith("Attn")


def default_pdm_layer_for_config(config: Mapping[str, Any]) -> str:
    """The PDM layer of a UNet described by its config (no weights needed): see ``default_pdm_layer``.

    Up blocks run from the lowest resolution to the highest, so the highest-resolution up block with
    attention is the last such block; an up block has ``layers_per_block + 1`` layers (diffusers reverses
    a per-level ``layers_per_block`` for the up path).
    """
    up_types = list(config["up_block_types"])
    with_attention = [index for index, block_type in enumerate(up_types) if block_has_attention(block_type)]
    if not with_attention:
        raise ValueError("The UNet has no up block with attention: there is no query projection for PDM to capture.")
    level = with_attention[-1]
    layers = config["layers_per_block"]
    per_level = list(reversed(layers)) if isinstance(layers, (list, tuple)) else [layers] * len(up_types)
    return f"up_blocks.{level}.attentions.{per_level[level]}.{QUERY_IN_BLOCK}"


def default_pdm_layer(unet: torch.nn.Module) -> str:
    """The self-attention query (``attn1.to_q``) of the first transformer block of the last attention module
    of the highest-resolution up block that has attention.

    SD1.5: ``up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q`` (the paper's layer, DEFAULT_PDM_LAYER);
    SDXL base: ``up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q`` (SDXL's last up block has no
    attention; using it for PDM is this project's extension, not the paper's). Read from the modules, so
    any UNet2DConditionModel layout gets its own layer.
    """
    up_blocks = unet.get_submodule("up_blocks")
    for level in reversed(range(len(up_blocks))):
        attentions = getattr(up_blocks[level], "attentions", None)
        if attentions:
            layer = f"up_blocks.{level}.attentions.{len(attentions) - 1}.{QUERY_IN_BLOCK}"
            resolve_layer(unet, layer)
            return layer
    raise ValueError("The UNet has no up block with attention: there is no query projection for PDM to capture.")


def resolve_layer(model: torch.nn.Module, layer: str) -> torch.nn.Module:
    """The submodule at dotted path ``layer``, with the candidate paths in the error when it is absent."""
    try:
        return model.get_submodule(layer)
    except AttributeError as error:
        candidates = [name for name, _ in model.named_modules() if name.endswith(".to_q")]
        raise ValueError(
            f"The model has no layer {layer!r} to capture PDM queries from. Choose one of its query projections, "
            f"e.g. {', '.join(candidates[-3:]) or '(none found)'}."
        ) from error


class QueryCapture:
    """A forward hook on ``layer`` of ``model`` (None: ``default_pdm_layer``) that keeps the layer's latest output.

    Register it AFTER any LoRA injection: peft replaces ``to_q`` by a wrapper whose output includes
    the adapter's delta, and the original Linear becomes the wrapper's ``base_layer``. A hook taken
    before injection stays on that base layer and would miss the delta. The output keeps its graph
    (the student's query must backpropagate); the teacher runs under ``torch.no_grad``.
    """

    def __init__(self, model: torch.nn.Module, layer: str | None = DEFAULT_PDM_LAYER) -> None:
        self.layer = layer if layer is not None else default_pdm_layer(model)  # None: the model's own PDM layer
        self.module = resolve_layer(model, self.layer)
        self.output: torch.Tensor | None = None
        self._handle = self.module.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.output = output

    def pop(self) -> torch.Tensor:
        """The output of the latest forward, then forgets it (so a stale query is never reused)."""
        if self.output is None:
            raise RuntimeError(f"No forward pass went through {self.layer} since the last pop().")
        output, self.output = self.output, None
        return output

    def remove(self) -> None:
        self._handle.remove()
        self.output = None

    def __enter__(self) -> QueryCapture:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()


def _tuner_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # peft absent: no adapters can be present
        return []
    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Runs ``model`` as its base weights: every peft adapter layer is switched off inside the block.

    This is how the teacher shares the student's UNet under LoRA (no second copy). Each layer's
    previous state is restored on exit, also after an error. peft's switch also flips the adapter
    weights' ``requires_grad``; those flags are restored too, so a teacher call between the student's
    forward and backward leaves training unchanged. A model without adapters is unchanged.
    """
    layers = _tuner_layers(model)
    was_disabled = [layer.disable_adapters for layer in layers]
    requires_grad = [[(p, p.requires_grad) for p in layer.parameters()] for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield model
    finally:
        for layer, disabled, flags in zip(layers, was_disabled, requires_grad):
            layer.enable_adapters(not disabled)
            for param, flag in flags:
                param.requires_grad_(flag)
