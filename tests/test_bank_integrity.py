"""Trusted bank files: checksums of every row, content-keyed cache names, and a locked model-hash memo.

Damage is simulated by flipping bytes of a finished file in place (``r+b``: the size is unchanged, as
in the reported fault) or by cutting it short; concurrent memo writers are processes forked at a
barrier whose memo write is slowed down, so their read-modify-write cycles overlap.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_SUBJECT

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import list_image_files
from pdm_lightning.core.loading import ModelSource, load_components
from pdm_lightning.pdm import (
    BankSettings,
    build_bank,
    ensure_cached_bank,
    fingerprint,
    open_bank,
)
from pdm_lightning.pdm.bank import bank_file
from pdm_lightning.pdm.integrity import BankDamagedError, checksum_count, find_damage
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.storage import read_header
from pdm_lightning.pdm.teacher import PDMTeacher

CLASS_PROMPT = "a photo of dog"
RESOLUTION = 64
STEPS = 20  # 21 rows: row 17 exists
DAMAGED_ROW = 17
BANK_LOGGER = "pdm_lightning.pdm.bank"


@pytest.fixture(scope="module")
def components(tiny_model_dir: Path):  # noqa: ANN201
    return load_components(str(tiny_model_dir))


def settings_for(model_dir: Path, **overrides: object) -> BankSettings:
    options = {"inversion_steps": STEPS, "dtype": "float32", "mode": "both", **overrides}
    return BankSettings(str(model_dir), CLASS_PROMPT, RESOLUTION, **options)


def subject(folder: Path, photos: list[int], names: list[str]) -> list[Path]:
    """A subject folder holding the example photos ``photos`` under the file names ``names``."""
    folder.mkdir(parents=True)
    examples = list_image_files(EXAMPLE_SUBJECT, "instance")
    for index, name in zip(photos, names):
        shutil.copy(examples[index], folder / name)
    return list_image_files(folder, "instance")


def damage(path: Path, tensor: str = "queries", row: int = DAMAGED_ROW) -> None:
    """Flips 4 bytes in the middle of ``row`` of ``tensor`` in place: same size, intact header."""
    data_start, header = read_header(path)
    start, stop = header[tensor]["data_offsets"]
    # A checksum tensor holds one 8-byte value per row of the tensor it guards.
    row_bytes = 8 if tensor.endswith("_crc32") else (stop - start) // checksum_count(header[tensor]["shape"])
    offset = data_start + start + row * row_bytes + row_bytes // 2
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(offset)
        original = handle.read(4)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in original))
    assert path.stat().st_size == size


def bank_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == BANK_LOGGER]


@pytest.mark.parametrize(
    ("damaged", "reason"),
    [
        ("queries", f"row {DAMAGED_ROW} of queries fails its checksum"),
        ("latents", f"row {DAMAGED_ROW} of latents fails its checksum"),
        ("timesteps", "timesteps fails its checksum"),
        ("queries_crc32", f"row {DAMAGED_ROW} of queries fails its checksum"),
        ("cut short", "bytes where its header describes"),
    ],
)
def test_a_damaged_cache_file_is_rebuilt_with_one_line_saying_why(
    damaged: str, reason: str, tiny_model_dir: Path, components, tmp_path: Path, caplog: pytest.LogCaptureFixture  # noqa: ANN001
) -> None:
    images = subject(tmp_path / "dog", [0], ["00.jpg"])
    settings = settings_for(tiny_model_dir)
    first = ensure_cached_bank(settings, images, tmp_path / "cache", device="cpu", progress=False, components=components)
    (path,) = first.files
    intact = path.read_bytes()
    if damaged == "cut short":
        path.write_bytes(intact[: len(intact) // 2])
    elif damaged in ("timesteps", "queries_crc32"):
        damage(path, damaged, row=0 if damaged == "timesteps" else DAMAGED_ROW)
    else:
        damage(path, damaged)

    caplog.set_level(logging.WARNING, logger=BANK_LOGGER)
    again = ensure_cached_bank(settings, images, tmp_path / "cache", device="cpu", progress=False, components=components)
    assert (again.computed, again.reused) == (1, 0)
    (line,) = bank_records(caplog)
    assert line.startswith(f"PDM bank: {path.name} is damaged (") and reason in line and line.endswith(": rebuilding")
    assert "\n" not in line
    assert path.read_bytes() == intact  # rebuilt to the same bytes (extraction is deterministic on the CPU)

    caplog.clear()
    third = ensure_cached_bank(settings, images, tmp_path / "cache", device="cpu", progress=False)
    assert (third.computed, third.reused) == (0, 1) and not bank_records(caplog)


def test_a_row_damaged_during_training_is_an_error_naming_file_and_row(
    tiny_model_dir: Path, components, tmp_path: Path  # noqa: ANN001
) -> None:
    images = subject(tmp_path / "dog", [0, 1], ["00.jpg", "01.jpg"])
    settings = settings_for(tiny_model_dir, mode="bank")
    build_bank(settings, images, tmp_path / "bank", batch_size=2, device="cpu", progress=False, components=components)
    teacher = PDMTeacher(
        PDMSettings(inversion_steps=STEPS, dtype="float32", features_dir=str(tmp_path / "bank")), ModelSource(str(tiny_model_dir))
    )
    entries = teacher.entries(images, CLASS_PROMPT, RESOLUTION)
    timestep = entries.timesteps[DAMAGED_ROW]
    before = entries.item(1, timestep)["queries"].clone()
    damage(bank_file(tmp_path / "bank", images[1]))  # after the bank was opened and checked

    expected = f"{bank_file(tmp_path / 'bank', images[1])} is damaged \\(row {DAMAGED_ROW} \\(timestep {timestep}\\) of queries"
    with pytest.raises(BankDamagedError, match=expected):
        entries.item(1, timestep)
    assert torch.isfinite(before).all()
    entries.item(0, timestep), entries.item(1, entries.timesteps[DAMAGED_ROW - 1])  # other rows still read

    # Through a DataLoader worker, as training reads: the same error, not a NaN loss.
    loader = torch.utils.data.DataLoader([(1, timestep)], batch_size=None, num_workers=1, multiprocessing_context="fork",
                                         collate_fn=lambda pair: entries.item(*pair))
    with pytest.raises(BankDamagedError, match=f"row {DAMAGED_ROW}"):
        next(iter(loader))


def test_a_damaged_file_in_a_users_folder_is_an_error_and_never_rewritten(
    tiny_model_dir: Path, components, tmp_path: Path  # noqa: ANN001
) -> None:
    images = subject(tmp_path / "dog", [0, 1], ["00.jpg", "01.jpg"])
    pdm = PDMSettings(inversion_steps=STEPS, features_dir=str(tmp_path / "features"))
    source = ModelSource(str(tiny_model_dir))
    settings = pdm.bank_settings(source, CLASS_PROMPT, RESOLUTION)
    build_bank(settings, images, tmp_path / "features", batch_size=2, device="cpu", progress=False, components=components)
    teacher = PDMTeacher(pdm, source)
    assert teacher.prepare(images, CLASS_PROMPT, RESOLUTION, torch.device("cpu")) is None  # intact: checked, used
    target = bank_file(tmp_path / "features", images[0])
    damage(target)
    damaged = target.read_bytes()

    with pytest.raises(BankDamagedError, match=f"{target} is damaged \\(row {DAMAGED_ROW} of queries fails its checksum\\)"):
        teacher.prepare(images, CLASS_PROMPT, RESOLUTION, torch.device("cpu"))
    # The features CLI's folder (on_mismatch="error") refuses it too, naming it, instead of reusing it.
    with pytest.raises(InputDataError, match=f"{target} is damaged .* delete that file to rebuild it"):
        build_bank(settings, images, tmp_path / "features", device="cpu", progress=False, components=components)
    assert target.read_bytes() == damaged


def test_subjects_whose_photos_share_names_keep_their_own_cache_files(
    tiny_model_dir: Path, components, tmp_path: Path, monkeypatch: pytest.MonkeyPatch  # noqa: ANN001
) -> None:
    names = ["00.jpg", "01.jpg"]
    dog = subject(tmp_path / "dog", [0, 1], names)
    cat = subject(tmp_path / "cat", [2, 3], names)  # DreamBench: the same 00.jpg, 01.jpg in every subject
    monkeypatch.setattr("pdm_lightning.core.loading.load_components", lambda *a, **k: components)
    teacher = PDMTeacher(PDMSettings(inversion_steps=STEPS, cache_dir=str(tmp_path / "cache")), ModelSource(str(tiny_model_dir)))

    def prepare(images: list[Path]) -> tuple[int, int]:
        report = teacher.prepare(images, CLASS_PROMPT, RESOLUTION, torch.device("cpu"))
        return report.computed, report.reused

    assert [prepare(dog), prepare(cat), prepare(dog), prepare(cat)] == [(2, 0), (2, 0), (0, 2), (0, 2)]
    folder = teacher.bank_folder(CLASS_PROMPT, RESOLUTION)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{fingerprint.file_sha256(p)}.safetensors" for p in dog + cat)
    dog_bank = teacher.entries(dog, CLASS_PROMPT, RESOLUTION).bank
    cat_bank = teacher.entries(cat, CLASS_PROMPT, RESOLUTION).bank
    assert [m["image_sha256"] for m in dog_bank.metadata] == [fingerprint.file_sha256(p) for p in dog]
    assert not torch.equal(dog_bank.queries([0], [999]), cat_bank.queries([0], [999]))

    # The same bytes under other names are the same entries: reused, and one file for two copies.
    renamed = subject(tmp_path / "renamed", [0, 0], ["x.jpg", "y.jpg"])
    assert prepare(renamed) == (0, 2)


def test_non_finite_teacher_values_stop_the_build_before_a_file_is_written(
    tiny_model_dir: Path, components, tmp_path: Path  # noqa: ANN001
) -> None:
    images = subject(tmp_path / "dog", [0], ["00.jpg"])
    settings = settings_for(tiny_model_dir, mode="bank")
    # The query layer overflows at some call (as a float16 run can): a bank holding it gives NaN PDM losses.
    layer = components.unet.get_submodule(settings.layer)
    handle = layer.register_forward_hook(lambda module, args, output: output * float("inf"))
    try:
        with pytest.raises(ValueError, match="is not finite .* check its weights"):
            build_bank(settings, images, tmp_path / "bank", device="cpu", progress=False, components=components)
    finally:
        handle.remove()
    assert list((tmp_path / "bank").iterdir()) == []


def _hash_at_barrier(barrier, path: str, memo: str) -> None:  # noqa: ANN001 - a multiprocessing.Barrier
    """In a forked process: hash one file into the shared memo once every process is ready.

    The memo write is slowed down, so without a lock every process reads the memo before any writes it.
    """
    write = fingerprint.write_bytes_atomically

    def slow_write(target: Path, data: bytes) -> None:
        time.sleep(0.3)
        write(target, data)

    fingerprint.write_bytes_atomically = slow_write
    barrier.wait()
    fingerprint.file_sha256(Path(path), Path(memo))


def test_concurrent_writers_of_the_model_hash_memo_keep_every_record(tmp_path: Path) -> None:
    files = []
    for index in range(4):
        files.append(tmp_path / f"weights-{index}.bin")
        files[-1].write_bytes(bytes([index]) * 1000)
    memo = tmp_path / "cache" / "file-hashes.json"
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(files))
    processes = [context.Process(target=_hash_at_barrier, args=(barrier, str(f), str(memo))) for f in files]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * len(files)
    records = json.loads(memo.read_text())
    assert sorted(records.values()) == sorted(fingerprint._hash_bytes(f) for f in files)
    assert not list(memo.parent.glob("*.partial"))


def test_an_intact_file_passes_and_files_without_checksums_are_named(
    tiny_model_dir: Path, components, tmp_path: Path  # noqa: ANN001
) -> None:
    images = subject(tmp_path / "dog", [0], ["00.jpg"])
    settings = settings_for(tiny_model_dir, inversion_steps=2)
    (path,) = build_bank(settings, images, tmp_path / "bank", device="cpu", progress=False, components=components).files
    assert find_damage(path) is None
    # A file written before bank files carried checksums (the same tensors, no *_crc32).
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys() if not name.endswith("_crc32")}
        metadata = handle.metadata()
    save_file(tensors, path, metadata=metadata)
    assert "no checksum for" in find_damage(path)
    with pytest.raises(InputDataError, match=f"{path} has no checksums for latents, queries, timesteps"):
        open_bank(tmp_path / "bank", images)
