"""Preparing a run's inputs before training: input checks, subject masks, class images, PDM bank.

``DreamBoothDataModule.prepare_data`` (once per node) calls ``check_inputs``: input checks and
instance masks, before any model loads. ``DreamBoothDataModule.setup`` (every rank) calls
``prepare_inputs_distributed``: each DDP rank generates its share of the missing class images and
builds its share of the PDM bank into the shared folders, then all wait at one barrier, so N GPUs
prepare about N times faster and make the very files one process would. ``python -m
pdm_lightning.prepare`` runs everything in one process (``prepare_inputs``) from the same config as
``train.py fit``. Every step is cached and resumable: a second call finds everything done and loads
no model.
"""

from __future__ import annotations

import re
import warnings
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
from pdm_lightning.pdm.bank import BuildReport, default_device
from pdm_lightning.pdm.teacher import PDMTeacher
from pdm_lightning.prepare.distributed import every_rank


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


@dataclass
class PreparedShare:
    """What one rank made: the class images it generated (file names) and its share of the bank (None: none asked)."""

    rank: int
    class_images: list[str]
    bank: BuildReport | None


def check_inputs(
    inputs: RunInputs,
    source: ModelSource,
    device: torch.device | None = None,
    prompts: dict[str, str | None] | None = None,
) -> list[Path]:
    """Checks the inputs and makes the instance masks, before any model is loaded; returns the instance photos.

    ``prompts``: the run's prompts by option name, checked for unset placeholders. The class images
    already in ``class_data_dir`` are checked (and masked, for the prior loss) here too.
    """
    prompts = prompts or {"class_prompt": inputs.class_prompt}
    device = device or default_device()
    instance_images = inputs.instance_images()  # bad inputs stop the run before any model is loaded
    check_no_placeholders(prompts)
    source.check()
    masks = inputs.masks or MaskSettings()
    if masks.needs_instance_masks:  # user masks are checked, automatic ones computed and cached
        resolve_instance_masks(instance_images, masks, inputs.class_prompt, device)
    if inputs.with_prior_preservation and Path(inputs.class_data_dir).exists():  # a missing one is created later
        validate_image_folder(
            inputs.class_data_dir, role="class_data_dir", resolution=inputs.resolution, allow_empty=True,
            ignore=BOOKKEEPING_NAMES,
        )
        existing = inputs.class_images()
        if masks.mask_prior_loss and existing:  # the generated ones are masked by whoever generates them
            resolve_class_masks(existing, masks, inputs.class_prompt, device)
    return instance_images


def build_inputs(
    inputs: RunInputs,
    source: ModelSource,
    teacher: PDMTeacher | None = None,
    device: torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> PreparedShare:
    """Rank ``rank`` of ``world_size``'s share of the class images (with their masks) and of the PDM bank.

    Every share lands in the same folders (the class folder, the bank cache), so the ranks must
    share a filesystem; together they make the very files one process would.
    """
    device = device or default_device()
    made = prepare_class_images(inputs, source, device, rank, world_size) if inputs.with_prior_preservation else []
    bank = None
    if teacher is not None:
        bank = teacher.prepare(inputs.instance_images(), inputs.class_prompt, inputs.resolution, device, rank, world_size)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # hand the generation models' cached blocks back before training
    return PreparedShare(rank, made, bank)


def prepare_inputs(
    inputs: RunInputs,
    source: ModelSource,
    teacher: PDMTeacher | None = None,
    device: torch.device | None = None,
    prompts: dict[str, str | None] | None = None,
) -> None:
    """Checks the inputs, then makes what training needs that is not there yet (nothing in the user's folders changes).

    One process does everything (``python -m pdm_lightning.prepare``); training splits the work
    (``check_inputs`` in ``prepare_data``, ``prepare_inputs_distributed`` in ``setup``).
    """
    check_inputs(inputs, source, device, prompts)
    report_shares([build_inputs(inputs, source, teacher, device)], inputs)


def prepare_inputs_distributed(
    inputs: RunInputs,
    source: ModelSource,
    teacher: PDMTeacher | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> None:
    """Every rank (``DataModule.setup``): builds its share, then waits for all the others (one barrier).

    Where the ranks do not share a filesystem (nodes with their own disks), each rank then finds the
    other nodes' files missing and makes them itself, as one process would (with a warning).
    """
    with every_rank() as ranks:
        shares = ranks.gather(build_inputs(inputs, source, teacher, device, rank, world_size))
    if world_size > 1:
        _make_what_is_missing_here(inputs, source, teacher, device)
    report_shares(shares, inputs)


def _make_what_is_missing_here(inputs: RunInputs, source: ModelSource, teacher: PDMTeacher | None, device: torch.device) -> None:
    missing = []
    if inputs.with_prior_preservation and len(list_class_images(inputs.class_data_dir)) < inputs.num_class_images:
        missing.append(f"class images in {inputs.class_data_dir}")
    if teacher is not None and teacher.missing_files(inputs.instance_images(), inputs.class_prompt, inputs.resolution):
        missing.append(f"PDM bank files in {teacher.bank_folder(inputs.class_prompt, inputs.resolution)}")
    if missing:
        warnings.warn(
            f"After every rank built its share, this process does not see {' and '.join(missing)}: the ranks do not "
            "share that folder (nodes with their own disks). Making the rest here; put the class folder and "
            "--model.pdm.cache_dir on a filesystem every node shares to split the work instead.",
            stacklevel=2,
        )
        build_inputs(inputs, source, teacher, device)


def report_shares(shares: list[PreparedShare], inputs: RunInputs) -> None:
    """One line each (rank 0) for the class images and the bank, with every rank's part when several built."""
    generated = [len(share.class_images) for share in shares]
    if sum(generated):
        rank_zero_info(f"Class images: {sum(generated)} generated{_per_rank(generated)} in {inputs.class_data_dir}")
    banks = [share.bank for share in shares if share.bank is not None]
    if banks:
        built = [bank.computed for bank in banks]
        rank_zero_info(
            f"PDM teacher bank: {sum(built)} image(s) built{_per_rank(built)}, {sum(b.reused for b in banks)} reused, "
            f"in {banks[0].folder}"
        )


def _per_rank(counts: list[int]) -> str:
    return f" (rank {', rank '.join(f'{rank}: {count}' for rank, count in enumerate(counts))})" if len(counts) > 1 else ""


def prepare_class_images(
    inputs: RunInputs, source: ModelSource, device: torch.device, rank: int = 0, world_size: int = 1
) -> list[str]:
    """Tops the class folder up to ``num_class_images`` (this rank's share), masking the new images for the prior loss."""
    generation = inputs.class_generation or ClassImageGeneration()

    def load_pipeline():  # noqa: ANN202 - only called when images are missing
        pipeline = source.pipeline(auto_dtype(generation.precision, device))
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    made = generate_class_images(
        inputs.class_data_dir,
        class_prompt=inputs.class_prompt,
        num_class_images=inputs.num_class_images,
        load_pipeline=load_pipeline,
        settings=generation,
        resolution=inputs.resolution,
        base_model=source.pretrained_model_name_or_path,
        revision=source.revision,
        rank=rank,
        world_size=world_size,
        progress=rank == 0,
    )
    masks = inputs.masks or MaskSettings()
    if masks.mask_prior_loss and made:
        folder = Path(inputs.class_data_dir)
        resolve_class_masks([folder / name for name in made], masks, inputs.class_prompt, device)
    return made
