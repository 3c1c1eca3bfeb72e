"""DreamBench prompts and classes: parsing ``prompts_and_classes.txt`` and filling in identifier and class.

The file (published with the DreamBooth dataset) holds a ``subject_name,class`` table and two
prompt lists, one for objects and one for live subjects, as Python ``'...'.format(unique_token,
class_token)`` lines. By the DreamBench convention the live subjects are the cats and dogs.
The file is bundled with the package (``BUNDLED_PROMPTS_FILE``, read once by ``bundled_dreambench()``), so
the evaluation and the runner work without the dataset; ``OBJECT_PROMPTS`` / ``LIVE_PROMPTS`` are its lists.
Templates are filled by ``generation.prompts.fill_prompt``, the filler of every prompt.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.identifier import infer_identifier

LIVE_SUBJECT_CLASSES = frozenset({"cat", "dog"})

BUNDLED_PROMPTS_FILE = Path(__file__).with_name("dreambench_prompts_and_classes.txt")
"""DreamBench's ``prompts_and_classes.txt``, shipped with the package (CC BY 4.0, see DREAMBENCH_CREDITS.md)."""


@dataclass(frozen=True)
class DreamBenchPrompts:
    """The contents of a ``prompts_and_classes.txt``: subject -> class, and the two prompt templates lists.

    ``DreamBenchPrompts()`` is the bundled file's contents (``bundled_dreambench()``)."""

    classes: dict[str, str] = field(default_factory=lambda: dict(bundled_dreambench().classes))
    object_prompts: tuple[str, ...] = field(default_factory=lambda: bundled_dreambench().object_prompts)
    live_prompts: tuple[str, ...] = field(default_factory=lambda: bundled_dreambench().live_prompts)

    def templates_for(self, class_noun: str) -> tuple[str, ...]:
        return self.live_prompts if is_live_subject(class_noun) else self.object_prompts


def is_live_subject(class_noun: str) -> bool:
    """DreamBench's live subjects are the cats and dogs; everything else uses the object prompts."""
    return class_noun.strip().lower() in LIVE_SUBJECT_CLASSES


_PROMPT_LINE = re.compile(r"""^\s*(['"])(.*)\1\s*\.\s*format\(""")


def parse_prompts_and_classes(path: str | os.PathLike) -> DreamBenchPrompts:
    """Reads a DreamBench ``prompts_and_classes.txt`` (classes table, object and live-subject prompt lists)."""
    path = Path(path)
    if not path.is_file():
        raise InputDataError(f"{path} does not exist: point it at DreamBench's prompts_and_classes.txt.")
    classes: dict[str, str] = {}
    lists: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        lowered = line.lower()
        if lowered == "classes":
            section = "classes"
        elif lowered.startswith("object prompts"):
            section = "object"
        elif lowered.startswith("live subject prompts"):
            section = "live"
        elif section == "classes" and "," in line and lowered != "subject_name,class":
            subject, class_noun = (part.strip() for part in line.split(",", 1))
            classes[subject] = class_noun
        elif section in lists and (match := _PROMPT_LINE.match(line)):
            lists[section].append(match.group(2))
    if not classes or not lists["object"] or not lists["live"]:
        raise InputDataError(
            f"{path} is not a DreamBench prompts_and_classes.txt (needs the 'Classes' table and the 'Object Prompts' "
            "and 'Live Subject Prompts' lists): fix the file or leave prompts_file unset to use the bundled prompts."
        )
    return DreamBenchPrompts(classes, tuple(lists["object"]), tuple(lists["live"]))


@lru_cache(maxsize=1)
def bundled_dreambench() -> DreamBenchPrompts:
    """The bundled ``prompts_and_classes.txt``: DreamBench's 30 subject classes and its two prompt lists."""
    return parse_prompts_and_classes(BUNDLED_PROMPTS_FILE)


OBJECT_PROMPTS: tuple[str, ...] = bundled_dreambench().object_prompts
LIVE_PROMPTS: tuple[str, ...] = bundled_dreambench().live_prompts


def split_identifier_and_class(instance_prompt: str, class_prompt: str | None) -> tuple[str, str]:
    """Identifier and class noun from the two training prompts (``identifier.infer_identifier``), or a clear error."""
    identifier, class_noun = infer_identifier(instance_prompt, class_prompt)
    if identifier is None or class_noun is None:
        raise InputDataError(
            f"Cannot tell identifier and class noun apart in instance prompt {instance_prompt!r} and class prompt "
            f"{class_prompt!r}: set --data.evaluation.identifier and --data.evaluation.class_noun (e.g. sks, dog)."
        )
    return identifier, class_noun


def evenly_spaced(items: tuple[str, ...] | list[str], count: int | None) -> list[str]:
    """``count`` items spread over the list (first and last included), so a few prompts still cover both
    recontextualization and property changes; all of them for None or a count >= the length."""
    items = list(items)
    if count is None or count >= len(items):
        return items
    if count <= 1:
        return items[:max(count, 0)]
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]
