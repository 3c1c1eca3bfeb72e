"""What the evaluation generates: prompts, images per prompt, sampler settings, seeds, PRES images."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar, Literal

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.evaluation.prompts import (
    DreamBenchPrompts,
    evenly_spaced,
    parse_prompts_and_classes,
    split_identifier_and_class,
)
from pdm_lightning.generation.jobs import CLASS, ImageJob, plan_jobs
from pdm_lightning.generation.prompts import fill_prompt
from pdm_lightning.generation.settings import GenerationSettings


@dataclass
class EvaluationSettings(GenerationSettings):
    """DreamBench evaluation settings (``--data.evaluation.*``).

    Args:
        num_inference_steps: sampler steps (DreamBench protocol: 50).
        guidance_scale: classifier-free guidance (DreamBench protocol: 7.5).
        negative_prompt: prompt to steer away from (the protocol: none).
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        prompt_set: ``auto`` (live-subject prompts for cat/dog classes, object prompts otherwise),
            ``object``, ``live``, or ``custom`` (the ``prompts`` list).
        prompts: custom prompts; ``{0}`` / ``{1}`` are replaced by identifier and class noun.
        prompts_file: a DreamBench ``prompts_and_classes.txt`` to read the prompt lists from
            (None: the bundled copy of the published lists).
        max_prompts: evaluate only this many prompts, spread evenly over the list (None: all 25).
        identifier: e.g. ``sks``; None reads it off the instance and class prompts.
        class_noun: e.g. ``dog``; None reads it off the instance and class prompts.
        num_images_per_prompt: images generated per prompt (DreamBench: 4).
        seed: image k of every prompt uses ``derive_seed(seed, k)`` (as predict does), the same for
            every prompt and checkpoint.
        batch_size: images generated per step.
        pres_num_images: images generated from the class prompt alone for PRES (0 leaves PRES out).
        pres_prompt: the class-only prompt (None: "a {class_noun}").
        resolution: generated image size (None: the model's default).
    """

    option_prefix: ClassVar[str] = "--data.evaluation."

    # The DreamBench protocol samples with 50 steps; the metrics compare with published ones only then.
    num_inference_steps: int = 50
    # Square images of ``resolution`` (one option, as the protocol's images are square): no options of their own.
    height: int | None = field(default=None, init=False)
    width: int | None = field(default=None, init=False)
    prompt_set: Literal["auto", "object", "live", "custom"] = "auto"
    prompts: list[str] | None = None
    prompts_file: str | None = None
    max_prompts: int | None = None
    identifier: str | None = None
    class_noun: str | None = None
    num_images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 4
    pres_num_images: int = 4
    pres_prompt: str | None = None
    resolution: int | None = None

    def __post_init__(self) -> None:
        # Checked when the CLI builds the settings, not after the models loaded and the first images came out.
        for name, minimum in (("num_images_per_prompt", 1), ("batch_size", 1), ("pres_num_images", 0)):
            if getattr(self, name) < minimum:
                raise InputDataError(f"{self.option(name)} must be at least {minimum}, got {getattr(self, name)}.")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise InputDataError(f"{self.option('max_prompts')} must be at least 1 (or unset for all), got {self.max_prompts}.")
        if self.prompt_set == "custom" and not self.prompts:
            raise InputDataError(f"prompt_set 'custom' needs {self.option('prompts')} (a list of prompts).")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputDataError(f"{self.option('resolution')} {self.resolution} must be a positive multiple of 8 (or unset).")
        self.height = self.width = self.resolution
        super().__post_init__()


@dataclass(frozen=True)
class EvaluationPlan:
    """The prompts of one subject's evaluation, the images to generate for them and how to sample them."""

    identifier: str
    class_noun: str
    prompts: list[str]
    pres_prompt: str | None
    jobs: list[ImageJob]
    generation: GenerationSettings


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
    """Prompts and image jobs; the keyword overrides serve the light evaluation during training.

    Image k of every prompt and of the class prompt has seed ``derive_seed(settings.seed, k)``.
    """
    if settings.identifier and settings.class_noun:
        identifier, class_noun = settings.identifier, settings.class_noun
    else:
        identifier, class_noun = split_identifier_and_class(instance_prompt, class_prompt)
        identifier, class_noun = settings.identifier or identifier, settings.class_noun or class_noun
    prompts = resolve_prompts(settings, identifier, class_noun, max_prompts if max_prompts is not None else settings.max_prompts)
    images = num_images_per_prompt if num_images_per_prompt is not None else settings.num_images_per_prompt
    pres_images = pres_num_images if pres_num_images is not None else settings.pres_num_images
    generation = settings.generation()
    if num_inference_steps is not None:
        generation = replace(generation, num_inference_steps=num_inference_steps)
    jobs = plan_jobs(prompts, images, settings.seed)
    pres_prompt = None
    if pres_images > 0:
        pres_prompt = settings.pres_prompt or f"a {class_noun}"
        jobs += plan_jobs([pres_prompt], pres_images, settings.seed, kind=CLASS)
    return EvaluationPlan(identifier, class_noun, prompts, pres_prompt, jobs, generation)
