"""Capturing the PDM layer's query projection (``to_q``) during a UNet forward, and switching LoRA off for the teacher."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# docs/method.md: to_q of the first self-attention of the first transformer block of the last attention
# module of the last up block (SD1.5 at 512 px: 4096 tokens x 320).
DEFAULT_PDM_LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"


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
    """A forward hook on ``layer`` of ``model`` that keeps the layer's latest output.

    Register it AFTER any LoRA injection: peft replaces ``to_q`` by a wrapper whose output includes
    the adapter's delta, and the original Linear becomes the wrapper's ``base_layer``. A hook taken
    before injection stays on that base layer and would miss the delta. The output keeps its graph
    (the student's query must backpropagate); the teacher runs under ``torch.no_grad``.
    """

    def __init__(self, model: torch.nn.Module, layer: str = DEFAULT_PDM_LAYER) -> None:
        self.layer = layer
        self.module = resolve_layer(model, layer)
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
