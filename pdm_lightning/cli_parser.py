"""train.py's argument parser: a short ``--help`` that leads with our options, and one-line errors.

LightningCLI's ``fit --help`` is over a thousand lines, the Trainer's options first; a mistyped option
printed the whole usage (180 lines) before ``error: unrecognized arguments``. ``PDMArgumentParser``
(LightningCLI's ``parser_class``) changes only what is printed:

- ``train.py fit --help``: one line per option of ours (model, data, masks, LoRA, optimizer, PDM,
  checkpoints, exports, samples, evaluation, ...), nested settings included, then the Trainer options
  used most and a pointer to ``--help-all``, which prints LightningCLI's full help.
- a parse error: ``error: <message>`` and one line pointing at ``--help``; an unknown option (on the
  command line or in a config file) gets "did you mean" with the closest known option.

``--print_config``, ``--model.lora.help`` and the like are jsonargparse's, unchanged.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import shutil
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

HELP_ALL = "--help-all"
NESTED_DEPTH = 3  # settings inside settings (e.g. the PDM bank's inside --model.pdm) are expanded this deep
# The Trainer options a run sets most, in our words (Lightning's first sentences say little here); the
# run folder is an argument of the logger, which the parser lists only under --trainer.logger.help.
TRAINER_LINES = {
    "--trainer.max_steps": "optimizer steps to train: the run's length.",
    "--trainer.logger.init_args.save_dir": "the run's folder: checkpoints/, config.yaml, TensorBoard events, export/.",
    "--trainer.accelerator": "cpu, gpu, mps or auto.",
    "--trainer.devices": "how many devices (or which ones, e.g. [0, 1]); several train with DDP.",
    "--trainer.precision": "32-true, bf16-mixed (the recipes' on GPUs), 16-mixed, ...",
    "--trainer.gradient_clip_val": "clip the gradient norm to this value.",
    "--trainer.accumulate_grad_batches": "batches per optimizer step.",
}
WIDTH_OFF_TERMINAL = 120  # lines written to a file or a pager are not wrapped: no need to cut them at 80
MAX_NAME_COLUMN = 40  # a longer option name gets its help after it instead of in the column
MIN_HELP_WIDTH = 30  # below this a one-line help is cut too short to read: the line may be wider than the terminal
SUBCOMMANDS = ("fit", "validate", "test", "predict")  # LightningCLI's; each has a group of its own (--ckpt_path)


# ---- the option names, nested ones included --------------------------------------------------------


def settable(parser: argparse.ArgumentParser, option: str) -> bool:
    """True when ``option`` sets a value: the target of a link (``--data.base_model``) is listed by
    argparse but refused (it is set through its source, ``--model.pretrained_model_name_or_path``)."""
    action = parser._option_string_actions.get(option)
    return action is not None and option in action.option_strings


def long_options(parser: argparse.ArgumentParser) -> list[str]:
    return [option for option in parser._option_string_actions if option.startswith("--") and settable(parser, option)]


def nested_settings(parser: argparse.ArgumentParser) -> Iterator[tuple[str, type]]:
    """``(key, class)`` of each option typed with one settings class (``--model.lora``: LoraSettings),
    which jsonargparse lists only under ``--model.lora.help``. Link targets (``data.pdm``) are left
    out: they are set through their source, never on the command line."""
    for action in parser._actions:
        types = getattr(action, "_help_types", None)  # jsonargparse's --KEY.help actions
        key = action.dest.removesuffix(".help")
        if types and len(types) == 1 and action.nargs == 0 and settable(parser, f"--{key}"):
            yield key, types[0]


def settings_parser(key: str, settings: type) -> ArgumentParser:
    """The options of ``settings`` under ``key``, as ``--model.lora.help`` shows them."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(settings, key)
    return parser


