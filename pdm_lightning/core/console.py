"""What the commands print: third-party notices filtered at their source, our warnings as one plain line.

Every command used to open with the same notices, none of which a user can act on: transformers'
"``CLIPImageProcessor`` requires torchvision" (its PIL fallback is what we use), Lightning's
litlogger tip, torch's ``LeafSpec`` deprecation (inside Lightning), "Checkpoint directory ... exists
and is not empty" on every resume (a resume writes into the same folder on purpose) and Lightning's
"``weights_only`` was not set" at each checkpoint save. ``install`` filters each one by its logger and
its exact message, so a new notice from the same library still shows. Our own warnings print as
``warning: <message>`` instead of ``path/to/file.py:144: UserWarning: <message>``.

``--verbose`` (taken off the command line before the CLI parses it) or ``PDM_LIGHTNING_VERBOSE=1``
leaves everything as the libraries print it. The entry points call ``install`` before importing the
libraries: transformers prints its torchvision notices while diffusers imports. This module imports
only the standard library for that reason.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TextIO

VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "PDM_LIGHTNING_VERBOSE"  # inherited by the runner's train.py subprocesses

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # pdm_lightning/
# Our code: the package and the repository's scripts (train.py, predict.py) beside it.
OWN_SCRIPTS = ("train.py", "predict.py")

# logger name -> messages (regular expressions, matched at the start) filtered out of it.
QUIET_LOG_MESSAGES: dict[str, tuple[str, ...]] = {
    # The image processors fall back to their PIL versions, which is all we need.
    "transformers.utils.import_utils": (r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to",),
    # Lightning's rank_zero_info goes through whichever of these modules set the shared logger last.
    **{name: (r"💡 Tip: For seamless cloud logging and experiment tracking, try installing \[litlogger\]",)
       for name in ("lightning.fabric.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                    "lightning_utilities.core.rank_zero")},
    # Logged at every checkpoint save: we save full checkpoints on purpose (resume needs them).
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (r"`weights_only` was not set, defaulting to `False`\.",),
}

# (category, message regular expression) of the warnings filtered out.
QUIET_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch deprecated LeafSpec; Lightning's own pytree helper still builds one (nothing for a user to do).
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # A resumed run writes into its own checkpoint folder: that is the point of --ckpt_path last.
    (UserWarning, r"Checkpoint directory .* exists and is not empty\."),
)

_installed = False


def take_verbose_flag(args: list[str]) -> bool:
    """Removes ``--verbose`` from the arguments ``args`` (in place; LightningCLI would refuse it) and
    records it in ``PDM_LIGHTNING_VERBOSE`` for this process and its subprocesses (the runner's
    train.py). True when verbose either way."""
    if VERBOSE_FLAG in args:
        args[:] = [arg for arg in args if arg != VERBOSE_FLAG]
        os.environ[VERBOSE_ENV] = "1"
    return is_verbose()


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


class MessageFilter(logging.Filter):
    """Drops a logger's records whose message matches one of ``patterns``."""

    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = tuple(re.compile(pattern) for pattern in patterns)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(pattern.match(message) for pattern in self.patterns)


def quiet_third_party_notices() -> None:
    """The filters of ``QUIET_LOG_MESSAGES`` and ``QUIET_WARNINGS``, nothing broader.

    A logger's filter sees the records created on that logger; ``logging.getLogger`` returns the
    same object the library gets later, so no library needs to be imported here.
    """
    for name, patterns in QUIET_LOG_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, MessageFilter) and f.patterns == MessageFilter(patterns).patterns for f in logger.filters):
            logger.addFilter(MessageFilter(patterns))
    for category, message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def is_own_code(filename: str) -> bool:
    """True for a warning attributed to pdm_lightning (or to train.py / predict.py beside it)."""
    try:
        path = Path(filename).resolve()
    except (OSError, ValueError):
        return False
    return path.is_relative_to(PACKAGE_DIR) or (path.parent == PACKAGE_DIR.parent and path.name in OWN_SCRIPTS)


def format_own_warning(message: Warning | str) -> str:
    """``warning: <message>``: what the user needs is the message; its source line is for us."""
    return f"warning: {message}\n"


def plain_own_warnings() -> None:
    """Our warnings as one line; the others keep the format they had (Python's, or Lightning's).

    ``showwarning`` rather than ``formatwarning``: Lightning replaces ``formatwarning`` when it is
    imported, and its replacement takes any path containing "lightning" (pdm_lightning's too) for its own.
    """
    previous = warnings.showwarning
    if getattr(previous, "_pdm_lightning_plain", False):
        return

    def showwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    file: TextIO | None = None, line: str | None = None) -> None:
        if not is_own_code(filename):
            previous(message, category, filename, lineno, file, line)
            return
        stream = file if file is not None else sys.stderr
        if stream is None:  # pythonw: nowhere to write
            return
        try:
            stream.write(format_own_warning(message))
        except OSError:  # a closed pipe must not turn a warning into a crash
            pass

    showwarning._pdm_lightning_plain = True  # type: ignore[attr-defined]
    warnings.showwarning = showwarning


def install(argv: list[str] | None = None) -> bool:
    """Quiet console output for an entry point: call it before importing the libraries.

    ``argv`` (normally ``sys.argv``) loses its ``--verbose``; returns True when verbose, in which case
    nothing is filtered. Calling it again does nothing more.
    """
    global _installed
    verbose = is_verbose()
    if argv is not None:
        args = argv[1:]
        verbose = take_verbose_flag(args)
        argv[1:] = args
    if verbose or _installed:
        return verbose
    quiet_third_party_notices()
    plain_own_warnings()
    _installed = True
    return False

