"""Writes docs/options.md: every option of ours, with its type, default and help, read off train.py's parser.

    python -m pdm_lightning.docs_options > docs/options.md     # regenerate
    python -m pdm_lightning.docs_options --check docs/options.md  # exit 1 when the file is stale

The help texts are the docstrings (jsonargparse reads each ``Args:`` entry), the defaults are the
parser's (``set_defaults`` in cli.py included), so the page says what the code does:
tests/test_docs_options.py regenerates it and fails when the file differs. No row is written by hand:
whatever the parser has is documented, so a new option or callback group appears by itself.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

from jsonargparse import ArgumentParser

# Not exported by jsonargparse, but the page must tell them from options: a group's "--model" (a config
# file for the whole group) and a link target ("data.pdm", set from --model.pdm).
from jsonargparse._actions import _ActionConfigLoad
from jsonargparse._link_arguments import ActionLink

from pdm_lightning import cli

DOCS_FILE = Path("docs/options.md")
COMMAND = "python -m pdm_lightning.docs_options > docs/options.md"
TRAINER_KEY = "trainer"  # Lightning's Trainer options: documented by Lightning, listed by --help
NESTED_DEPTH = 3  # settings inside settings are expanded this deep


@dataclass
class Row:
    option: str
    type: str
    default: str
    help: str


@dataclass
class Table:
    """One group of options: a heading (the key, ``--model.lora.*``), its summary and its rows."""

    key: str
    summary: str
    rows: list[Row] = field(default_factory=list)


class _ParserBuilt(Exception):
    """Carries the parser out of LightningCLI before it parses anything (no config is needed)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser built")
        self.parser = parser


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """train.py's parser for each subcommand (fit, validate, test, predict), built exactly as train.py
    builds it (``cli.cli_main``) and stopped before parsing, so no option needs a value."""

    def stop(self: Any, parser: argparse.ArgumentParser, args: Any) -> None:
        raise _ParserBuilt(parser)

    with mock.patch.object(cli.PDMLightningCLI, "parse_arguments", stop):
        try:
            cli.cli_main(["fit"])
        except _ParserBuilt as built:
            return dict(built.parser._subcommands_action._name_parser_map)
    raise RuntimeError("cli_main returned without parsing its arguments")


# ---- one action -> one row ---------------------------------------------------------------------------


def is_documented(action: argparse.Action) -> bool:
    """An option a user sets: not a help action (``--help``, ``--model.lora.help``), not a group's
    ``--model`` config-file action (its options are listed one by one), not a link target."""
    if isinstance(action, (_ActionConfigLoad, ActionLink)) or not action.option_strings:
        return False
    return not (action.nargs == 0 and action.default == argparse.SUPPRESS)


def format_default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    value = action.default
    if value == argparse.SUPPRESS:
        return ""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, str):
        text = value if value else '""'
    elif isinstance(value, (list, tuple, dict)):
        text = json.dumps(list(value) if isinstance(value, tuple) else value, default=str)
    else:
        text = str(value)
    return f"`{text}`"


