"""The frozen UNet as the bank build calls it: (latents, timestep[, SDXL time ids]) -> (UNet output, the captured query).

Three ways to run the same call (``QueryUNet``):

- ``eager``: the diffusers module as it is.
- ``trace`` (the default for long builds): ``torch.jit.trace`` of one call, run without the graph
  executor's optimisation passes, so every call runs the very same ATen kernels in the same order as
  eager, without the diffusers Python around them (module calls, argument checks). Bit for bit the
  eager result (checked on the first call of each batch shape, eager is used from then on otherwise);
  about 20% less time per call on the CPU (tiny model, 256 px, one thread). Tracing costs about as much
  as a few dozen calls, so short builds (``MIN_CALLS_TO_TRACE``) run eager. A UNet with hooks
  registered on it (a trace would skip them) runs eager too.
- ``compile``: ``torch.compile``; on CUDA in mode ``reduce-overhead`` (CUDA graphs; shapes are static
  per batch). Inductor fuses kernels, so rows match eager to float rounding, not bit for bit.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch

from pdm_lightning.core.conditioning import PromptEmbeddings
from pdm_lightning.pdm.capture import QueryCapture

_log = logging.getLogger(__name__)

RunMode = Literal["eager", "trace", "compile"]
# Below this many calls of one batch shape, tracing (about 1.5 s on the tiny model, a few dozen
# calls) costs more than it saves.
MIN_CALLS_TO_TRACE = 400


def choose_mode(compile_unet: bool, calls_per_batch: int) -> RunMode:
    """``compile`` when asked for, ``trace`` for batches of at least ``MIN_CALLS_TO_TRACE`` calls, else ``eager``."""
    if compile_unet:
        return "compile"
    return "trace" if calls_per_batch >= MIN_CALLS_TO_TRACE else "eager"


class _UNetWithQuery(torch.nn.Module):
    """One UNet call returning the captured query as a second output (so a trace or a graph keeps it)."""

    def __init__(self, unet: torch.nn.Module, capture: QueryCapture) -> None:
        super().__init__()
        self.unet = unet
        self.capture = capture

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, condition: torch.Tensor, *added: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ``added``: SDXL's pooled text embedding [B, d] and time ids [B, 6], as positional tensors (a trace takes no dict).
        kwargs = {"added_cond_kwargs": {"text_embeds": added[0], "time_ids": added[1]}} if added else {}
        output = self.unet(latents, timestep, condition, return_dict=False, **kwargs)[0]
        return output, self.capture.pop()


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether a forward hook (global or on ``module`` or any submodule) would run during a call."""
    from torch.nn.modules import module as module_globals

    if module_globals._global_forward_pre_hooks or module_globals._global_forward_hooks:
        return True
    return any(m._forward_pre_hooks or m._forward_hooks for m in module.modules())


class QueryUNet:
    """The frozen ``unet`` conditioned on ``condition`` (one prompt: [1, 77, d], and SDXL's pooled [1, d']),
    capturing ``layer``'s output at every call. SDXL calls also take the batch's time ids [B, 6].

    Args:
        mode: ``eager``, ``trace`` or ``compile`` (module docstring); ``trace`` falls back to eager
            (with one logged line) when the UNet has hooks or tracing fails.
    """

    def __init__(self, unet: torch.nn.Module, layer: str, condition: PromptEmbeddings, mode: RunMode = "eager") -> None:
        if mode == "trace" and has_hooks(unet):
            _log.info("PDM bank: the UNet has forward hooks, which a trace would skip: running it eagerly")
            mode = "eager"
        self.mode = mode
        self.condition = condition
        self.capture = QueryCapture(unet, layer)  # registered after the hook check: ours is part of the trace
        self.module = _UNetWithQuery(unet, self.capture)
        self.device = condition.encoder_hidden_states.device
        self._conditions: dict[int, tuple[torch.Tensor, ...]] = {}
        self._timesteps: dict[int, torch.Tensor] = {}
        self._runs: dict[tuple[int, ...], torch.nn.Module | None] = {}  # per latent shape; None: eager
        self._compiled: torch.nn.Module | None = None

    def __call__(
        self, latents: torch.Tensor, timestep: int, time_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One call at ``timestep``; ``time_ids`` [B, 6] (on the device) are required with SDXL and ignored for SD."""
        batch = len(latents)
        if batch not in self._conditions:
            hidden, pooled = self.condition.encoder_hidden_states, self.condition.pooled
            expanded = (hidden.expand(batch, -1, -1),)
            self._conditions[batch] = expanded if pooled is None else (*expanded, pooled.expand(batch, -1))
        if timestep not in self._timesteps:  # on the device: a CUDA graph takes no host tensors
            self._timesteps[timestep] = torch.tensor(timestep, dtype=torch.long, device=self.device)
        args = (latents, self._timesteps[timestep], *self._conditions[batch])
        if self.condition.pooled is not None:
            if time_ids is None or time_ids.shape != (batch, 6):
                raise ValueError(f"An SDXL UNet call needs time ids of shape ({batch}, 6), got {None if time_ids is None else tuple(time_ids.shape)}.")
            args = (*args, time_ids.to(self.condition.pooled.dtype))
        if self.mode == "compile":
            return self._call_compiled(args)
        shape = tuple(latents.shape)
        if shape not in self._runs:
            return self._first_call(shape, args)
        traced = self._runs[shape]
        if traced is None:
            return self.module(*args)
        with torch.jit.optimized_execution(False):  # the traced ops as they are: no fusion, same bits
            return traced(*args)

    def _first_call(self, shape: tuple[int, ...], args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Eager, and for ``trace`` the trace checked against it (kept only when bit for bit equal)."""
        expected = self.module(*args)
        self._runs[shape] = None
        if self.mode != "trace":
            return expected
        try:
            traced = _trace(self.module, args)
            with torch.jit.optimized_execution(False):
                produced = traced(*args)
        except Exception as error:  # noqa: BLE001 - any tracing failure leaves the eager UNet, which works
            _log.info("PDM bank: tracing the UNet failed (%s): running it eagerly", error)
            return expected
        if all(torch.equal(a, b) for a, b in zip(produced, expected)):
            self._runs[shape] = traced
        else:
            _log.info("PDM bank: the traced UNet does not reproduce the eager one bit for bit: running it eagerly")
        return expected

    def _call_compiled(self, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compiled is None:
            cuda = self.device.type == "cuda"
            self._compiled = torch.compile(self.module, mode="reduce-overhead" if cuda else None, dynamic=False)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
            # A CUDA graph's outputs are overwritten by its next replay: the caller keeps copies.
            return tuple(t.clone() for t in self._compiled(*args))
        return self._compiled(*args)

    def release(self) -> None:
        """Removes the capture hook and drops the traced or compiled graphs (they hold the weights)."""
        self.capture.remove()
        self._runs.clear()
        self._compiled = None
        self._conditions.clear()
        self._timesteps.clear()


def _trace(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> torch.jit.ScriptModule:
    with warnings.catch_warnings(), torch.no_grad():
        # Shapes are fixed per trace (one per batch shape) and torch.jit's deprecation notice is not the user's.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.trace", category=DeprecationWarning)
        return torch.jit.trace(module, args, check_trace=False)
