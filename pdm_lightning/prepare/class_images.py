"""Topping up the class-image folder for prior preservation.

Images already in the folder count towards ``num_class_images``; only the missing ones are
generated. Each new image is seeded by its slot number, written under a temporary name, then
renamed to a content-hash name, and recorded in a manifest, so an interrupted generation resumes
where it stopped and a later run can tell which settings produced the folder's images. Nothing
already in the folder is ever modified or deleted.

Several runs may fill one folder at once (subjects of one class, DDP nodes sharing a disk): each
writes its images and merges its records into the manifest on disk under one file lock, so no
writer's records are lost and no half-written file of a live writer is taken for a stale one.
The DDP ranks of one run split the missing images: slots go in batches by slot number
(``slot_batches``), batch k to rank k mod world size, so the split makes the very files one process
would (an image depends on its slot's seed and, at float rounding, on the rest of its batch).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from pdm_lightning.core.atomic import remove_stale_partials, write_bytes_atomically
from pdm_lightning.core.images import list_image_files
from pdm_lightning.core.locks import file_lock
from pdm_lightning.core.seeding import derive_seed
from pdm_lightning.generation.settings import GenerationSettings, require_positive

MANIFEST_NAME = "pdm_lightning_class_images.json"
# Held by whoever writes into the folder (images and manifest); it stays, empty (see core.locks).
MANIFEST_LOCK_NAME = f".{MANIFEST_NAME}.lock"
# The folder's own files that are not class images.
BOOKKEEPING_NAMES = (MANIFEST_NAME, MANIFEST_LOCK_NAME)
# Settings that change what an image looks like; a mismatch on any of them is reported.
_COMPARED_SETTINGS = ("prompt", "base_model", "revision", "sampler", "num_inference_steps", "guidance_scale", "resolution")


@dataclass
class ClassImageGeneration(GenerationSettings):
    """How missing class images are generated (with the pretrained pipeline, before training), with the
    base model's own sampler at the training resolution (``--data.resolution``).

    Args:
        num_inference_steps: sampler steps per image.
        guidance_scale: classifier-free guidance scale.
        negative_prompt: optional negative prompt.
        sample_batch_size: images generated per pipeline call.
        precision: pipeline dtype; ``auto`` is float16 on CUDA and float32 on CPU.
        seed: base seed; image slot ``k`` uses a seed derived from (seed, k).
    """

    option_prefix: ClassVar[str] = "--data.class_generation."

    # The prior is learned from these images: full-quality samples of the base model (DreamBooth's 50 steps).
    num_inference_steps: int = 50
    # Not options here: the base model's own sampler (what the manifest records) and the training resolution.
    scheduler: str | None = field(default=None, init=False)
    height: int | None = field(default=None, init=False)
    width: int | None = field(default=None, init=False)
    sample_batch_size: int = 4
    precision: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive(self.option("sample_batch_size"), self.sample_batch_size)

    def _check_scheduler(self) -> None:
        """Nothing to check: the pipeline keeps the sampler the base model ships with."""


def list_class_images(class_dir: str | os.PathLike) -> list[Path]:
    """The images of a class folder in name order (the manifest is not one of them)."""
    return list_image_files(class_dir, role="class_data_dir", ignore=BOOKKEEPING_NAMES)


def read_manifest(class_dir: Path) -> dict[str, dict[str, Any]]:
    """Per-file generation records of a class folder ({} when it has none)."""
    path = class_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["images"])
    except (ValueError, KeyError, TypeError) as error:
        warnings.warn(f"Ignoring unreadable class-image manifest {path}: {error}", stacklevel=2)
        return {}


def _write_manifest(class_dir: Path, records: dict[str, dict[str, Any]]) -> None:
    data = json.dumps({"format": 1, "images": records}, indent=1, sort_keys=True).encode()
    write_bytes_atomically(class_dir / MANIFEST_NAME, data)


def folder_lock(class_dir: Path) -> AbstractContextManager[None]:
    """The lock every writer of ``class_dir`` holds while it writes images or the manifest."""
    return file_lock(class_dir / MANIFEST_LOCK_NAME)


def merge_records(class_dir: Path, new_records: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Adds ``new_records`` to the manifest as it is on disk now; returns all records. Call under ``folder_lock``.

    Reading at write time (not at start) keeps the records another run added meanwhile; records of
    files no longer in the folder are dropped.
    """
    records = {name: rec for name, rec in read_manifest(class_dir).items() if (class_dir / name).is_file()}
    records.update(new_records)
    _write_manifest(class_dir, records)
    return records


