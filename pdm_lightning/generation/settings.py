"""How each image is sampled: ONE settings record, whose defaults every purpose starts from.

``PredictSettings`` (``--data.predict.*``), the evaluation's and the class images' settings inherit
``GenerationSettings``, so their option names stay flat (``--data.predict.num_inference_steps``); a
subclass changes a default only where its purpose needs another one, and says why there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.generation.schedulers import SCHEDULERS

# Stable Diffusion's VAE downsamples by 8: the pipeline refuses other image sizes.
SIZE_MULTIPLE = 8


def require_positive(name: str, value: int) -> int:
    """``value`` when it is at least 1, else an InputDataError naming ``name``."""
    if value < 1:
        raise InputDataError(f"{name} must be at least 1, got {value}.")
    return value


@dataclass
class GenerationSettings:
    """How each image is sampled.

    Args:
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale (1 disables guidance).
        negative_prompt: prompt to steer away from (None: the empty prompt).
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        height: image height in pixels (None: the model's native size).
        width: image width in pixels (None: the model's native size).
    """

    # Where the settings come from on the command line (e.g. "--data.evaluation."), for the error messages.
    option_prefix: ClassVar[str] = ""

    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    scheduler: str = "dpmsolver++"
    height: int | None = None
    width: int | None = None

    def __post_init__(self) -> None:
        # Checked when the settings are made, not when the first image is sampled (after the weights load).
        self._check_scheduler()
        require_positive(self.option("num_inference_steps"), self.num_inference_steps)
        for name, size in (("height", self.height), ("width", self.width)):
            if size is not None and (size < SIZE_MULTIPLE or size % SIZE_MULTIPLE):
                raise InputDataError(
                    f"{self.option(name)} must be a positive multiple of {SIZE_MULTIPLE} pixels, got {size}."
                )

    def option(self, name: str) -> str:
        """The option that sets field ``name``, as users type it."""
        return f"{self.option_prefix}{name}"

    def _check_scheduler(self) -> None:
        if self.scheduler not in SCHEDULERS:
            where = f" for {self.option('scheduler')}" if self.option_prefix else ""
            raise InputDataError(f"Unknown scheduler {self.scheduler!r}{where}: choose one of {', '.join(SCHEDULERS)}.")

    def generation(self) -> GenerationSettings:
        """The sampling part alone (what each batch of images carries), whatever settings embed it."""
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})

    def metadata(self) -> dict[str, str]:
        """The settings as PNG text fields."""
        text = {
            "steps": str(self.num_inference_steps),
            "guidance_scale": str(self.guidance_scale),
            "scheduler": self.scheduler,
        }
        if self.negative_prompt:
            text["negative_prompt"] = self.negative_prompt
        return text


@dataclass
class PredictSettings(GenerationSettings):
    """What ``train.py predict`` generates (``--data.predict.*``); written under ``<run>/predictions``.

    Args:
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        negative_prompt: prompt to steer away from.
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        height: image height (None: the model's native size).
        width: image width (None: the model's native size).
        prompts: prompts, may use ``{identifier}`` / ``{class_noun}`` (or ``{0}`` / ``{1}``); with
            neither prompts nor prompts_file, the instance prompt is used.
        prompts_file: text file with one prompt per line (blank lines and ``#`` comments skipped).
        identifier: fills ``{identifier}``; None infers it from the instance and class prompts.
        class_noun: fills ``{class_noun}``; None infers it from the instance and class prompts.
        num_images_per_prompt: images per prompt.
        seed: image k of a prompt uses seed derive_seed(seed, k).
        batch_size: images per sampling batch.
    """

    option_prefix: ClassVar[str] = "--data.predict."

    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    identifier: str | None = None
    class_noun: str | None = None
    num_images_per_prompt: int = 4
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self.option("num_images_per_prompt"), self.num_images_per_prompt)
        require_positive(self.option("batch_size"), self.batch_size)
