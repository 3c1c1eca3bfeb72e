"""Train and evaluate every subject of a DreamBench-style folder, then tabulate the metrics.

    python -m pdm_lightning.runner --dreambench examples --subjects dog backpack \
        --config configs/sd15/base.yaml --config configs/sd15/dreambooth.yaml --out runs/dreambench [-- --trainer.max_steps 400 ...]

``examples`` holds two bundled DreamBench subjects (5 photos each, see examples/CREDITS.md); for the
full benchmark pass the dataset (30 subject folders + ``prompts_and_classes.txt``) as
``--dreambench path/to/dreambench/dataset`` and leave out ``--subjects`` to run them all.

For each subject folder (its class read from the folder's ``prompts_and_classes.txt``, or from the
copy bundled with the package when the folder has none) it runs ``train.py fit``
and then ``train.py test`` (the DreamBench evaluation) with the given config plus per-subject
settings: instance photos, prompts "a photo of <identifier> <class>" / "a photo of <class>", one
class-image folder per class (shared by subjects of the same class), one run folder per subject.
A subject is finished when ``<out>/<subject>/DONE.json`` exists; finished subjects are skipped on a
re-run, and an interrupted one resumes its training from its ``last.ckpt``. After each subject the
table ``<out>/results.{csv,md,png}`` (subject x metric, plus the mean) is rewritten.
"""

from __future__ import annotations

import sys

from pdm_lightning.core import console

if __name__ == "__main__":  # quiet third-party notices before the heavy imports below print them
    console.install(sys.argv)

import argparse  # noqa: E402
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pdm_lightning.callbacks.quality_checkpoint import best_scored_checkpoint
from pdm_lightning.core.atomic import write_bytes_atomically
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.evaluation.prompts import (
    BUNDLED_PROMPTS_FILE,
    parse_prompts_and_classes,
)
from pdm_lightning.evaluation.report import write_subject_table
from pdm_lightning.generation.files import slugify

PROMPTS_FILE = "prompts_and_classes.txt"
DONE_MARKER = "DONE.json"
METRICS_FILE = Path("eval") / "test" / "metrics.json"

Command = Callable[[list[str]], None]
"""Runs one train.py command line (subcommand first)."""


@dataclass(frozen=True)
class Subject:
    name: str
    class_noun: str
    folder: Path


def find_subjects(dreambench: Path, selected: Sequence[str] | None = None) -> tuple[list[Subject], Path]:
    """The subjects of a DreamBench-style folder (all of them in name order, or ``selected`` in that order).

    Classes come from the folder's ``prompts_and_classes.txt``, or the bundled DreamBench copy when it has none;
    only folders named in that classes table are subjects (``examples/dog_masks`` is not)."""
    if not dreambench.is_dir():
        raise InputDataError(f"{dreambench} is not a folder: point --dreambench at the subject folders (e.g. examples).")
    prompts_file = dreambench / PROMPTS_FILE
    if not prompts_file.is_file():
        prompts_file = BUNDLED_PROMPTS_FILE
    classes = parse_prompts_and_classes(prompts_file).classes
    names = list(selected) if selected else sorted(n for n in classes if (dreambench / n).is_dir())
    if not names:
        raise InputDataError(f"No folder of {dreambench} is a subject of the classes table of {prompts_file}: fix --dreambench.")
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise InputDataError(f"{', '.join(unknown)} not in the classes table of {prompts_file}: add a 'subject,class' line or fix --subjects.")
    missing = [n for n in names if not (dreambench / n).is_dir()]
    if missing:
        raise InputDataError(f"No subject folder {dreambench / missing[0]}: fix --subjects or --dreambench.")
    return [Subject(n, classes[n], dreambench / n) for n in names], prompts_file


def subject_arguments(
    subject: Subject, config: str | Sequence[str] | None, out: Path, identifier: str, prompts_file: Path, extra: Sequence[str]
) -> list[str]:
    """The CLI arguments (without subcommand) shared by the subject's fit and test; ``config``: one or several, in order."""
    configs = [config] if isinstance(config, str) else list(config or ())
    return [
        *(arg for path in configs for arg in ("--config", str(path))),
        "--data.instance_data_dir", str(subject.folder),
        "--data.instance_prompt", f"a photo of {identifier} {subject.class_noun}",
        "--data.class_prompt", f"a photo of {subject.class_noun}",
        "--data.class_data_dir", str(out / "class_images" / slugify(subject.class_noun)),
        "--data.evaluation.prompts_file", str(prompts_file),
        # name and version empty: the run folder is exactly save_dir, where the runner looks for its outputs.
        "--trainer.logger.init_args.save_dir", str(out / subject.name),
        "--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", "",
        *extra,
    ]


