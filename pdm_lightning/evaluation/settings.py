"""What the evaluation generates: prompts, images per prompt, sampler settings, seeds, PRES images."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pdm_lightning.data.images import InputDataError
from pdm_lightning.data.sampler import derive_seed
from pdm_lightning.evaluation.prompts import (
    DreamBenchPrompts,
    evenly_spaced,
    fill_prompt,
    parse_prompts_and_classes,
    split_identifier_and_class,
)
from pdm_lightning.model.inference import SCHEDULERS


@dataclass
class EvaluationSettings:
    """DreamBench evaluation settings (``--data.evaluation.*``).

    Args:
        prompt_set: ``auto`` (live-subject prompts for cat/dog classes, object prompts otherwise),
            ``object``, ``live``, or ``custom`` (the ``prompts`` list).
        prompts: custom prompts; ``{0}`` / ``{1}`` are replaced by identifier and class noun.
        prompts_file: a DreamBench ``prompts_and_classes.txt`` to read the prompt lists from
            (None: the bundled copy of the published lists).
        max_prompts: evaluate only this many prompts, spread evenly over the list (None: all 25).
        identifier: e.g. ``sks``; None reads it off the instance and class prompts.
        class_noun: e.g. ``dog``; None reads it off the instance and class prompts.
        num_images_per_prompt: images generated per prompt (DreamBench: 4).
        num_inference_steps: sampler steps (DreamBench protocol: 50).
        guidance_scale: classifier-free guidance (DreamBench protocol: 7.5).
        scheduler: sampler name (see pdm_lightning.model.inference.SCHEDULERS).
        seed: image k of every prompt uses ``derive_seed(seed, k)`` (as predict does), the same for
            every prompt and checkpoint.
        batch_size: images generated per step.
        pres_num_images: images generated from the class prompt alone for PRES (0 leaves PRES out).
        pres_prompt: the class-only prompt (None: "a {class_noun}").
        resolution: generated image size (None: the model's default).
    """

    prompt_set: Literal["auto", "object", "live", "custom"] = "auto"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    max_prompts: int | None = None
    identifier: str | None = None
    class_noun: str | None = None
    num_images_per_prompt: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "dpmsolver++"
    seed: int = 0
    batch_size: int = 4
    pres_num_images: int = 4
    pres_prompt: str | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        # Checked when the CLI builds the settings, not after the models loaded and the first images came out.
        for name, minimum in (("num_images_per_prompt", 1), ("num_inference_steps", 1), ("batch_size", 1), ("pres_num_images", 0)):
            if getattr(self, name) < minimum:
                raise InputDataError(f"--data.evaluation.{name} must be at least {minimum}, got {getattr(self, name)}.")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InputDataError(f"--data.evaluation.max_prompts must be at least 1 (or unset for all), got {self.max_prompts}.")
        if self.scheduler not in SCHEDULERS:
            raise InputDataError(f"Unknown --data.evaluation.scheduler {self.scheduler!r}: choose one of {', '.join(SCHEDULERS)}.")
        if self.prompt_set == "custom" and not self.prompts:
            raise InputDataError("prompt_set 'custom' needs --data.evaluation.prompts (a list of prompts).")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputDataError(f"--data.evaluation.resolution {self.resolution} must be a positive multiple of 8 (or unset).")


@dataclass(frozen=True)
class EvaluationPlan:
    """The prompts of one subject's evaluation and the images to generate for them."""

    identifier: str
    class_noun: str
    prompts: list[str]
    pres_prompt: str | None
    requests: list[dict[str, Any]]


SUBJECT, CLASS = "subject", "class"


def resolve_prompts(settings: EvaluationSettings, identifier: str, class_noun: str, max_prompts: int | None) -> list[str]:
    if settings.prompt_set == "custom" or (settings.prompts and settings.prompt_set == "auto"):
        templates = list(settings.prompts)
    else:
        source = parse_prompts_and_classes(settings.prompts_file) if settings.prompts_file else DreamBenchPrompts()
        templates = {
            "auto": source.templates_for(class_noun),
            "object": source.object_prompts,
            "live": source.live_prompts,
        }[settings.prompt_set]
    return [fill_prompt(t, identifier, class_noun) for t in evenly_spaced(templates, max_prompts)]


def build_plan(
    settings: EvaluationSettings,
    instance_prompt: str,
    class_prompt: str | None,
    max_prompts: int | None = None,
    num_images_per_prompt: int | None = None,
    num_inference_steps: int | None = None,
    pres_num_images: int | None = None,
) -> EvaluationPlan:
    """Prompts and generation requests; the keyword overrides serve the light evaluation during training."""
    if settings.identifier and settings.class_noun:
        identifier, class_noun = settings.identifier, settings.class_noun
    else:
        identifier, class_noun = split_identifier_and_class(instance_prompt, class_prompt)
        identifier, class_noun = settings.identifier or identifier, settings.class_noun or class_noun
    prompts = resolve_prompts(settings, identifier, class_noun, max_prompts if max_prompts is not None else settings.max_prompts)
    images = num_images_per_prompt if num_images_per_prompt is not None else settings.num_images_per_prompt
    pres_images = pres_num_images if pres_num_images is not None else settings.pres_num_images
    steps = num_inference_steps if num_inference_steps is not None else settings.num_inference_steps
    common = {"num_inference_steps": steps, "guidance_scale": settings.guidance_scale,
              "scheduler": settings.scheduler, "resolution": settings.resolution}
    requests = [
        {"kind": SUBJECT, "prompt_index": p, "prompt": prompt, "image_index": k, "seed": derive_seed(settings.seed, k), **common}
        for p, prompt in enumerate(prompts)
        for k in range(images)
    ]
    pres_prompt = None
    if pres_images > 0:
        pres_prompt = settings.pres_prompt or f"a {class_noun}"
        requests += [
            {"kind": CLASS, "prompt_index": -1, "prompt": pres_prompt, "image_index": k, "seed": derive_seed(settings.seed, k), **common}
            for k in range(pres_images)
        ]
    return EvaluationPlan(identifier, class_noun, prompts, pres_prompt, requests)


def request_key(request: dict[str, Any]) -> tuple[str, int, int]:
    """Identifies one generated image (distributed samplers may repeat requests to even out ranks)."""
    return request["kind"], int(request["prompt_index"]), int(request["image_index"])


def collate_requests(requests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Keeps requests as plain dicts (the default collate would turn seeds into tensors)."""
    return {"requests": list(requests)}
