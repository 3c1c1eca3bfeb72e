"""Exports are sets: one staging folder, one rename, a manifest a reader can check; no NaN is ever exported.

Kills are simulated with a monkeypatched single-file writer that writes half of the file's bytes and
then raises KeyboardInterrupt (in process: Ctrl-C) or calls ``os._exit(137)`` (in a subprocess: like
SIGKILL, no cleanup runs); a kill between the two renames of the fallback switch with a patched
``os.rename``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save, save_file

from conftest import REPO_ROOT, build_cli, folder_snapshot
from pdm_lightning.callbacks.export import ExportWeights
from pdm_lightning.export import export_set
from pdm_lightning.export.export_set import (
    ExportSetError,
    check_export_set,
    remove_set_leftovers,
    staged_set,
    write_manifest,
)
from pdm_lightning.export.verify import NonFiniteExportError, check_file, state_dict_differences
from pdm_lightning.export.weights import ExportOptions, export_weights

TESTS_DIR = Path(__file__).resolve().parent
UNET_FILE = Path("pipeline") / "unet" / "diffusion_pytorch_model.safetensors"

KILL_SCRIPT = '''
import os, sys
from pathlib import Path
from safetensors.torch import save
import pdm_lightning.export.weights as weights
from conftest import build_cli

def killed_writer(checkpoint, destination):
    data = save(checkpoint)
    Path(destination).write_bytes(data[: len(data) // 2])
    os._exit(137)  # like SIGKILL: no finally, no cleanup

weights.write_single_file = killed_writer
run, model, instance = map(Path, sys.argv[1:4])
cli = build_cli(run, model, instance, *sys.argv[4:])
cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path="last")
'''


def train(run: Path, model_dir: Path, instance_dir: Path, max_steps: int, ckpt_path: str | None = None) -> None:
    cli = build_cli(run, model_dir, instance_dir, *run_args(max_steps))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)


def run_args(max_steps: int) -> list[str]:
    return ["--trainer.max_steps", str(max_steps), "--model.learning_rate", "1e-3", "--samples.at_fit_end", "false"]


def make_set(folder: Path, step: int, text: str) -> None:
    """A small set: two files (one in a sub-folder) and its manifest, switched in like an export."""
    with staged_set(folder) as staging:
        (staging / "sub").mkdir()
        (staging / "a.txt").write_text(text)
        (staging / "sub" / "b.bin").write_bytes(text.encode() * 3)
        write_manifest(staging, step, "hash")


def test_verification_compares_nan_as_nan(tmp_path: Path) -> None:
    """Fault 2: NaN != NaN made a NaN export fail as "684 mismatching"; now equal NaNs are equal and NaN is named."""
    nan = torch.tensor([1.0, float("nan")])
    assert not state_dict_differences({"w": nan}, {"w": nan.clone()})
    save_file({"w": nan}, tmp_path / "w.safetensors")
    check_file(tmp_path / "w.safetensors", {"w": nan})  # loads back as written
    differences = state_dict_differences({"w": torch.tensor([1.0, 2.0])}, {"w": nan})
    assert differences.describe() == "1 mismatching (w (NaN: 0 written, 1 loaded))"
    assert state_dict_differences({"w": nan}, {"w": torch.tensor([float("nan"), 1.0])})  # NaN in another place


@pytest.mark.parametrize(
    ("variant", "value", "dtype", "culprit"),
    [
        ("full", float("nan"), "float32", r"unet\.conv_in\.weight \(1 nan, 0 inf of \d+ values\)"),
        ("full", 1e6, "float16", r"unet\.conv_in\.weight \(0 nan, 1 inf of \d+ values\)"),  # finite, overflows in float16
        ("lora", float("inf"), "float32", r"unet\..*\.lora_up \(0 nan, 1 inf of \d+ values\)"),
    ],
)
def test_export_refuses_nonfinite_weights_even_without_verification(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, variant: str, value: float, dtype: str, culprit: str
) -> None:
    extra = ["--model.lora.rank", "4"] if variant == "lora" else []
    module = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, *extra).model
    module.configure_model()
    weight = module.unet.conv_in.weight if variant == "full" else next(
        p for name, p in module.unet.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        weight.view(-1)[0] = value
    destination = tmp_path / "out" / "export"
    with pytest.raises(NonFiniteExportError, match=f"Refusing to export .*: {culprit}. Nothing was written"):
        export_weights(module, destination, ExportOptions(verify=False, dtype=dtype))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_the_manifest_check_finds_missing_unlisted_and_altered_files(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    make_set(folder, 7, "first")
    manifest = check_export_set(folder)
    assert manifest.step == 7 and sorted(manifest.files) == ["a.txt", "sub/b.bin"]
    assert manifest.files["a.txt"].size == 5
    (folder / "a.txt").write_text("First")  # same size, other bytes
    (folder / "sub" / "b.bin").unlink()
    (folder / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(ExportSetError) as raised:
        check_export_set(folder)
    assert str(raised.value) == (
        f"{folder} is not the export set of step 7 its manifest describes: missing sub/b.bin; "
        "not part of the set: extra.safetensors; a.txt does not match its sha256 in the manifest."
    )
    (folder / "manifest.json").unlink()
    with pytest.raises(ExportSetError, match="has no manifest.json"):
        check_export_set(folder)


def test_a_new_set_replaces_the_old_one_whole(tmp_path: Path) -> None:
    folder = tmp_path / "export"
    make_set(folder, 1, "old")
    (folder / "stray.txt").write_text("a file of the old set only")
    make_set(folder, 2, "new")
    assert check_export_set(folder).step == 2 and not (folder / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging or old set left


def test_a_kill_between_the_renames_of_the_fallback_switch_is_undone_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the filesystem cannot exchange two folders, the old set is moved aside first."""
    folder = tmp_path / "export"
    make_set(folder, 1, "old")
    monkeypatch.setattr(export_set, "_exchange", lambda first, second: False)
    calls, real_rename = [], os.rename

    def rename_killed_at_the_second_call(source, target) -> None:  # noqa: ANN001
        calls.append(target)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_killed_at_the_second_call)
    with pytest.raises(KeyboardInterrupt):
        make_set(folder, 2, "new")
    monkeypatch.setattr(os, "rename", real_rename)
    assert not folder.exists()  # the kill window: no set in place, the old one aside
    assert remove_set_leftovers(tmp_path) == [f"restored the previous export set {folder} (a switch was interrupted)"]
    assert check_export_set(folder).step == 1 and (folder / "a.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_fit_start_removes_leftovers_and_moves_old_layout_step_exports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    export, steps = run / "export", run / "export_steps"
    for folder in (export / "pipeline", export / "step_000100" / "pipeline", export / ".pipeline.k2j4x9",
                   export / "step_000100" / ".lora.a8b7c6", run / ".export.export-staging-q1w2e3" / "pipeline",
                   steps / ".step_000200.export-staging-z9y8x7", run / "notes" / ".pipeline.mine"):
        folder.mkdir(parents=True)
    (export / ".pdm_lightning-pdm_lightning.safetensors.abc123.partial").write_bytes(b"half")
    (export / "step_000100" / "pdm_lightning.safetensors").write_bytes(b"weights")

    actions = ExportWeights().clean_up(export, steps)
    assert len(actions) == 6, actions  # 2 staging folders, 1 move, 2 old staging folders, 1 partial file
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == [
        "export", "export/pipeline", "export_steps", "export_steps/step_000100",
        "export_steps/step_000100/pdm_lightning.safetensors", "export_steps/step_000100/pipeline",
        "notes", "notes/.pipeline.mine",  # not an export folder: left alone
    ]


def test_a_kill_during_an_export_keeps_the_previous_set(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault 7: a kill during an export left the new pipeline beside the old single file."""
    run = tmp_path / "run"
    train(run, tiny_model_dir, instance_dir, max_steps=2)
    before = folder_snapshot(run / "export")

    def interrupted_writer(checkpoint: dict[str, torch.Tensor], destination: Path) -> None:
        data = save(checkpoint)
        Path(destination).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt  # Ctrl-C halfway through the single file, after the pipeline was written

    monkeypatch.setattr("pdm_lightning.export.weights.write_single_file", interrupted_writer)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into exit status 1
            train(run, tiny_model_dir, instance_dir, max_steps=3, ckpt_path="last")
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert folder_snapshot(run / "export") == before
    assert check_export_set(run / "export").step == 2
    assert not list(run.glob(".*"))  # the staging folder went with the interrupt


def test_a_hard_kill_during_an_export_leaves_a_staging_folder_the_next_fit_start_removes(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path
) -> None:
    run = tmp_path / "run"
    train(run, tiny_model_dir, instance_dir, max_steps=2)
    before = folder_snapshot(run / "export")
    script = tmp_path / "kill_during_export.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    killed = subprocess.run([sys.executable, str(script), str(run), str(tiny_model_dir), str(instance_dir), *run_args(3)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == 137, killed.stderr[-3000:]
    leftovers = list(run.glob(".export.export-staging-*"))
    assert len(leftovers) == 1 and (leftovers[0] / UNET_FILE).is_file()  # the new pipeline, never switched in
    assert folder_snapshot(run / "export") == before and check_export_set(run / "export").step == 2

    train(run, tiny_model_dir, instance_dir, max_steps=3, ckpt_path="last")  # the next start (step 3 is done: export only)
    assert not leftovers[0].exists() and not list(run.glob(".*"))
    assert check_export_set(run / "export").step == 3