def save_png_by_content(image: Image.Image, class_dir: Path) -> str:
    """Writes ``image`` as ``<content hash>.png`` atomically; returns the file name."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    name = f"{hashlib.sha256(data).hexdigest()[:20]}.png"
    write_bytes_atomically(class_dir / name, data)
    return name


def report_setting_mismatches(records: dict[str, dict[str, Any]], wanted: dict[str, Any], class_dir: Path) -> None:
    """Warns when recorded images were made with other settings (they are kept and used)."""
    differing: dict[str, set[str]] = {}
    for record in records.values():
        for key in _COMPARED_SETTINGS:
            if key in record and record[key] != wanted[key]:
                differing.setdefault(key, set()).add(repr(record[key]))
    if differing:
        details = "; ".join(f"{key}: {', '.join(sorted(values))} (now {wanted[key]!r})" for key, values in differing.items())
        warnings.warn(
            f"Class images in {class_dir} were generated with other settings ({details}). They are kept and "
            "used for prior preservation. To regenerate, point class_data_dir at a new folder.",
            stacklevel=2,
        )


def generate_class_images(
    class_dir: str | os.PathLike,
    class_prompt: str,
    num_class_images: int,
    load_pipeline: Callable[[], Any],
    settings: ClassImageGeneration,
    resolution: int,
    base_model: str,
    revision: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[str]:
    """Generates images until ``class_dir`` holds ``num_class_images``; returns the names of those it made.

    ``load_pipeline`` is only called when something is missing, so a full folder costs no model load.
    Rank ``rank`` of ``world_size`` (processes sharing the folder) generates the batches of its share
    (``slot_batches``); the caller waits for every rank before using the folder. Each image depends
    only on its slot and its batch, so any split makes the same files as one process.
    """
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(class_dir):  # a live writer holds the lock while its partial file exists
        remove_stale_partials(class_dir)
        records, plan = _records_and_plan(class_dir, num_class_images, settings.sample_batch_size, rank, world_size)
    wanted = {
        "prompt": class_prompt,
        "base_model": base_model,
        "revision": revision,
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "resolution": resolution,
    }
    pipeline = load_pipeline() if plan else None
    recorded_samplers = [r["sampler"] for r in records.values() if "sampler" in r]
    wanted["sampler"] = type(pipeline.scheduler).__name__ if pipeline else next(iter(recorded_samplers), None)
    report_setting_mismatches(records, wanted, class_dir)
    if not plan:
        return []

    made: list[str] = []
    attempted: set[int] = set()
    who = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    bar = tqdm(
        total=sum(map(len, plan)), desc=f"Generating class images ({class_prompt!r}){who}", unit="img", disable=not progress
    )
    # Planning again after every batch counts what other processes added meanwhile, and every image in
    # the folder, recorded or not (an interrupted run can leave one written but not yet recorded).
    while plan:
        batch_slots = plan[0]
        images = _generate_batch(pipeline, class_prompt, batch_slots, settings, resolution, pipeline.device)
        with folder_lock(class_dir):  # generating (slow) is outside the lock, writing (fast) inside
            new = {
                save_png_by_content(image, class_dir): {**wanted, "slot": slot, "seed": derive_seed(settings.seed, slot)}
                for slot, image in zip(batch_slots, images)
            }
            merge_records(class_dir, new)
            attempted.update(batch_slots)  # a slot whose image has another's name is not tried again
            _, plan = _records_and_plan(class_dir, num_class_images, settings.sample_batch_size, rank, world_size, attempted)
        made.extend(new)
        bar.update(len(batch_slots))
    bar.close()
    return made


def slot_batches(slots: Sequence[int], batch_size: int) -> list[list[int]]:
    """``slots`` (ascending) in batches of the slots that share ``slot // batch_size``.

    Batches follow slot numbers, not the order of generation, so every process that generates a
    given slot does so in the same batch: a batch's images depend (at float rounding) on what else
    is in it, and a split build must make the very same files as a single process.
    """
    batches: dict[int, list[int]] = {}
    for slot in slots:
        batches.setdefault(slot // batch_size, []).append(slot)
    return list(batches.values())


def _records_and_plan(
    class_dir: Path, num_class_images: int, batch_size: int, rank: int, world_size: int, attempted: Iterable[int] = ()
) -> tuple[dict[str, dict[str, Any]], list[list[int]]]:
    """The folder's records, and the slot batches this rank still has to generate. Call under ``folder_lock``.

    The folder needs the smallest free slots that bring it to ``num_class_images``; that set does not
    change while writers only add slots from it, so every rank computes the same batches from
    whatever it sees, and batch ``k`` (slots k * batch_size ...) is rank ``k % world_size``'s.
    """
    records = {name: rec for name, rec in read_manifest(class_dir).items() if (class_dir / name).is_file()}
    missing = num_class_images - len(list_class_images(class_dir))
    used = {int(rec["slot"]) for rec in records.values() if "slot" in rec} | set(attempted)
    batches = slot_batches(_free_slots(used, max(missing, 0)), batch_size)
    return records, [batch for batch in batches if (batch[0] // batch_size) % world_size == rank]


def _free_slots(used: set[int], count: int) -> list[int]:
    """The ``count`` smallest slot numbers not in ``used``."""
    slots: list[int] = []
    candidate = 0
    while len(slots) < count:
        if candidate not in used:
            slots.append(candidate)
        candidate += 1
    return slots


@torch.no_grad()
def _generate_batch(
    pipeline: Any,
    prompt: str,
    slots: Sequence[int],
    settings: ClassImageGeneration,
    resolution: int,
    device: torch.device,
) -> list[Image.Image]:
    generators = [torch.Generator(device=device).manual_seed(derive_seed(settings.seed, slot)) for slot in slots]
    output = pipeline(
        prompt=[prompt] * len(slots),
        negative_prompt=[settings.negative_prompt] * len(slots) if settings.negative_prompt else None,
        num_inference_steps=settings.num_inference_steps,
        guidance_scale=settings.guidance_scale,
        height=resolution,
        width=resolution,
        generator=generators,
    )
    return list(output.images)
