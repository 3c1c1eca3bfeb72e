"""Class-image top-up: counts what is there, generates only what is missing, resumes after a crash."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import folder_snapshot
from pdm_lightning.core.seeding import derive_seed
from pdm_lightning.prepare.class_images import (
    MANIFEST_NAME,
    ClassImageGeneration,
    folder_lock,
    generate_class_images,
    list_class_images,
    slot_batches,
)
from pdm_lightning.core.loading import load_pipeline

SETTINGS = ClassImageGeneration(sample_batch_size=2, num_inference_steps=2, seed=7)


class CountingLoader:
    """Loads the tiny pipeline on demand; counts loads and generated images; can crash after N batches."""

    def __init__(self, model_dir: Path, crash_after_batches: int | None = None) -> None:
        self.model_dir = model_dir
        self.crash_after_batches = crash_after_batches
        self.loads = 0
        self.batches = 0

    def __call__(self):
        self.loads += 1
        pipeline = load_pipeline(str(self.model_dir))
        pipeline.set_progress_bar_config(disable=True)
        original_call = pipeline.__class__.__call__
        loader = self

        class Wrapped(pipeline.__class__):
            def __call__(self, *args, **kwargs):
                if loader.crash_after_batches is not None and loader.batches >= loader.crash_after_batches:
                    raise KeyboardInterrupt("simulated interruption")
                loader.batches += 1
                return original_call(self, *args, **kwargs)

        pipeline.__class__ = Wrapped
        return pipeline


def generate(
    class_dir: Path, number: int, loader: CountingLoader, settings: ClassImageGeneration = SETTINGS, rank: int = 0, world_size: int = 1
) -> int:
    """How many images the top-up generated (it returns their names)."""
    made = generate_class_images(
        class_dir, "a photo of dog", number, loader, settings, resolution=64, base_model="tiny", revision=None,
        rank=rank, world_size=world_size, progress=False,
    )
    assert all((class_dir / name).is_file() for name in made)
    return len(made)


def pngs(class_dir: Path) -> list[str]:
    return sorted(p.name for p in class_dir.glob("*.png"))


def test_top_up_keeps_existing_images_and_generates_only_the_missing(tmp_path: Path, tiny_model_dir: Path) -> None:
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(class_dir / "mine.jpg")
    mine = (class_dir / "mine.jpg").read_bytes()

    loader = CountingLoader(tiny_model_dir)
    assert generate(class_dir, 3, loader) == 2
    assert len(list(class_dir.glob("*.png"))) == 2 and (class_dir / "mine.jpg").read_bytes() == mine

    assert generate(class_dir, 5, loader) == 2
    assert len(list(class_dir.glob("*.png"))) == 4
    records = json.loads((class_dir / MANIFEST_NAME).read_text())["images"]
    assert sorted(r["slot"] for r in records.values()) == [0, 1, 2, 3]
    assert all(r["prompt"] == "a photo of dog" and r["num_inference_steps"] == 2 for r in records.values())
    assert len({r["seed"] for r in records.values()}) == 4
    assert "mine.jpg" not in records

    loads = loader.loads
    before = folder_snapshot(class_dir)
    assert generate(class_dir, 5, loader) == 0  # full: nothing generated, no model loaded
    assert loader.loads == loads and folder_snapshot(class_dir) == before


def test_interrupted_generation_resumes_to_the_same_images(tmp_path: Path, tiny_model_dir: Path) -> None:
    straight = tmp_path / "straight"
    generate(straight, 6, CountingLoader(tiny_model_dir))

    interrupted = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        generate(interrupted, 6, CountingLoader(tiny_model_dir, crash_after_batches=2))
    assert len(pngs(interrupted)) == 4
    assert not list(interrupted.glob(".pdm_lightning-*"))  # no half-written file counted as an image

    resumed = CountingLoader(tiny_model_dir)
    assert generate(interrupted, 6, resumed) == 2
    assert resumed.batches == 1
    # Seeds follow the slot, so the resumed folder holds exactly the images of the straight run.
    assert pngs(interrupted) == pngs(straight)


def test_unrecorded_image_from_a_crash_is_not_double_counted(tmp_path: Path, tiny_model_dir: Path) -> None:
    class_dir = tmp_path / "class"
    generate(class_dir, 4, CountingLoader(tiny_model_dir))
    # A crash between writing an image and updating the manifest leaves an image without a record.
    manifest = json.loads((class_dir / MANIFEST_NAME).read_text())
    dropped = max(manifest["images"], key=lambda name: manifest["images"][name]["slot"])
    del manifest["images"][dropped]
    (class_dir / MANIFEST_NAME).write_text(json.dumps(manifest))

    generate(class_dir, 6, CountingLoader(tiny_model_dir))
    assert len(pngs(class_dir)) == 6


def test_stale_partial_files_are_removed(tmp_path: Path, tiny_model_dir: Path) -> None:
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    (class_dir / ".pdm_lightning-abc.png.partial").write_bytes(b"half")
    generate(class_dir, 1, CountingLoader(tiny_model_dir))
    assert not (class_dir / ".pdm_lightning-abc.png.partial").exists()
    assert len(pngs(class_dir)) == 1


def test_other_settings_are_reported_not_deleted(tmp_path: Path, tiny_model_dir: Path) -> None:
    class_dir = tmp_path / "class"
    generate(class_dir, 2, CountingLoader(tiny_model_dir))
    before = folder_snapshot(class_dir)
    other = ClassImageGeneration(sample_batch_size=2, num_inference_steps=9, seed=7)
    with pytest.warns(UserWarning, match="num_inference_steps"):
        generate(class_dir, 2, CountingLoader(tiny_model_dir), other)
    assert folder_snapshot(class_dir) == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(class_dir, 2, CountingLoader(tiny_model_dir))  # same settings: silent


def test_batches_follow_slot_numbers() -> None:
    assert slot_batches([0, 1, 2, 3, 4], 2) == [[0, 1], [2, 3], [4]]
    # Holes (deleted images, another batch size earlier) do not shift later batches.
    assert slot_batches([1, 4, 5, 6, 9], 4) == [[1], [4, 5, 6], [9]]


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["rank0_first", "rank1_first"])
def test_ranks_split_the_batches_and_make_the_files_of_one_process(
    tmp_path: Path, tiny_model_dir: Path, order: tuple[int, int]
) -> None:
    """Two ranks sharing the folder generate half each; together: byte for byte the images (and records) of one process."""
    single = tmp_path / "single"
    generate(single, 5, CountingLoader(tiny_model_dir))

    split = tmp_path / "split"
    made = {}
    for rank in order:  # whichever rank comes first, each keeps to its own batches
        loader = CountingLoader(tiny_model_dir)
        made[rank] = generate(split, 5, loader, rank=rank, world_size=2)
        assert loader.batches == {0: 2, 1: 1}[rank]  # batches (slots 0-1, 4) and (slots 2-3)
    assert made == {0: 3, 1: 2}
    assert folder_snapshot(split) == folder_snapshot(single)


def test_a_rank_with_nothing_left_loads_no_model(tmp_path: Path, tiny_model_dir: Path) -> None:
    class_dir = tmp_path / "class"
    generate(class_dir, 2, CountingLoader(tiny_model_dir))  # slots 0-1: batch 0, rank 0's
    idle = CountingLoader(tiny_model_dir)
    assert generate(class_dir, 2, idle, rank=1, world_size=2) == 0 and idle.loads == 0


# ---------------------------------------------------------------------------------------------- concurrent runs


class FakeSampler:
    """Stands in for the pipeline's scheduler (only its class name is recorded)."""


