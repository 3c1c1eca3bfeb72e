"""Preparing a run's inputs before training, once per node: input checks, subject masks, class images, PDM bank.

``DreamBoothDataModule.prepare_data`` calls ``prepare_inputs``; ``python -m pdm_lightning.prepare``
runs it alone from the same config as ``train.py fit`` (to build the class images and the bank ahead
of a run, e.g. on another machine sharing the cache). Every step is cached and resumable: a second
call finds everything done and loads no model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.core.dtypes import auto_dtype
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import validate_image_folder
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.prepare.class_images import BOOKKEEPING_NAMES, ClassImageGeneration, generate_class_images, list_class_images
from pdm_lightning.data.masks import MaskSettings, resolve_class_masks, resolve_instance_masks
from pdm_lightning.pdm.teacher import PDMTeacher


@dataclass
class RunInputs:
    """What a run trains on, as the data module was configured (see ``DreamBoothDataModule`` for each)."""

    instance_data_dir: str
    resolution: int
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    class_generation: ClassImageGeneration | None = None
    masks: MaskSettings | None = None

    def instance_images(self) -> list[Path]:
        """The checked instance photos (a clear error naming the file for any bad one)."""
        return validate_image_folder(self.instance_data_dir, role="instance_data_dir", resolution=self.resolution)

    def class_images(self) -> list[Path]:
        """The class images training uses (the first ``num_class_images`` of the folder)."""
        return list_class_images(self.class_data_dir)[: self.num_class_images]


# A "<...>" in a prompt is a template's placeholder left unset (configs/own_photos.yaml), not a prompt.
_PLACEHOLDER = re.compile(r"<[^<>]+>")


def check_no_placeholders(prompts: dict[str, str | None]) -> None:
    """Fails, naming the option, when a prompt still holds a ``<...>`` placeholder."""
    for option, prompt in prompts.items():
        if prompt and _PLACEHOLDER.search(prompt):
            raise InputDataError(
                f"--data.{option} {prompt!r} still holds a placeholder: set it, e.g. --data.{option} "
                f"\"{'a photo of sks cat' if option == 'instance_prompt' else 'a photo of cat'}\"."
            )


def prepare_inputs(
    inputs: RunInputs,
    source: ModelSource,
    teacher: PDMTeacher | None = None,
    device: torch.device | None = None,
    prompts: dict[str, str | None] | None = None,
) -> None:
    """Checks the inputs, then makes what training needs that is not there yet (nothing in the user's folders changes).

    ``prompts``: the run's prompts by option name, checked for unset placeholders.
    """
    prompts = prompts or {"class_prompt": inputs.class_prompt}
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    instance_images = inputs.instance_images()  # bad inputs stop the run before any model is loaded
    check_no_placeholders(prompts)
    source.check()
    masks = inputs.masks or MaskSettings()
    if masks.needs_instance_masks:  # user masks are checked, automatic ones computed and cached
        resolve_instance_masks(instance_images, masks, inputs.class_prompt, device)
    if inputs.with_prior_preservation:
        prepare_class_images(inputs, source, device)
    if teacher is not None:
        report = teacher.prepare(instance_images, inputs.class_prompt, inputs.resolution, device)
        if report is not None:
            rank_zero_info(f"PDM teacher bank: {report.computed} image(s) built, {report.reused} reused, in {report.folder}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the generation models' cached blocks back before training


def prepare_class_images(inputs: RunInputs, source: ModelSource, device: torch.device) -> None:
    """Tops the class folder up to ``num_class_images`` generated images (and their masks for the prior loss)."""
    if Path(inputs.class_data_dir).exists():  # a missing one is created for the generated images
        validate_image_folder(
            inputs.class_data_dir, role="class_data_dir", resolution=inputs.resolution, allow_empty=True,
            ignore=BOOKKEEPING_NAMES,
        )
    generation = inputs.class_generation or ClassImageGeneration()

    def load_pipeline():  # noqa: ANN202 - only called when images are missing
        pipeline = source.pipeline(auto_dtype(generation.precision, device))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    generate_class_images(
        inputs.class_data_dir,
        class_prompt=inputs.class_prompt,
        num_class_images=inputs.num_class_images,
        load_pipeline=load_pipeline,
        settings=generation,
        resolution=inputs.resolution,
        base_model=source.pretrained_model_name_or_path,
        revision=source.revision,
    )
    masks = inputs.masks or MaskSettings()
    if masks.mask_prior_loss:
        resolve_class_masks(inputs.class_images(), masks, inputs.class_prompt, device)