def format_type(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The type as ``--help`` prints it (``int | null``); empty where jsonargparse shows none."""
    try:
        text = parser._get_formatter()._get_type_str(action)  # type: ignore[attr-defined]
    except AttributeError:  # a plain argparse action or another jsonargparse: no type column entry
        return ""
    return f"`{text}`" if text else ""


def format_help(text: str | None, abridged_note: bool = True) -> str:
    """One line of Markdown: the first paragraph (Lightning's callbacks carry pages of notes and
    examples after it), whitespace collapsed, RST ``code`` as Markdown `code`."""
    text = (text or "").strip()
    if text == argparse.SUPPRESS:
        return ""
    first, _, rest = text.partition("\n\n")
    line = re.sub(r"``(.+?)``", r"`\1`", " ".join(first.split()))
    if rest.strip() and abridged_note:
        line += " (abridged; the full text is in the class's docstring)"
    return line


def row(parser: argparse.ArgumentParser, action: argparse.Action) -> Row:
    option = ", ".join(f"`{name}`" for name in action.option_strings if name.startswith("--"))
    return Row(option, format_type(parser, action), format_default(action), format_help(action.help))


# ---- the groups ----------------------------------------------------------------------------------------


def is_trainer(action: argparse.Action) -> bool:
    return action.dest == TRAINER_KEY or action.dest.startswith(TRAINER_KEY + ".")


def group_options(actions: list[argparse.Action]) -> list[argparse.Action]:
    """The options of a group of ours: dotted (``--model.x``; the top-level ones are the command's), not the Trainer's."""
    return [a for a in actions if is_documented(a) and "." in a.dest and not is_trainer(a)]


def section_key(group_actions: list[argparse.Action]) -> str:
    """The group's key (``model``, ``data.masks``): the dest of its config-file action, else the
    common prefix of its options' keys."""
    for action in group_actions:
        if isinstance(action, _ActionConfigLoad):
            return action.dest
    parents = [action.dest.split(".")[:-1] for action in group_options(group_actions)]
    common = []
    for parts in zip(*parents):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common) or "(other)"


def nested_settings(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> Iterator[tuple[str, type]]:
    """``(key, class)`` of each option typed with one settings class (``--model.lora``: LoraSettings):
    jsonargparse lists their fields only under ``--model.lora.help``. Link targets are left out."""
    options = parser._option_string_actions
    for action in actions:
        types = getattr(action, "_help_types", None)  # jsonargparse's --KEY.help action
        key = action.dest.removesuffix(".help")
        settings_option = options.get(f"--{key}")
        if types and len(types) == 1 and action.nargs == 0 and settings_option is not None and is_documented(settings_option):
            yield key, types[0]


def settings_parser(key: str, settings: type) -> ArgumentParser:
    """The options of ``settings`` under ``key``, as ``--model.lora.help`` shows them."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(settings, key)
    return parser


def settings_summary(settings: type) -> str:
    return sentence(format_help(settings.__doc__, abridged_note=False))  # the rest is the Args: the table


def sentence(text: str) -> str:
    """A group title as a sentence (jsonargparse drops the docstring summary's full stop)."""
    return text[:1].upper() + text[1:] + ("" if not text or text.endswith((".", ":")) else ".")


def parser_tables(parser: argparse.ArgumentParser, depth: int = NESTED_DEPTH) -> Iterator[Table]:
    """A table per option group of ``parser`` (the Trainer's left out), each followed by the tables of
    the settings classes its options take."""
    for group in parser._action_groups:
        actions = list(group._group_actions)
        rows = [row(parser, action) for action in group_options(actions)]
        if rows:
            yield Table(section_key(actions), sentence(format_help(group.title)), rows)
        if depth > 0:
            for nested_key, settings in nested_settings(parser, actions):
                nested = settings_parser(nested_key, settings)
                tables = list(parser_tables(nested, depth - 1))
                for table in tables:
                    if table.key == nested_key:
                        table.summary = settings_summary(settings)
                yield from tables


def command_rows(parsers: dict[str, argparse.ArgumentParser]) -> list[Row]:
    """The subcommands' top-level options (LightningCLI's ``--config``, ``--ckpt_path``, ...), each once;
    one that not every subcommand takes says which do."""
    found: dict[str, tuple[Row, list[str]]] = {}
    for name, parser in parsers.items():
        for action in parser._actions:
            if is_documented(action) and "." not in action.dest and not is_trainer(action):
                found.setdefault(action.dest, (row(parser, action), []))[1].append(name)
    rows = []
    for option_row, names in found.values():
        if len(names) < len(parsers):
            option_row.help = f"{', '.join(f'`{n}`' for n in names)} only: {option_row.help}"
        rows.append(option_row)
    return rows


def link_rows(parser: argparse.ArgumentParser) -> list[Row]:
    """Keys set for the user from another option (``data.pdm`` follows ``--model.pdm``)."""
    rows = []
    for action in parser._actions:
        if not isinstance(action, ActionLink):
            continue
        sources = ", ".join(f"`--{key}`" for key, _ in action.source)
        target_key, target_action = action.target
        rows.append(Row(f"`{target_key}`", "", f"from {sources}", format_help(target_action.help)))
    return rows


def all_group_options(parser: argparse.ArgumentParser) -> set[str]:
    """The options of every group of ours (``--model.*``, ``--checkpoint.*``, ...), nested ones included."""
    return {row.option for table in parser_tables(parser) for row in table.rows}


# ---- Markdown ----------------------------------------------------------------------------------------


def cell(text: str) -> str:
    # GitHub ends a table cell at any "|", also inside `code`: escaped, it shows as "|".
    return text.replace("|", "\\|")


def markdown_table(rows: list[Row], header: tuple[str, ...] = ("option", "type", "default", "what")) -> list[str]:
    """A table of ``rows``; a header of three columns leaves the type out."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = (r.option, r.type, r.default, r.help) if len(header) == 4 else (r.option, r.default, r.help)
        lines.append("| " + " | ".join(cell(c) for c in cells) + " |")
    return lines


def subcommand_note(parsers: dict[str, argparse.ArgumentParser]) -> str:
    """Whether validate / test / predict take the group options fit takes, as the parsers say."""
    fit = all_group_options(parsers["fit"])
    others = [name for name in parsers if name != "fit"]
    differing = []
    for name in others:
        options = all_group_options(parsers[name])
        extra, missing = options - fit, fit - options
        if extra or missing:
            parts = ([f"also {', '.join(sorted(extra))}"] if extra else []) + ([f"not {', '.join(sorted(missing))}"] if missing else [])
            differing.append(f"`{name}` takes {'; '.join(parts)}")
    listed = ", ".join(f"`{name}`" for name in others)
    if not differing:
        return f"`fit`, {listed} take the same `--model.*`, `--data.*` and callback options."
    return "The groups below are `fit`'s; " + "; ".join(differing) + "."


def render() -> str:
    """docs/options.md as the code describes it now."""
    parsers = subcommand_parsers()
    fit = parsers["fit"]
    full_help = "--help-all" if "--help-all" in fit._option_string_actions else "--help"
    lines = [
        "# Options",
        "",
        f"<!-- Generated by `{COMMAND}`: do not edit. tests/test_docs_options.py fails when this file is stale. -->",
        "",
        (
            "Every option of `python train.py fit|validate|test|predict` that this project defines (the model, the "
            "data, and the callbacks' groups), after the command's own (LightningCLI's). Each is given on the "
            "command line (`--model.learning_rate 1e-4`) or in a config file (`model:` / `learning_rate: 1.0e-4`); "
            "a later `--config` or option overrides an earlier one. The defaults are the parser's, before any "
            "`--config` (the files in `configs/` set many of them). The help texts are the code's docstrings. "
            + subcommand_note(parsers)
        ),
        "",
        (
            f"The Trainer's options (`--trainer.*`) are Lightning's: `python train.py fit {full_help}` lists them. "
            "The run's output folder is the logger's `--trainer.logger.init_args.save_dir`."
        ),
        "",
        (
            "An option whose default is `null` and that has fields (`--model.lora`, `--model.pdm`, ...) is off "
            "until it is given: setting any of its fields (`--model.lora.rank 8`) or the option itself "
            "(`--model.pdm '{}'`) turns it on with the other fields at their defaults."
        ),
        "",
        "## Command",
        "",
        *markdown_table(command_rows(parsers)),
    ]
    for table in parser_tables(fit):
        lines += ["", f"## `--{table.key}.*`", ""]
        if table.summary:
            lines += [table.summary, ""]
        lines += markdown_table(table.rows)
    links = link_rows(fit)
    if links:
        lines += ["", "## Set for you", "", "These keys are not options: train.py links them from the options named.", ""]
        lines += markdown_table(links, header=("key", "set from", "what"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="FILE", type=Path, help="exit 1 if FILE differs from what would be written")
    args = parser.parse_args(argv)
    text = render()
    if args.check is None:
        sys.stdout.write(text)
        return
    current = args.check.read_text(encoding="utf-8") if args.check.is_file() else None
    if current != text:
        print(f"{args.check} is stale: run `{COMMAND}` to update it.", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
