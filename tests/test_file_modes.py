"""Outputs follow the process umask (issue 11, fault 9): 0644 files and 0755 folders under umask 022.

Temporary files made with ``mkstemp``/``mkdtemp`` (and safetensors' own writer) are 0600/0700
whatever the umask; renamed into place they left exports, predictions, class images and the
runner's tables unreadable to the group and other users, while Lightning's checkpoints were 0644.
Each test sets the umask itself (and restores it) and checks every file and folder a producer made.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, build_cli
from pdm_lightning import runner
from pdm_lightning.core.atomic import staged_directory, write_bytes_atomically, write_safetensors_atomically
from pdm_lightning.data import segmentation
from pdm_lightning.generation.files import write_grids, write_image
from pdm_lightning.generation.jobs import ImageJob
from pdm_lightning.generation.settings import GenerationSettings
from pdm_lightning.prepare.class_images import ClassImageGeneration, generate_class_images
from test_class_images import FakePipeline


@pytest.fixture
def umask() -> Iterator[int]:
    """Umask 022 for the test (the usual default), the previous one restored after it."""
    previous = os.umask(0o022)
    try:
        yield 0o022
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def wrong_modes(root: Path, umask: int) -> list[str]:
    """Every file or folder under ``root`` (itself included) whose mode is not what ``open``/``mkdir`` give."""
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        want = want_dir if path.is_dir() else want_file
        if mode(path) != want:
            wrong.append(f"{path.relative_to(root.parent)}: {oct(mode(path))}, expected {oct(want)}")
    return wrong


@pytest.mark.parametrize("mask", [0o022, 0o002], ids=["umask022", "umask002"])
def test_atomic_writers_follow_the_umask(tmp_path: Path, mask: int) -> None:
    """Every atomic writer, under two umasks: the mode follows the umask, it is not a fixed 0644."""
    previous = os.umask(mask)
    try:
        out = tmp_path / "out"
        out.mkdir()
        write_bytes_atomically(out / "file.json", b"{}")
        write_safetensors_atomically(out / "weights.safetensors", {"w": torch.zeros(2)}, metadata={"format": "pt"})
        with staged_directory(out / "staged") as staging:
            (staging / "inside.txt").write_text("x")
            (staging / "sub").mkdir()
    finally:
        os.umask(previous)
    assert sorted(p.name for p in out.iterdir()) == ["file.json", "staged", "weights.safetensors"]
    assert wrong_modes(out, mask) == []


def test_class_images_follow_the_umask(tmp_path: Path, umask: int) -> None:
    settings = ClassImageGeneration(sample_batch_size=2, num_inference_steps=2, seed=0)
    generate_class_images(tmp_path / "class", "a photo of dog", 3, FakePipeline, settings, resolution=16, base_model="fake")
    assert len(list((tmp_path / "class").glob("*.png"))) == 3
    assert wrong_modes(tmp_path / "class", umask) == []  # images, manifest and its lock file


def test_prediction_pngs_and_grids_follow_the_umask(tmp_path: Path, umask: int) -> None:
    out = tmp_path / "predictions"
    out.mkdir()
    jobs = [ImageJob(0, "a photo of sks dog", index, seed=index) for index in range(2)]
    for job in jobs:
        write_image(out, job, Image.new("RGB", (8, 8), "red"), GenerationSettings(), model="tiny", run_seed=0)
    write_grids(out, jobs)
    assert len(list(out.rglob("*.png"))) == 3
    assert wrong_modes(out, umask) == []


def test_computed_mask_cache_follows_the_umask(
    tmp_path: Path, instance_dir: Path, umask: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The segmenter is faked (this is about the files): every photo gets a centred square.
    monkeypatch.setattr(segmentation, "load_clipseg", lambda *args: (None, None))

    def square_masks(model, processor, images, prompt, threshold):  # noqa: ANN001, ANN202
        masks = []
        for image in images:
            mask = np.zeros((image.height, image.width), dtype=bool)
            mask[image.height // 4 : -image.height // 4, image.width // 4 : -image.width // 4] = True
            masks.append(mask)
        return masks

    monkeypatch.setattr(segmentation, "segment_batch", square_masks)
    cache = tmp_path / "cache" / "masks"  # both levels created by the run
    found = segmentation.compute_auto_masks(sorted(instance_dir.glob("*.jpg"))[:2], "dog", "some/clipseg", cache_dir=cache)
    assert len(set(found.values())) == 2
    assert wrong_modes(tmp_path / "cache", umask) == []


def test_runner_results_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """The runner's DONE marker and results table; fit and test are faked (they write what the runner reads)."""

    def fake_command(args: list[str]) -> None:
        run_dir = Path(args[args.index("--trainer.logger.init_args.save_dir") + 1])
        if args[0] == "fit":
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"checkpoint")
        else:
            metrics = run_dir / runner.METRICS_FILE
            metrics.parent.mkdir(parents=True, exist_ok=True)
            metrics.write_text(json.dumps({"metrics": {"dino_i": 0.5, "clip_i": 0.7, "clip_t": 0.3}}))

    out = tmp_path / "bench"
    runner.run_benchmark(REPO_ROOT / "examples", out, subjects=["dog"], command=fake_command)
    assert {"results.csv", "results.md", "results.png"} <= {p.name for p in out.iterdir()}
    assert (out / "dog" / runner.DONE_MARKER).is_file()
    assert wrong_modes(out, umask) == []


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_a_fit_writes_checkpoints_and_export_with_the_umask(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, umask: int, variant: str
) -> None:
    run = tmp_path / "run"
    lora = ["--model.lora.rank", "4"] if variant == "lora" else []
    cli = build_cli(run, tiny_model_dir, instance_dir, "--trainer.max_steps", "1", "--checkpoint.every_n_train_steps", "1", *lora)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert list((run / "checkpoints").glob("*.ckpt")), "no checkpoint written"
    assert list((run / "export").rglob("*.safetensors")), "nothing exported"
    # Everything of the run: checkpoints, the exported pipeline and single file, samples, logs, config.
    wrong = wrong_modes(run, umask)
    assert wrong == [], "\n".join(wrong)