def default_class_options(parser: argparse.ArgumentParser) -> Iterator[str]:
    """For a Trainer option given as a class (the logger), the options of its default class, in
    both spellings jsonargparse accepts: ``--trainer.logger.init_args.save_dir`` and ``--trainer.logger.save_dir``."""
    try:
        defaults = parser.get_defaults()  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - only suggestions depend on it
        return
    for action in parser._actions:
        types = getattr(action, "_help_types", None)
        key = action.dest.removesuffix(".help")
        default = defaults.get(key) if types and action.nargs != 0 else None
        class_path = getattr(default, "class_path", None) if default is not None else None
        if not class_path:
            continue
        try:
            module, _, name = class_path.rpartition(".")
            options = long_options(settings_parser(f"{key}.init_args", getattr(importlib.import_module(module), name)))
        except Exception:  # noqa: BLE001, S112 - a class jsonargparse cannot describe: no suggestions from it
            continue
        for option in options:
            yield option
            yield option.replace(f"--{key}.init_args.", f"--{key}.", 1)


def all_options(parser: argparse.ArgumentParser, depth: int = NESTED_DEPTH) -> list[str]:
    """Every long option ``parser`` accepts: its own, those of its settings classes, of its default logger."""
    options = long_options(parser)
    if depth > 0:
        for key, settings in nested_settings(parser):
            options += all_options(settings_parser(key, settings), depth - 1)
    if depth == NESTED_DEPTH:
        options += default_class_options(parser)
    return list(dict.fromkeys(options))


# ---- one-line errors ---------------------------------------------------------------------------------


# jsonargparse's messages for a key it does not know: on the command line, in a config file's group,
# inside a settings class or a class given by class_path.
UNKNOWN_KEY_MESSAGES = (
    re.compile(r"^unrecognized arguments: (?P<arguments>.*)$", re.DOTALL),
    re.compile(r"Parser key \"(?P<group>[\w.]+)\":.*?Option '(?P<option>[\w.]+)' is not accepted", re.DOTALL),
    re.compile(r"Group '(?P<group>[\w.]+)' does not accept option '(?P<option>[\w.]+)'"),
    re.compile(r"Subcommand '\w+' does not accept option '(?P<key>[\w.]+)'"),
    re.compile(r"^Option '(?P<key>[\w.]+)' is not accepted"),
)


def unknown_key(message: str) -> str | None:
    """The key (``model.learning_rat``) that ``message`` says is unknown, or None for another error."""
    for pattern in UNKNOWN_KEY_MESSAGES:
        match = pattern.search(message)
        if not match:
            continue
        found = match.groupdict()
        if "arguments" in found:
            option = next((arg for arg in found["arguments"].split() if arg.startswith("--")), None)
            return option.split("=", 1)[0].removeprefix("--") if option else None
        return found.get("key") or f"{found['group']}.{found['option']}"
    return None


def typed_option(key: str, args: list[str]) -> str | None:
    """The option as the user typed it on the command line (``--trainer.logger.save_di``), None when
    ``key`` came from a config file. A class option's key may be typed with ``init_args``."""
    group, _, name = key.rpartition(".")
    for arg in args:
        typed = arg.split("=", 1)[0]
        if typed in (f"--{key}", f"--{group}.init_args.{name}"):
            return typed
    return None


def leaf(option: str) -> str:
    return option.rpartition(".")[2].lstrip("-")


