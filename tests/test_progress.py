"""The step progress display: plain lines in a log file, the start banner and the resumed-at line.

The fits run in-process with pytest's capture as the output: not a terminal, as when train.py's output
goes to a log file (each test asserts it).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import build_cli, quickstart_args
from pdm_lightning import cli
from pdm_lightning.callbacks.progress import LinePacer, StepProgressBar, StepRate, banner, with_step_progress_bar

# A fit without the slow extras (sample images, export): only steps and checkpoints.
FAST = ("--trainer.enable_progress_bar", "true", "--samples.every_n_train_steps", "0", "--samples.at_fit_end", "false",
        "--export.single_file", "false", "--export.pipeline", "false")
LINE = re.compile(
    r"^step (\d+)/(\d+) \((\d+)%\) \| \d+\.\d\d (?:it/s|s/it) \| loss \d+\.\d{4} \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


@pytest.fixture(autouse=True)
def step_progress_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installs StepProgressBar in train.py's CLI as the lines given to cli.py do (until cli.py has them)."""
    if hasattr(cli, "with_step_progress_bar"):
        return

    class CLIWithStepProgress(cli.PDMLightningCLI):
        def add_arguments_to_parser(self, parser: Any) -> None:
            super().add_arguments_to_parser(parser)
            # Not add_lightning_class_args: that would always add the bar, and Lightning refuses a
            # ProgressBar callback with --trainer.enable_progress_bar false.
            parser.add_class_arguments(StepProgressBar, "progress", fail_untyped=False, instantiate=True, sub_configs=True)

        def instantiate_trainer(self, **kwargs: Any) -> Any:
            config = self.config_init.get(str(self.subcommand), self.config_init)
            trainer_config = config.get("trainer") or {}
            kwargs["callbacks"] = with_step_progress_bar(
                kwargs.get("callbacks", trainer_config.get("callbacks")),
                kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar")),
                config.get("progress"),
            )
            return super().instantiate_trainer(**kwargs)

    monkeypatch.setattr(cli, "PDMLightningCLI", CLIWithStepProgress)


