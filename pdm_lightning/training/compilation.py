"""torch.compile of the trained UNet (``--model.compile``), in place and hook-safe.

``nn.Module.compile`` compiles a module's call in place: the module objects, their names and the
state_dict keys stay as they are (no ``_orig_mod.`` prefix), so checkpoints, resume, export and
LoRA (peft) see the same model.

Scopes: ``blocks`` (regional compilation) compiles each transformer block on its own: the blocks
share their code, so one compilation per shape serves them all and start-up is much shorter than
for the whole UNet (tiny model on CPU: ~20 s against ~270 s). ``unet`` compiles the whole forward.

Hooks: the PDM query layer carries forward hooks (``pdm.capture``: the student's queries; the
on-the-fly teacher takes its own for each call). Dynamo does not guard on module hooks and the
transformer blocks share their code, so a compiled PDM block would run code traced on a sibling
without hooks and its hooks would silently not fire: under ``blocks`` the block holding a hooked
layer stays eager. Compiled whole, the UNet is traced with the hook in place and its hooks fire,
hooks taken after compiling included (tests/test_compile.py checks both scopes); keeping that block
eager there would split the graph into two dozen pieces instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from diffusers.models.attention import BasicTransformerBlock

CompileScope = Literal["blocks", "unet"]


def transformer_blocks(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's repeated transformer blocks (self-attention, cross-attention, feed-forward), by name."""
    return [(name, module) for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)]


def compile_unet(unet: torch.nn.Module, scope: CompileScope, hooked_layers: Sequence[str] = ()) -> list[str]:
    """Compiles ``unet`` in place; under ``blocks`` the blocks holding one of ``hooked_layers`` (dotted names) stay eager.

    Returns the names of the compiled modules ("" for the whole UNet).
    """
    if scope == "unet":
        unet.compile()
        return [""]
    if scope != "blocks":
        raise ValueError(f"compile_scope must be 'blocks' or 'unet', not {scope!r}.")
    compiled = []
    for name, block in transformer_blocks(unet):
        if not any(layer.startswith(f"{name}.") for layer in hooked_layers):
            block.compile()
            compiled.append(name)
    return compiled