def closest(option: str, candidates: list[str]) -> str | None:
    """The known option nearest to ``option``: one with the same last name in another group first
    (``--lr_scheduler``: ``--model.optimizer.lr_scheduler``), else the closest spelling
    (``--model.learning_rat``: ``--model.learning_rate``; a truncated name is suggested, never taken)."""
    same_name = [candidate for candidate in candidates if leaf(candidate) == leaf(option) and candidate != option]
    matches = difflib.get_close_matches(option, same_name, n=1, cutoff=0) if same_name else []
    matches = matches or difflib.get_close_matches(option, candidates, n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_option_message(key: str, args: list[str], candidates: list[str]) -> str:
    option = typed_option(key, args)
    if option is not None:
        suggestion = closest(option, candidates)
        text = f"unknown option {option}"
        return f"{text}; did you mean {suggestion}?" if suggestion else text
    suggestion = closest(f"--{key}", candidates)  # a config file's key: suggested as a key, not an option
    text = f"unknown key {key} in a --config file"
    return f"{text}; did you mean {suggestion.removeprefix('--')}?" if suggestion else text


def subcommand_parser(parser: argparse.ArgumentParser, args: list[str]) -> argparse.ArgumentParser:
    """The subcommand's parser (``fit``) when ``parser`` is train.py's main parser, else ``parser``."""
    subcommands = getattr(parser, "_subcommands_action", None)
    if subcommands is None:
        return parser
    name = next((arg for arg in args if arg in subcommands._name_parser_map), None)
    return subcommands._name_parser_map[name] if name else parser


def command_name(parser: argparse.ArgumentParser) -> str:
    return parser.prog.replace(" [options]", "")


# ---- the short --help --------------------------------------------------------------------------------


def one_line(text: str | None) -> str:
    """The first sentence of a docstring's help, on one line, without reST markup."""
    text = re.sub(r"\s+", " ", (text or "").replace("``", "`")).strip()
    sentence = re.split(r"(?<!e\.g)(?<!i\.e)(?<!etc)\.\s", text, maxsplit=1)[0]
    return sentence if sentence.endswith(".") or sentence == text else sentence + "."


def cut(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"


def fitted(name: str, text: str, column: int, width: int) -> str:
    """``  --name   text``, cut with an ellipsis at ``width`` (never below MIN_HELP_WIDTH of text)."""
    prefix = f"  {name:<{column}}  " if len(name) <= column else f"  {name}  "
    return cut(prefix + text, max(width, len(prefix) + MIN_HELP_WIDTH)).rstrip()


def group_title(group: argparse._ArgumentGroup) -> str:
    """The first sentence of the group's class docstring (jsonargparse's title is its first line only)."""
    group_class = getattr(group, "group_class", None)
    doc = inspect.getdoc(group_class) if group_class is not None else None
    return one_line(doc.split("\n\n", 1)[0] if doc else group.title)


def option_rows(parser: argparse.ArgumentParser, actions: list[argparse.Action]) -> list[tuple[str, str]]:
    """``(option, one-line help)`` of the settable options among ``actions`` (no --KEY.help, no
    "Path to a configuration file" of the group itself)."""
    rows = []
    for action in actions:
        options = [option for option in action.option_strings if option.startswith("--") and not option.endswith("+")]
        if not options or action.help == argparse.SUPPRESS or getattr(action, "_help_types", None):
            continue
        if type(action).__name__ == "_ActionConfigLoad":  # --model CONFIG: the group's own config file
            continue
        rows.append((options[0], one_line(action.help)))
    return rows


def group_sections(parser: argparse.ArgumentParser, depth: int = NESTED_DEPTH) -> list[tuple[str, list[tuple[str, str]]]]:
    """``(heading, rows)`` of each of our option groups, in the parser's order, each settings class
    (``model.lora``) right after the group that holds it. The Trainer's group and the subcommand's
    own (``--ckpt_path``) are left to ``general_rows`` and ``trainer_rows``."""
    nested = dict(nested_settings(parser)) if depth > 0 else {}
    sections = []
    for key, group in (getattr(parser, "groups", None) or {}).items():
        if key == "trainer" or key.startswith("trainer.") or key in SUBCOMMANDS:
            continue
        rows = option_rows(parser, group._group_actions)
        if rows:
            sections.append((f"{key}: {group_title(group)}", rows))
        for nested_key, settings in nested.items():
            if nested_key.rpartition(".")[0] == key:
                sections += group_sections(settings_parser(nested_key, settings), depth - 1)
    return sections



GENERAL_LINES = {
    "--config": "a yaml config (-c); several are merged in order, then the options given here.",
    "--ckpt_path": "`last`: the run's newest intact checkpoint (fit resumes from it); or a .ckpt file.",
    "--seed_everything": "the run's seed (weights, data order, noise).",
    "--print_config": "print the whole config, each option's help above it, and exit.",
    "--verbose": "show the libraries' notices, the model-summary table and where each warning comes from.",
    HELP_ALL: "every option with its type and default, the Trainer's included.",
}


def general_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """GENERAL_LINES of the options ``parser`` has (``--verbose`` is taken off by console.install first)."""
    return [(option, text) for option, text in GENERAL_LINES.items()
            if option == "--verbose" or option in parser._option_string_actions]


def trainer_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """TRAINER_LINES of the options ``parser`` has (``--trainer.logger.init_args.save_dir``: when it has a logger)."""
    return [(option, text) for option, text in TRAINER_LINES.items()
            if settable(parser, option.replace(".init_args.save_dir", ""))]


def help_width() -> int:
    """The terminal's width; off a terminal, WIDTH_OFF_TERMINAL."""
    if sys.stdout.isatty():
        return shutil.get_terminal_size().columns
    return WIDTH_OFF_TERMINAL


def short_help(parser: argparse.ArgumentParser, width: int | None = None) -> str:
    """``train.py fit --help``: our options first, one line each, and where the rest is."""
    width = width or help_width()
    command = command_name(parser)
    sections = [("general", general_rows(parser)), *group_sections(parser)]
    trainer = trainer_rows(parser)
    if trainer:
        sections.append((f"trainer (the options used most; all of them: {command} {HELP_ALL})", trainer))
    lines = [f"usage: {command} [-c CONFIG] [--GROUP.OPTION VALUE ...]", ""]
    if parser.description:
        lines += [one_line(parser.description), ""]
    for heading, rows in sections:
        column = min(MAX_NAME_COLUMN, max(len(name) for name, _ in rows))
        lines.append(cut(heading, width))
        lines += [fitted(name, text, column, width) for name, text in rows]
        lines.append("")
    lines += [
        f"All options, the Trainer's included, with types and defaults: {command} {HELP_ALL}",
        f"One settings class in full: {command} --model.lora.help (or --model.pdm.help, --data.class_generation.help, ...)",
    ]
    return "\n".join(lines) + "\n"


def jsonargparse_debug() -> bool:
    """JSONARGPARSE_DEBUG is set: jsonargparse's error then raises with the traceback (its private check)."""
    try:
        from jsonargparse._common import debug_mode_active
    except ImportError:
        return False
    return debug_mode_active()


class HelpAllAction(argparse.Action):
    """``--help-all``: LightningCLI's full help (every option, the Trainer's included), then exit."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        kwargs.update(nargs=0, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
        sys.stdout.write(parser.format_full_help())  # type: ignore[attr-defined]
        parser.exit()


class PDMArgumentParser(LightningArgumentParser):
    """LightningCLI's parser with the short ``--help`` (once ``use_short_help`` is called) and one-line errors."""

    short_help = False

    def use_short_help(self) -> None:
        """``--help`` prints the short help and ``--help-all`` the full one (train.py's subcommands)."""
        self.short_help = True
        self.add_argument(HELP_ALL, action=HelpAllAction, help="Show every option, the Trainer's included, and exit.")

    def format_help(self, *args: Any, **kwargs: Any) -> str:
        if self.short_help:
            return short_help(self)
        return self.format_full_help(*args, **kwargs)

    def format_full_help(self, *args: Any, **kwargs: Any) -> str:
        return super().format_help(*args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """``error: <message>`` and where the help is, with exit status 2, instead of the whole usage first."""
        if not self.exit_on_error or jsonargparse_debug():
            super().error(message, ex)  # raises: a nested parse, or JSONARGPARSE_DEBUG's traceback
        args = list(getattr(self, "args", None) or sys.argv[1:])
        parser = getattr(ex, "subcommand_parser", None) or subcommand_parser(self, args)
        key = unknown_key(message)
        if key is not None:
            message = unknown_option_message(key, args, all_options(parser))
        command = command_name(parser)
        every = f" (every option: {command} {HELP_ALL})" if getattr(parser, "short_help", False) else ""
        sys.stderr.write(f"error: {message}\nsee: {command} --help{every}\n")
        self.exit(2)
