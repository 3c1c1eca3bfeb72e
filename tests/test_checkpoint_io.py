"""Checkpoints are written atomically beside their target, and ``--ckpt_path`` never loads a damaged one.

Kills and full disks are simulated, not real: a ``torch.save`` replaced by a writer that writes part
of the real bytes and then raises ``KeyboardInterrupt`` (a Ctrl-C) or ``OSError(ENOSPC)`` (a full
disk); a hard kill (``os._exit``, no clean-up at all) in a child process; and ``$TMPDIR`` on another
filesystem by an ``os.rename``/``os.replace`` that fails with ``EXDEV`` between two folders.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy

from conftest import REPO_ROOT, build_cli, quickstart_args
from pdm_lightning.callbacks.checkpoint import StepCheckpoint
from pdm_lightning.cli import cli_main, report_input_errors
from pdm_lightning.core.atomic import TMP_PREFIX, TMP_SUFFIX
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.training import checkpoint_io
from pdm_lightning.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    DamagedCheckpointError,
    RefusedCheckpointError,
)
from pdm_lightning.training.resume import check_explicit_checkpoint, choose_resume_checkpoint

TESTS_DIR = Path(__file__).resolve().parent
REAL_SAVE = torch.save  # the tests below replace torch.save; serialising the real bytes needs the original


def fake_checkpoint(step: int) -> dict:
    """A small Lightning-shaped checkpoint (what the resume chooser reads: state_dict and global_step)."""
    return {"state_dict": {"w": torch.full((256,), float(step))}, "global_step": step, "epoch": 0}


def serialized(checkpoint: dict) -> bytes:
    buffer = io.BytesIO()
    REAL_SAVE(checkpoint, buffer)
    return buffer.getvalue()


def partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"{TMP_PREFIX}*{TMP_SUFFIX}"))


def interrupted_save(fraction: float, error: BaseException):
    """A torch.save that writes ``fraction`` of the real bytes and then fails like a kill or a full disk."""

    def save(obj: object, target: io.IOBase, *args: object, **kwargs: object) -> None:
        data = serialized(obj)
        target.write(data[: int(len(data) * fraction)])
        target.flush()
        raise error

    return save


@pytest.fixture
def cli_trainer(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> L.Trainer:
    """The trainer train.py builds (nothing trained)."""
    return build_cli(tmp_path / "run", tiny_model_dir, instance_dir).trainer


# --- writing -------------------------------------------------------------------------------------


def test_train_py_writes_checkpoints_through_atomic_io_for_every_strategy(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    single = build_cli(tmp_path / "a", tiny_model_dir, instance_dir).trainer
    assert isinstance(single.strategy.checkpoint_io, AtomicCheckpointIO)
    # DDP: the strategy's own checkpoint_io is the one that writes (rank 0).
    ddp = build_cli(tmp_path / "b", tiny_model_dir, instance_dir, "--trainer.strategy", "ddp", "--trainer.devices", "2").trainer
    assert isinstance(ddp.strategy, DDPStrategy)
    assert isinstance(ddp.strategy.checkpoint_io, AtomicCheckpointIO)


def test_kill_during_a_cross_filesystem_move_keeps_the_previous_last_ckpt(
    tmp_path: Path, cli_trainer: L.Trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault 1: with $TMPDIR on another filesystem, Lightning/fsspec wrote the checkpoint there and
    # "moved" it by copying straight into last.ckpt; a kill during that copy left it at half size.
    folder = tmp_path / "run" / "checkpoints"
    last = folder / "last.ckpt"
    io_plugin = cli_trainer.strategy.checkpoint_io
    io_plugin.save_checkpoint(fake_checkpoint(4), last)

    other_fs = tmp_path / "tmpdir-on-another-fs"
    other_fs.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(other_fs))
    real_rename, real_replace = os.rename, os.replace

    def cross_device(real: Callable[..., None]) -> Callable[..., None]:
        def rename(src: str, dst: str, *args: object, **kwargs: object) -> None:
            if Path(src).resolve().parent != Path(dst).resolve().parent:
                raise OSError(errno.EXDEV, "Invalid cross-device link")
            real(src, dst, *args, **kwargs)
        return rename

    def killed_copy(src: str, dst: str, *args: object, **kwargs: object) -> str:
        data = Path(src).read_bytes()
        Path(dst).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", cross_device(real_rename))
    monkeypatch.setattr(os, "replace", cross_device(real_replace))
    monkeypatch.setattr(shutil, "copyfile", killed_copy)
    with contextlib.suppress(KeyboardInterrupt):  # the kill lands in the copy, if there is one
        io_plugin.save_checkpoint(fake_checkpoint(6), last)
    monkeypatch.undo()

    # Complete: the new checkpoint (written and renamed in its own folder, no copy), or else the old one.
    assert torch.load(last, weights_only=True)["global_step"] in (4, 6)
    assert [p.name for p in folder.iterdir()] == ["last.ckpt"]
    assert not list(other_fs.iterdir())  # nothing is written to $TMPDIR (where a killed write stayed for ever)


def test_write_killed_midway_leaves_the_old_file_and_no_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(fake_checkpoint(4), last)
    monkeypatch.setattr(checkpoint_io.torch, "save", interrupted_save(0.5, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(fake_checkpoint(6), last)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint(fake_checkpoint(6), last.with_name("step=000006.ckpt"))
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert [p.name for p in last.parent.iterdir()] == ["last.ckpt"]  # no step file, no temporary file
    assert oct(last.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_full_disk_names_the_file_and_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(fake_checkpoint(4), last)
    monkeypatch.setattr(checkpoint_io.torch, "save", interrupted_save(0.3, OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointWriteError) as error_info:
        AtomicCheckpointIO().save_checkpoint(fake_checkpoint(6), last)
    monkeypatch.undo()
    error = error_info.value
    assert error.errno == errno.ENOSPC
    assert f"No space left writing {last} (" in str(error) and " MB free): free space or move the run" in str(error)
    assert torch.load(last, weights_only=True)["global_step"] == 4 and not partials(last.parent)

    # train.py prints it as one line (exit status 1), not a traceback.
    with pytest.raises(SystemExit) as exit_info, report_input_errors():
        raise error
    assert exit_info.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {error.strerror}"]


KILLED_WRITE = """
import os, sys, torch
from collections.abc import Callable
from pathlib import Path
from pdm_lightning.training import checkpoint_io