def checkpoint_to_test(run_dir: Path, which: str) -> Path:
    """``last.ckpt``, or for ``best`` the QualityCheckpoint's highest-scoring one (last.ckpt when there is none)."""
    checkpoints = run_dir / "checkpoints"
    if which == "best":
        best = best_scored_checkpoint(checkpoints)
        if best is not None:
            return best
    last = checkpoints / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(f"{last} is missing after fit: check the run's log (checkpoint settings).")
    return last


def subprocess_command(args: list[str]) -> None:
    """Each command in its own process: GPU memory is released between subjects and DDP launches normally."""
    completed = subprocess.run([sys.executable, "-m", "pdm_lightning.cli", *args])
    if completed.returncode != 0:
        raise RuntimeError(f"`train.py {args[0]}` failed with exit code {completed.returncode}: see its output above.")


def in_process_command(args: list[str]) -> None:
    """Runs the command in this process (faster start; single device only)."""
    from pdm_lightning.cli import cli_main

    cli_main(args)


def run_subject(subject: Subject, args: list[str], run_dir: Path, checkpoint: str, command: Command) -> dict[str, float]:
    """fit (resuming from last.ckpt if an earlier attempt stopped) then test; returns the metrics."""
    command(["fit", *args, "--ckpt_path", "last"])
    ckpt = checkpoint_to_test(run_dir, checkpoint)
    # Class images are needed for training only: the evaluation skips checking them.
    command(["test", *args, "--data.with_prior_preservation", "false", "--ckpt_path", str(ckpt)])
    report = json.loads((run_dir / METRICS_FILE).read_text())
    return report["metrics"]


def run_benchmark(
    dreambench: Path,
    out: Path,
    config: str | Sequence[str] | None = None,
    subjects: Sequence[str] | None = None,
    identifier: str = "sks",
    checkpoint: str = "last",
    extra: Sequence[str] = (),
    command: Command = subprocess_command,
) -> dict[str, dict[str, float]]:
    """Trains and evaluates each subject not finished yet; returns subject -> metrics and writes the table."""
    found, prompts_file = find_subjects(Path(dreambench), subjects)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    for index, subject in enumerate(found, start=1):
        run_dir = out / subject.name
        marker = run_dir / DONE_MARKER
        if marker.is_file():
            print(f"[{index}/{len(found)}] {subject.name}: finished earlier, skipped")
            results[subject.name] = json.loads(marker.read_text())["metrics"]
            continue
        print(f"[{index}/{len(found)}] {subject.name} ({subject.class_noun})")
        args = subject_arguments(subject, config, out, identifier, prompts_file, extra)
        metrics = run_subject(subject, args, run_dir, checkpoint, command)
        results[subject.name] = metrics
        marker_text = json.dumps({"subject": subject.name, "class": subject.class_noun, "metrics": metrics}, indent=2)
        write_bytes_atomically(marker, marker_text.encode())
        write_subject_table(out, results)
    if results:
        write_subject_table(out, results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dreambench", required=True, type=Path, help="folder of subject folders (+ prompts_and_classes.txt; default: the bundled DreamBench one), e.g. examples")
    parser.add_argument("--config", action="append", help="train.py config used for every subject; repeat it to compose "
                        "(e.g. --config configs/sd15/base.yaml --config configs/sd15/dreambooth.yaml)")
    parser.add_argument("--out", required=True, type=Path, help="one run folder per subject, the class images and the table")
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: all of the classes table)")
    parser.add_argument("--identifier", default="sks", help="rare token bound to each subject (default: sks)")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last",
                        help="checkpoint to evaluate: last.ckpt, or the QualityCheckpoint's best (needs --quality_checkpoint.every_n_train_steps)")
    parser.add_argument("--in_process", action="store_true", help="run fit/test in this process (single device; default: a subprocess each)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="after --: extra train.py options for every subject")
    args = parser.parse_args(argv)
    extra = args.overrides[1:] if args.overrides[:1] == ["--"] else args.overrides
    try:
        results = run_benchmark(args.dreambench, args.out, args.config, args.subjects, args.identifier, args.checkpoint,
                                extra, in_process_command if args.in_process else subprocess_command)
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{len(results)} subjects -> {args.out / 'results.md'}")


if __name__ == "__main__":
    main()
