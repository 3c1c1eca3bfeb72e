"""The samplers users pick by name, built from a pipeline's scheduler config."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
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


def use_scheduler(pipeline: DiffusionPipeline, name: str) -> DiffusionPipeline:
    """Swaps the pipeline's sampler for ``name``, keeping its betas and prediction type."""
    pipeline.scheduler = make_scheduler(name, pipeline.scheduler.config)
    return pipeline