def killed(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04" + b"x" * 1000)
    handle.flush()
    os._exit(137)  # a SIGKILL: no exception, no clean-up

checkpoint_io.torch.save = killed
checkpoint_io.AtomicCheckpointIO().save_checkpoint({"global_step": 6}, Path(sys.argv[1]))
"""


def test_temp_file_of_a_killed_write_is_removed_at_the_next_fit_start(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    AtomicCheckpointIO().save_checkpoint(fake_checkpoint(4), folder / "last.ckpt")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(folder / "last.ckpt")], env=env, timeout=300, check=False)
    assert killed.returncode == 137
    assert len(partials(folder)) == 1  # the killed write's temporary file, beside last.ckpt ...
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # ... which is intact
    foreign = folder / ".last.ckpt.fsspec-tmp"  # another program's file: not ours to delete
    foreign.write_bytes(b"x")

    trainer = L.Trainer(
        max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        plugins=[AtomicCheckpointIO()], callbacks=[StepCheckpoint(dirpath=str(folder), filename="{step:06d}")],
        default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert not partials(folder)
    assert foreign.exists()


# --- choosing what to resume from ---------------------------------------------------------------


def write_run(folder: Path, steps: list[int], last: int | None) -> None:
    for step in steps:
        AtomicCheckpointIO().save_checkpoint(fake_checkpoint(step), folder / f"step={step:06d}.ckpt")
    if last is not None:
        AtomicCheckpointIO().save_checkpoint(fake_checkpoint(last), folder / "last.ckpt")


def truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_intact_last_is_chosen_silently(tmp_path: Path) -> None:
    write_run(tmp_path, [2, 4], last=5)
    choice = choose_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "last.ckpt" and choice.note is None and not choice.damaged


def test_truncated_last_falls_back_to_the_newest_intact_step(tmp_path: Path) -> None:
    write_run(tmp_path, [2, 4, 6], last=6)
    truncate(tmp_path / "last.ckpt", 0.5)
    truncate(tmp_path / "step=000006.ckpt", 0.3)  # a full disk cut both short
    choice = choose_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step=000004.ckpt"
    assert choice.note == (f"Resuming from {tmp_path / 'step=000004.ckpt'} (step 4), the newest intact checkpoint in "
                           f"{tmp_path}: its last checkpoint is damaged.")
    assert sorted(check.path.name for check in choice.damaged) == ["last.ckpt", "step=000006.ckpt"]
    assert all("cut short" in check.damage.reason and check.damage.interrupted for check in choice.damaged)


def test_a_file_that_is_not_a_zip_is_skipped_but_never_marked_for_removal(tmp_path: Path) -> None:
    write_run(tmp_path, [2], last=None)
    (tmp_path / "notes.ckpt").write_text("someone's notes")  # not a write of ours that was cut short
    choice = choose_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step=000002.ckpt"
    (damaged,) = choice.damaged
    assert damaged.damage.reason == "not a torch checkpoint (15 bytes, not a zip archive)" and not damaged.damage.interrupted


def test_a_corrupt_pickle_in_a_complete_zip_is_skipped_but_never_marked_for_removal(tmp_path: Path) -> None:
    write_run(tmp_path, [2], last=4)
    data = bytearray((tmp_path / "last.ckpt").read_bytes())
    start = data.index(b"\x80\x02", data.index(b"data.pkl"))  # the pickle's first bytes (protocol 2)
    data[start + 2 : start + 12] = b"\xff" * 10  # bit rot inside it; the zip structure stays whole
    (tmp_path / "last.ckpt").write_bytes(bytes(data))
    choice = choose_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step=000002.ckpt"
    (damaged,) = choice.damaged
    assert damaged.damage.reason.startswith("unreadable (UnpicklingError: ") and not damaged.damage.interrupted


def test_only_damaged_checkpoints_fail_naming_them(tmp_path: Path) -> None:
    (tmp_path / "last.ckpt").write_bytes(b"")
    with pytest.raises(InputDataError, match=r"No intact checkpoint to resume from in .*: last\.ckpt is empty \(0 bytes\)\. "
                                             r"Start the run again without --ckpt_path"):
        choose_resume_checkpoint(tmp_path)
    assert choose_resume_checkpoint(tmp_path / "no-run-yet").path is None  # Lightning then starts from scratch


def test_explicit_damaged_checkpoint_names_the_intact_one(tmp_path: Path) -> None:
    write_run(tmp_path, [2, 4], last=None)
    truncate(tmp_path / "step=000004.ckpt", 0.5)
    with pytest.raises(InputDataError) as error:
        check_explicit_checkpoint(tmp_path / "step=000004.ckpt")
    assert str(error.value) == (
        f"--ckpt_path {tmp_path / 'step=000004.ckpt'} is damaged (cut short ({(tmp_path / 'step=000004.ckpt').stat().st_size} "
        "bytes, no zip directory at its end: the write was interrupted)): resume from "
        f"{tmp_path / 'step=000002.ckpt'} (step 2), the newest intact checkpoint beside it: --ckpt_path {tmp_path / 'step=000002.ckpt'}."
    )
    check_explicit_checkpoint(tmp_path / "step=000002.ckpt")  # intact: no error


def test_lightning_reading_a_damaged_file_gets_one_line_naming_it(tmp_path: Path) -> None:
    # trainer.fit(ckpt_path=...) called from Python (not through train.py's check) reads with our CheckpointIO.
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match=rf"^{re.escape(str(path))} is damaged: empty \(0 bytes\)\.$"):
        AtomicCheckpointIO().load_checkpoint(path)
    write_run(tmp_path, [], last=3)
    truncate(path, 0.6)
    with pytest.raises(DamagedCheckpointError, match=r"is damaged: cut short \(\d+ bytes, no zip directory at its end"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_a_file_that_would_run_code_stops_the_choice(tmp_path: Path) -> None:
    write_run(tmp_path, [2], last=2)
    torch.save({"state_dict": {}, "global_step": 9, "x": print}, tmp_path / "step=000009.ckpt")
    with pytest.raises(RefusedCheckpointError, match=r"step=000009\.ckpt was refused: it holds (builtins\.)?print, "):
        choose_resume_checkpoint(tmp_path)


# --- train.py end to end -------------------------------------------------------------------------


def train(tmp_path: Path, model_dir: Path, instance_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = quickstart_args(
        tmp_path / "run", model_dir, instance_dir,
        "--checkpoint.every_n_train_steps", "2", "--checkpoint.save_top_k", "-1", "--samples.at_fit_end", "false",
        "--export.pipeline", "false", "--export.single_file", "false", "--export.lora_folder", "false",
        "--export.lora_kohya", "false", *extra,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "fit", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_train_py_resumes_from_the_intact_step_when_last_and_a_step_file_are_truncated(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    first = train(tmp_path, tiny_model_dir, instance_dir, "--trainer.max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "run" / "checkpoints"
    truncate(folder / "last.ckpt", 0.5)  # what a full disk left under the final names before this fix
    truncate(folder / "step=000004.ckpt", 0.3)

    resumed = train(tmp_path, tiny_model_dir, instance_dir, "--trainer.max_steps", "6", "--ckpt_path", "last")
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "PytorchStreamReader" not in output
    lines = output.splitlines()
    for name in ("last.ckpt", "step=000004.ckpt"):
        assert sum(line.startswith(f"Checkpoint {folder / name} is damaged (cut short (") and line.endswith("): removed it.")
                   for line in lines) == 1, name
    assert f"Resuming from {folder / 'step=000002.ckpt'} (step 2), the newest intact checkpoint in {folder}: its last checkpoint is damaged." in lines
    assert f"Restored all states from the checkpoint at {folder / 'step=000002.ckpt'}" in output
    # The re-run steps are saved under their own names (no step=000004-v1.ckpt beside a damaged file).
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step=000002.ckpt", "step=000004.ckpt", "step=000006.ckpt"]
    assert {p.name: torch.load(p, weights_only=True)["global_step"] for p in folder.iterdir()} == {
        "last.ckpt": 6, "step=000002.ckpt": 2, "step=000004.ckpt": 4, "step=000006.ckpt": 6}


def test_train_py_zero_byte_last_without_an_intact_checkpoint_is_one_clear_line(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "last.ckpt").write_bytes(b"")  # a kill during the old cross-filesystem copy
    result = train(tmp_path, tiny_model_dir, instance_dir, "--ckpt_path", "last")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "EOFError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: No intact checkpoint to resume from in {folder}: last.ckpt is empty (0 bytes). Start the run again "
        "without --ckpt_path (it starts from step 0), or give another --ckpt_path."
    )


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_explicit_truncated_ckpt_path_is_refused_before_lightning_reads_it(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, subcommand: str
) -> None:
    folder = tmp_path / "run" / "checkpoints"
    write_run(folder, [2, 4], last=None)
    truncate(folder / "step=000004.ckpt", 0.5)
    args = quickstart_args(tmp_path / "run", tiny_model_dir, instance_dir, "--ckpt_path", str(folder / "step=000004.ckpt"))
    with pytest.raises(InputDataError, match=rf"--ckpt_path {folder / 'step=000004.ckpt'} is damaged \(cut short .*: "
                                             rf"--ckpt_path {folder / 'step=000002.ckpt'}\.$"):
        cli_main([subcommand, *args])
