"""docs/options.md is generated from train.py's parser (the docstrings' help, the parser's defaults) and kept current."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO_ROOT
from lightning.pytorch.cli import LightningArgumentParser

from pdm_lightning import docs_options
from pdm_lightning.cli import PDMLightningCLI

DOCS = REPO_ROOT / docs_options.DOCS_FILE
REGENERATE = f"run `{docs_options.COMMAND}` (from the repository root) to update it"


@pytest.fixture(scope="module")
def page() -> str:
    return docs_options.render()


def test_docs_options_md_is_current(page: str) -> None:
    assert DOCS.is_file(), f"{DOCS} is missing: {REGENERATE}"
    assert DOCS.read_text(encoding="utf-8") == page, f"{DOCS} is stale: {REGENERATE}"


def rows_by_option(page: str) -> dict[str, str]:
    """Table rows keyed by their first option name."""
    rows = {}
    for line in page.splitlines():
        if line.startswith("| `--"):
            rows[line.split("`")[1]] = line
    return rows


def test_every_option_of_ours_has_a_row_with_its_default_and_docstring_help(page: str) -> None:
    rows = rows_by_option(page)
    fit = docs_options.subcommand_parsers()["fit"]
    ours = [a for a in fit._actions if docs_options.is_documented(a) and "." in a.dest and not a.dest.startswith("trainer.")]
    missing = [a.option_strings[0] for a in ours if a.option_strings[0] not in rows]
    assert not missing, f"options without a row: {missing}"
    assert not [option for option in rows if option.startswith("--trainer")]  # the Trainer's are Lightning's
    groups = {a.dest.split(".")[0] for a in ours}
    assert groups >= {"model", "data", "checkpoint", "export", "samples", "evaluation", "quality_checkpoint",
                      "mask_preview", "prediction_writer", "lr_monitor"}
    # The fields of settings classes that --help lists only under --model.lora.help and the like.
    for option in ("--model.lora.rank", "--model.optimizer.lr_scheduler", "--model.pdm.inversion_steps",
                   "--data.class_generation.num_inference_steps", "--data.predict.prompts", "--data.evaluation.max_prompts"):
        assert option in rows, option
    # Help from the docstrings' Args: entries; defaults from the parser, cli.py's set_defaults included.
    assert "folder with the 3-5 photos of the subject" in rows["--data.instance_data_dir"]
    assert "| required |" in rows["--data.instance_data_dir"]
    assert "| `100` |" in rows["--checkpoint.every_n_train_steps"] and "| `3` |" in rows["--checkpoint.save_top_k"]
    assert "| `4` |" in rows["--model.lora.rank"] and "| `null` |" in rows["--model.pdm.inversion_steps"]
    assert "| `[255, 0, 64]` |" in rows["--mask_preview.color"]
    # A "|" in a type would end the cell: escaped.
    assert "`str \\| null`" in rows["--model.revision"]
    assert all(line.count(" | ") + 2 == line.count("|") - line.count("\\|") for line in rows.values())
    assert "`data.pdm` | from `--model.pdm`" in page  # link targets: said where they come from


class NewGroup:
    """A callback group added after this page was written."""

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        """
        Args:
            every_n_seconds: how often to do the new thing.
        """
        self.every_n_seconds = every_n_seconds


def test_a_new_option_group_appears_without_touching_the_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    add_arguments = PDMLightningCLI.add_arguments_to_parser

    def with_new_group(self: PDMLightningCLI, parser: LightningArgumentParser) -> None:
        add_arguments(self, parser)
        parser.add_class_arguments(NewGroup, "new_group")

    monkeypatch.setattr(PDMLightningCLI, "add_arguments_to_parser", with_new_group)
    rows = rows_by_option(docs_options.render())
    assert "how often to do the new thing." in rows["--new_group.every_n_seconds"]
    assert "| `30.0` |" in rows["--new_group.every_n_seconds"]


def test_check_fails_on_a_stale_file_and_names_the_command(
    tmp_path: Path, page: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(docs_options, "render", lambda: page)
    stale = tmp_path / "options.md"
    stale.write_text(page.replace("| `--model.learning_rate`", "| `--model.lr`"), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        docs_options.main(["--check", str(stale)])
    assert exit_info.value.code == 1
    assert docs_options.COMMAND in capsys.readouterr().err
    stale.write_text(page, encoding="utf-8")
    docs_options.main(["--check", str(stale)])  # current: exit status 0