def fit(run_dir: Path, model_dir: Path, instance_dir: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    """``train.py fit`` in-process; its stdout and stderr together."""
    assert not sys.stdout.isatty(), "the output must not be a terminal here (a log file's case)"
    capsys.readouterr()
    cli.cli_main(["fit", *quickstart_args(run_dir, model_dir, instance_dir, *FAST, *extra)])
    captured = capsys.readouterr()
    return captured.out + captured.err


def step_lines(output: str) -> list[re.Match]:
    return [match for line in output.splitlines() if (match := LINE.match(line))]


def test_log_file_gets_a_line_every_n_steps_with_rate_loss_and_eta(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    output = fit(run, tiny_model_dir, instance_dir, capsys, "--trainer.max_steps", "7",
                 "--progress.every_n_steps", "3", "--progress.every_n_seconds", "0")
    lines = step_lines(output)
    # Every 3rd step, and the last one (7) although it is no multiple of 3.
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in lines] == [(3, 7, 42), (6, 7, 85), (7, 7, 100)], output
    assert lines[-1][0].endswith("ETA 0:00:00")
    # Lightning's epoch bar is gone (it read "Epoch 3/-2" with max_steps) and nothing else counts epochs.
    assert "Epoch" not in output and "/-2" not in output
    # The banner: what is trained (quickstart: full fine-tune with the text encoder), base, steps, outputs.
    banners = [line for line in output.splitlines() if line.startswith("fit: ")]
    assert banners == [f"fit: full fine-tune, UNet + text encoder | PDM off | prior preservation off | base {tiny_model_dir} "
                        f"| 7 steps | outputs {run}"]
    assert "resumed at" not in output


def test_progress_bar_off_turns_the_display_off(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    output = fit(tmp_path / "run", tiny_model_dir, instance_dir, capsys, "--trainer.max_steps", "2",
                 "--trainer.enable_progress_bar", "false")  # Lightning refuses a ProgressBar callback with this
    assert not step_lines(output) and "fit: " not in output


def test_resumed_run_says_where_it_picked_up(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    fit(run, tiny_model_dir, instance_dir, capsys, "--trainer.max_steps", "3", "--progress.every_n_steps", "2")
    output = fit(run, tiny_model_dir, instance_dir, capsys, "--trainer.max_steps", "6", "--ckpt_path", "last",
                 "--progress.every_n_steps", "2")
    assert f"resumed at step 3 of 6 from {run / 'checkpoints' / 'last.ckpt'}" in output.splitlines(), output
    # The step lines go on from the checkpoint's step, at multiples of every_n_steps, with the new total.
    assert [(int(m[1]), int(m[2])) for m in step_lines(output)] == [(4, 6), (6, 6)], output


def test_banner_names_lora_pdm_teacher_and_prior_preservation(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    built = build_cli(tmp_path / "run", tiny_model_dir, instance_dir, "--model.lora.rank", "8", "--model.train_text_encoder",
                      "false", "--model.pdm.teacher", "on_the_fly", "--data.with_prior_preservation", "true",
                      "--trainer.max_steps", "50")
    trainer = SimpleNamespace(datamodule=built.datamodule, max_steps=50, max_epochs=None)
    assert banner(trainer, built.model, Path("runs/x")) == (
        f"fit: LoRA rank 8, UNet | PDM on (on_the_fly teacher, weight 0.05) | prior preservation on | base {tiny_model_dir} "
        "| 50 steps | outputs runs/x"
    )


def test_predict_and_live_line(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, capsys: pytest.CaptureFixture) -> None:
    """``predict`` shows its batches as plain lines; a terminal's live line (forced here) carries the same parts."""
    args = quickstart_args(tmp_path / "run", tiny_model_dir, instance_dir, "--trainer.enable_progress_bar", "true",
                           "--data.predict.prompts", '["a photo of sks dog"]', "--data.predict.num_images_per_prompt", "2",
                           "--data.predict.batch_size", "1", "--data.predict.num_inference_steps", "1")
    capsys.readouterr()
    cli.cli_main(["predict", *args])
    assert "Predicting: batch 2/2 | elapsed 0:00:0" in capsys.readouterr().out

    terminal = io.StringIO()
    bar = StepProgressBar(live=True)
    bar.stream = lambda: terminal  # type: ignore[method-assign]
    built = build_cli(tmp_path / "live", tiny_model_dir, instance_dir, *FAST, "--trainer.max_steps", "2")
    built.trainer.callbacks = [c for c in built.trainer.callbacks if not isinstance(c, StepProgressBar)] + [bar]
    built.trainer.fit(built.model, datamodule=built.datamodule)
    last = terminal.getvalue().split("\r")[-1]
    assert re.search(r"step 2/2 \(100%\) \|.*\| \d+\.\d\d (it/s|s/it) \| loss \d\.\d{4} \| elapsed 0:00:\d\d \| ETA 0:00:00", last), last


def test_line_format_and_cadence_by_steps_or_seconds() -> None:
    rate = StepRate(start_step=0, total=700, start_time=0.0)
    assert rate.line(120, 52.0, 0.1234) == "step 120/700 (17%) | 2.31 it/s | loss 0.1234 | elapsed 0:00:52 | ETA 0:04:11"
    # Slower than a step a second: seconds per step; a resumed run's rate counts only this fit's steps.
    resumed = StepRate(start_step=100, total=200, start_time=10.0)
    assert resumed.line(110, 50.0, None) == "step 110/200 (55%) | 4.00 s/it | elapsed 0:00:40 | ETA 0:06:00"

    pacer = LinePacer(every_n=10, every_n_seconds=30.0)
    pacer.mark(0.0)
    assert not pacer.due(3, 29.0)
    assert pacer.due(3, 30.0)  # 30 s without a line comes before step 10
    pacer.mark(30.0)
    assert pacer.due(10, 31.0)  # ... and step 10 still gets its line
    assert pacer.due(13, 31.0, final=True)
    assert not LinePacer(every_n=0, every_n_seconds=30.0).due(10, 1.0)  # 0: by time only


def test_bad_settings_fail_when_made() -> None:
    with pytest.raises(ValueError, match="every_n_steps"):
        StepProgressBar(every_n_steps=-1)
    with pytest.raises(ValueError, match="both 0"):
        StepProgressBar(every_n_steps=0, every_n_seconds=0)
