"""A sampling pipeline around the module's live weights (LoRA active), with the samplers users pick by name."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

# Sampler names as users know them from the A1111 / diffusers UIs; "dpmsolver++" is the default
# (good images in 20-30 steps).
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict]] = {
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}


def make_scheduler(name: str, config: dict) -> SchedulerMixin:
    """Sampler ``name`` built from a pipeline's scheduler config (betas and prediction type kept)."""
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[name]
    return cls.from_config(config, **overrides)


def inference_pipeline(module, scheduler: str = "dpmsolver++") -> StableDiffusionPipeline:
    """A StableDiffusionPipeline that shares the module's modules (no copy, no reload from disk).

    Whatever the module holds is what samples: LoRA adapters active, fine-tuned weights as they are
    now. The caller owns train/eval mode and the no-grad context.
    """
    return StableDiffusionPipeline(
        vae=module.vae,
        text_encoder=module.text_encoder,
        tokenizer=module.tokenizer,
        unet=module.unet,
        scheduler=make_scheduler(scheduler, module.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@contextmanager
def preserved_training_state(module: torch.nn.Module) -> Iterator[None]:
    """Evaluation mode, no autograd, and on exit every submodule's mode and every global RNG as they were.

    Modes are restored one by one because the module keeps its frozen parts in eval mode while
    training; a plain ``module.train()`` would not give back the same state. no_grad (not
    inference_mode) so that no tensor made here is unusable by the training that follows.
    """
    modes = {name: sub.training for name, sub in module.named_modules()}
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            module.eval()
            yield
    finally:
        for name, sub in module.named_modules():
            sub.training = modes.get(name, sub.training)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
