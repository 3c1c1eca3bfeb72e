"""Prompt templates: the identifier and class noun filled in, prompts read from files.

One filler for every prompt the project generates from (predict, samples, the DreamBench templates):
``{identifier}`` / ``{0}`` and ``{class_noun}`` / ``{1}``, ``{{`` / ``}}`` for literal braces, and an
error naming the prompt for anything else, so a typo never reaches the sampler as literal text.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from pathlib import Path

from pdm_lightning.core.errors import InputDataError

# Positional aliases of the named placeholders (``{0}`` identifier, ``{1}`` class noun, as in
# DreamBench's prompt lists).
POSITIONAL_PLACEHOLDERS = {"0": "identifier", "1": "class_noun"}


def fill_prompt(template: str, identifier: str | None = None, class_noun: str | None = None) -> str:
    """``template`` with ``{identifier}``/``{0}`` and ``{class_noun}``/``{1}`` replaced; ``{{`` is a literal brace.

    Raises InputDataError naming the prompt for an unknown placeholder or a value that is not set.
    """
    values = {"identifier": identifier, "class_noun": class_noun}
    pieces = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise InputDataError(f"Prompt {template!r}: {error}; write a literal brace as {{{{ or }}}}.") from None
    for literal, name, format_spec, conversion in parsed:
        pieces.append(literal)
        if name is None:
            continue
        key = POSITIONAL_PLACEHOLDERS.get(name, name)
        if key not in values or format_spec or conversion:
            raise InputDataError(
                f"Prompt {template!r} has an unknown placeholder {{{name}}}: use {{identifier}} / {{0}} or "
                "{class_noun} / {1}, or write a literal brace as {{ or }}."
            )
        if values[key] is None:
            raise InputDataError(
                f"Prompt {template!r} uses {{{name}}} but no {key} is set: pass it (--{key} / --data.predict.{key})."
            )
        pieces.append(values[key])
    return "".join(pieces)


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"prompts file {path} does not exist: give a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise InputDataError(f"prompts file {path} holds no prompt: write one prompt per line.")
    return prompts


def collect_prompts(
    prompts: Sequence[str] = (),
    prompts_file: str | Path | None = None,
    identifier: str | None = None,
    class_noun: str | None = None,
) -> list[str]:
    """The inline prompts then the file's, with placeholders filled."""
    templates = list(prompts) + (read_prompts_file(prompts_file) if prompts_file else [])
    if not templates:
        raise InputDataError("No prompt given: pass --prompt (repeatable) or --prompts_file.")
    return [fill_prompt(t, identifier, class_noun) for t in templates]
