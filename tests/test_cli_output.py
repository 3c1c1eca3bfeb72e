"""What train.py prints: a short ``--help`` with our options first, one-line "did you mean" errors, no
LightningCLI auto optimizer, and a quiet run (third-party notices filtered, our warnings on one line)
unless ``--verbose``."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from conftest import QUICKSTART_CONFIG, REPO_ROOT, quickstart_args
from pdm_lightning.core import console
from pdm_lightning.cli import cli_main

TESTS_DIR = Path(__file__).resolve().parent
QUICKSTART = ["--config", str(QUICKSTART_CONFIG)]


def parse_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """stderr of ``train.py fit --config quickstart.yaml ARGS``, which must fail to parse (status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *QUICKSTART, *args], prog="train.py")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def printed_help(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", *args], prog="train.py")
    assert exit_info.value.code == 0
    return capsys.readouterr().out


# ---- "did you mean" --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("typed", "meant"), [
    ("--model.learning_rat", "--model.learning_rate"),
    ("--data.instance_dir", "--data.instance_data_dir"),
    ("--trainer.max_step", "--trainer.max_steps"),
    ("--model.lora.rnk", "--model.lora.rank"),  # inside a settings class (jsonargparse's "Parser key" error)
    ("--trainer.logger.init_args.save_di", "--trainer.logger.init_args.save_dir"),  # the default logger's argument
    ("--model.learning_ra", "--model.learning_rate"),  # truncated: an error (allow_abbrev=False), not an abbreviation
    ("--max_steps", "--trainer.max_steps"),  # the right name in the wrong group
])
def test_a_mistyped_option_is_one_short_error_with_did_you_mean(typed: str, meant: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    error = parse_error(capsys, typed, "1")
    lines = error.strip().splitlines()
    assert lines[0] == f"error: unknown option {typed}; did you mean {meant}?"
    assert lines[1] == "see: train.py fit --help (every option: train.py fit --help-all)"
    assert len(lines) < 5 and "usage:" not in error  # before: ~180 lines of usage first


def test_a_mistyped_key_in_a_config_file_is_named_with_its_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("model:\n  learning_rat: 1.0e-4\n")
    error = parse_error(capsys, "--config", str(typo))
    assert error.splitlines()[0] == "error: unknown key model.learning_rat in a --config file; did you mean model.learning_rate?"


def test_other_parse_errors_are_short_too(capsys: pytest.CaptureFixture[str]) -> None:
    error = parse_error(capsys, "--model.learning_rate", "fast")
    assert error.startswith('error: Parser key "model.learning_rate":') and "fast" in error
    assert "usage:" not in error and len(error.splitlines()) < 6


def test_an_unknown_option_with_nothing_close_is_named_alone(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_error(capsys, "--zzzz", "1").splitlines()[0] == "error: unknown option --zzzz"


# ---- LightningCLI's auto optimizer ----------------------------------------------------------------------


@pytest.mark.parametrize("option", ["--optimizer", "--lr_scheduler"])
def test_lightning_auto_optimizer_arguments_are_gone(option: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--optimizer SGD --optimizer.lr 0.1`` used to parse, then crash in fit ("optimizer got an empty
    parameter list"): the module builds its own optimizer from --model.optimizer.*."""
    error = parse_error(capsys, option, "SGD", f"{option}.lr", "0.1")
    meant = {"--optimizer": "--model.optimizer", "--lr_scheduler": "--model.optimizer.lr_scheduler"}[option]
    assert error.splitlines()[0] == f"error: unknown option {option}; did you mean {meant}?"
    for text in (printed_help(capsys, "--help"), printed_help(capsys, "--help-all")):
        assert f"  {option} " not in text and f"[{option} " not in text and f"{option}.help" not in text


# ---- --help and --help-all ------------------------------------------------------------------------------


def option_lines(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line.startswith("  --")]


def test_fit_help_is_short_and_leads_with_our_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = printed_help(capsys, "--help")
    lines = text.splitlines()
    assert len(lines) < 300  # LightningCLI's: 1166 lines
    options = option_lines(text)
    trainer = [i for i, option in enumerate(options) if option.startswith("--trainer.")]
    ours = [i for i, option in enumerate(options) if option.startswith(("--model.", "--data.", "--checkpoint.", "--export."))]
    assert ours and trainer and max(ours) < min(trainer)  # before: the Trainer's 48 options came first
    # Settings that were shown only under --model.lora.help and the like now have their line.
    for option in ("--model.lora.rank", "--model.optimizer.lr_scheduler", "--model.pdm.inversion_steps",
                   "--data.masks.instance_mask_dir", "--data.class_generation.num_inference_steps",
                   "--samples.every_n_train_steps", "--trainer.logger.init_args.save_dir", "--ckpt_path", "--verbose"):
        assert option in options, option
    assert "--data.base_model.pretrained_model_name_or_path" not in options  # linked from --model.*: not settable
    assert "--model.lora.rank                         adapter rank r." in text  # one line of help each
    assert lines[-2] == "All options, the Trainer's included, with types and defaults: train.py fit --help-all"


def test_help_all_is_lightning_clis_full_help(capsys: pytest.CaptureFixture[str]) -> None:
    text = printed_help(capsys, "--help-all")
    assert len(text.splitlines()) > 1000
    for option in ("--trainer.max_epochs", "--trainer.limit_val_batches", "--model.learning_rate", "--data.masks.mode",
                   "--model.lora.help", "--print_config"):
        assert option in text
    assert "(type: float, default: 1e-06)" in " ".join(text.split())  # types and defaults, as before


def test_nested_help_still_works(capsys: pytest.CaptureFixture[str]) -> None:
    text = printed_help(capsys, "--model.lora.help")
    assert "--model.lora.rank RANK" in text and "(type: int, default: 4)" in text


# ---- quiet by default -----------------------------------------------------------------------------------


def test_our_warnings_print_as_one_plain_line(capsys: pytest.CaptureFixture[str]) -> None:
    own = str(console.PACKAGE_DIR / "core" / "images.py")
    others = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, *rest: others.append((str(message), filename))
        console.plain_own_warnings()
        warnings.warn_explicit("Skipping 1 entry", UserWarning, own, 144)
        warnings.warn_explicit("a library's warning", UserWarning, "/elsewhere/library.py", 7)
        warnings.warn_explicit("the CLI's own", UserWarning, str(REPO_ROOT / "train.py"), 3)
    # Before: ".../core/images.py:144: UserWarning: Skipping 1 entry" (Lightning's format takes pdm_lightning's
    # paths for its own: they contain "lightning").
    assert capsys.readouterr().err.splitlines() == ["warning: Skipping 1 entry", "warning: the CLI's own"]
    assert others == [("a library's warning", "/elsewhere/library.py")]  # the others keep their format


def test_the_log_filters_drop_only_their_exact_messages() -> None:
    def kept(logger: str, message: str) -> bool:
        record = logging.LogRecord(logger, logging.INFO, __file__, 1, message, None, None)
        return console.MessageFilter(console.QUIET_LOG_MESSAGES[logger]).filter(record)

    rank_zero = "lightning.pytorch.utilities.rank_zero"
    assert not kept(rank_zero, "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](x)")
    assert kept(rank_zero, "Restored all states from the checkpoint at last.ckpt")
    import_utils = "transformers.utils.import_utils"
    assert not kept(import_utils, "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
    assert kept(import_utils, "`CLIPImageProcessor` requires a newer tokenizers")


def test_verbose_is_taken_off_the_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    args = ["fit", "--verbose", "--config", "x.yaml"]
    assert console.take_verbose_flag(args)
    assert args == ["fit", "--config", "x.yaml"] and os.environ[console.VERBOSE_ENV] == "1"  # the runner's children too


# Printed by the libraries on every command (or every resume) before this change. A notice a new library
# version no longer prints fails the --verbose half of the test: remove it here and in core/console.py.
NOTICES = {
    "transformers' torchvision notice": "requires torchvision (not installed)",
    "Lightning's litlogger tip": "try installing [litlogger]",
    "torch's LeafSpec deprecation": "isinstance(treespec, LeafSpec)",
    "the model-summary table": "FLOPs",
    "the resume's checkpoint folder warning": "exists and is not empty",
    "Lightning's save_last hint": "HINT: Set `ModelCheckpoint(..., save_last=True)`",
    "the checkpoint's weights_only line": "`weights_only` was not set",
}


def train(tmp_path: Path, model_dir: Path, instance_dir: Path, max_steps: int, *extra: str) -> str:
    """``train.py fit`` on the quickstart config (tiny model), stdout and stderr together."""
    args = quickstart_args(tmp_path / "run", model_dir, instance_dir, "--trainer.max_steps", str(max_steps),
                           "--ckpt_path", "last", "--samples.every_n_train_steps", "0", "--samples.at_fit_end", "false",
                           *extra)
    # Without conftest's --trainer.enable_model_summary false: the default is what is tested.
    at = args.index("--trainer.enable_model_summary")
    del args[at:at + 2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    env.pop(console.VERBOSE_ENV, None)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "fit", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def test_a_run_is_quiet_unless_verbose(tmp_path: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    (instance_dir / "notes.txt").write_text("not a photo")  # gives one of our warnings
    fresh = train(tmp_path, tiny_model_dir, instance_dir, 2)
    resumed = train(tmp_path, tiny_model_dir, instance_dir, 3)
    for name, output in (("fresh", fresh), ("resumed", resumed)):
        shown = [notice for notice, text in NOTICES.items() if text in output]
        assert not shown, f"{name} run printed {shown}:\n{output}"
        assert "warning: Skipping 1 hidden, non-image or folder entries in instance_data_dir" in output
        assert "UserWarning: Skipping" not in output
        assert re.search(r"^Parameters: [\d.]+ ?[KMB]? trained, [\d.]+ ?[KMB]? frozen\.$", output, re.MULTILINE)  # the table's line
    assert f"No checkpoint in {tmp_path / 'run' / 'checkpoints'} yet: starting from scratch." in fresh

    verbose = train(tmp_path, tiny_model_dir, instance_dir, 4, "--verbose")
    hidden = [notice for notice, text in NOTICES.items() if text not in verbose and "HINT" not in text]
    assert not hidden, f"--verbose did not bring back {hidden}:\n{verbose}"
    assert "core/images.py:" in verbose and "warning: Skipping" not in verbose  # our warnings' sources, as before


def test_a_mistyped_option_on_the_command_line(tmp_path: Path) -> None:
    """The whole output of train.py for a typo: two lines, status 2, no notices before them."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop(console.VERBOSE_ENV, None)
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), "fit", *QUICKSTART, "--model.learning_rat", "3e-4"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == ("error: unknown option --model.learning_rat; did you mean --model.learning_rate?\n"
                             "see: train.py fit --help (every option: train.py fit --help-all)\n")


def test_console_is_installed_before_the_libraries_print() -> None:
    """Each entry point installs the filters before importing what prints at import time."""
    for script in (REPO_ROOT / "train.py", REPO_ROOT / "predict.py", REPO_ROOT / "pdm_lightning" / "cli.py"):
        source = script.read_text(encoding="utf-8")
        assert source.index("console.install(sys.argv)") < min(
            source.index(heavy) for heavy in ("import torch", "import lightning", "from pdm_lightning.cli ",
                                              "from pdm_lightning.predict_sources") if heavy in source), script