class FakePipeline:
    """A pipeline without a model: each image is noise drawn from its generator's seed, after a short wait
    (long enough for two processes' batches to interleave)."""

    device = torch.device("cpu")
    scheduler = FakeSampler()

    def __call__(self, *, prompt: list[str], height: int, width: int, generator: list[torch.Generator], **_: object):
        time.sleep(0.05)
        images = [
            Image.fromarray(np.random.default_rng(g.initial_seed()).integers(0, 256, (height, width, 3), dtype=np.uint8))
            for g in generator
        ]
        return types.SimpleNamespace(images=images)


def fill_class_folder(class_dir: Path, seed: int, number: int, barrier) -> None:  # noqa: ANN001 - a multiprocessing Barrier
    """One run topping ``class_dir`` up to ``number`` images (the body of a child process)."""

    def load_pipeline() -> FakePipeline:
        barrier.wait(timeout=120)  # both runs have read the (empty) manifest before either writes
        return FakePipeline()

    settings = ClassImageGeneration(sample_batch_size=2, num_inference_steps=2, seed=seed)
    generate_class_images(class_dir, "a photo of dog", number, load_pipeline, settings, resolution=16, base_model="fake")


def test_two_runs_filling_one_folder_keep_every_record(tmp_path: Path) -> None:
    """Issue 11, fault 10: two runs filling one class folder lost each other's manifest records (last writer won)."""
    class_dir = tmp_path / "class"
    context = multiprocessing.get_context("spawn")  # no fork of a threaded pytest process
    barrier = context.Barrier(2)
    runs = [context.Process(target=fill_class_folder, args=(class_dir, seed, 8, barrier)) for seed in (1, 2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=300)
    assert [run.exitcode for run in runs] == [0, 0]

    images = {path.name for path in list_class_images(class_dir)}
    records = json.loads((class_dir / MANIFEST_NAME).read_text())["images"]
    assert len(images) >= 8
    assert set(records) == images, f"images without a record: {sorted(images - set(records))}"
    # Both runs contributed, and each record still describes its own image.
    assert {record["seed"] == derive_seed(1, record["slot"]) for record in records.values()} == {True, False}
    for name, record in records.items():
        expected = np.random.default_rng(record["seed"]).integers(0, 256, (16, 16, 3), dtype=np.uint8)
        assert np.array_equal(np.asarray(Image.open(class_dir / name)), expected), name
    assert not list(class_dir.glob(".pdm_lightning-*"))


def test_a_live_writers_partial_file_is_not_removed(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A run starting while another writes must not delete the other's half-written file as stale."""
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    partial = class_dir / ".pdm_lightning-other.png.partial"
    started = []

    def generate_in_background() -> None:
        started.append(True)
        generate(class_dir, 1, CountingLoader(tiny_model_dir))

    with folder_lock(class_dir):  # the other writer, in the middle of writing its image
        partial.write_bytes(b"half")
        worker = threading.Thread(target=generate_in_background)
        worker.start()
        time.sleep(0.5)
        assert started and partial.exists()  # the new run waits for the lock instead of deleting
    worker.join(timeout=120)
    assert not partial.exists()  # once the writer is gone, its leftover is stale and removed
    assert len(pngs(class_dir)) == 1
