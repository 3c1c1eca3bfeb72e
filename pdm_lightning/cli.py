"""The LightningCLI entry point: ``python train.py fit --config configs/quickstart.yaml``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from pdm_lightning.callbacks.checkpoint import StepCheckpoint
from pdm_lightning.callbacks.export import ExportWeights
from pdm_lightning.callbacks.mask_preview import MaskPreview
from pdm_lightning.callbacks.evaluation import DreamBenchEvaluation
from pdm_lightning.callbacks.predictions import PredictionWriter
from pdm_lightning.callbacks.quality_checkpoint import QualityCheckpoint
from pdm_lightning.callbacks.samples import SampleImages
from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.training.module import DreamBoothModule

# The run directory is the logger's folder (name and version empty), so checkpoints/, the
# TensorBoard events and export/ sit at one stable path and `--ckpt_path last` finds last.ckpt there.
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs/pdm_lightning", "name": "", "version": ""},
    },
    "log_every_n_steps": 1,
    "max_steps": 700,
}

# The frozen VAE (and text encoder) stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class SaveFitConfig(SaveConfigCallback):
    """Writes ``config.yaml`` for ``fit`` only: it is the run's training config, which ``predict``,
    ``test`` and ``--ckpt_path last`` resumes read back (their own options would make it unreadable to fit)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def model_source(pretrained_model_name_or_path: str, revision: str | None, variant: str | None) -> dict[str, str | None]:
    """The model's three base-model options as the data module's ``base_model`` record."""
    return {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision, "variant": variant}


class PDMLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The base model is named once, on the model; the data module needs it for the tokenizer, the
        # class images and the bank. The PDM settings too: the data module builds the matching chunk.
        parser.link_arguments(
            ("model.pretrained_model_name_or_path", "model.revision", "model.variant"), "data.base_model", compute_fn=model_source
        )
        parser.link_arguments("model.pdm", "data.pdm")
        # The mask switches are set with the masks (the data module prepares only the masks they need).
        for key in ("mask_instance_loss", "mask_prior_loss", "mask_pdm_loss"):
            parser.link_arguments(f"data.masks.{key}", f"model.{key}")
        parser.link_arguments("data.masks.mode", "model.mask_mode")
        parser.add_lightning_class_args(StepCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.filename": "{step:06d}",
                "checkpoint.every_n_train_steps": 100,
                "checkpoint.save_last": True,
                # Keep the most recent N step checkpoints ("step" is always a monitor candidate).
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 3,
            }
        )
        parser.add_lightning_class_args(ExportWeights, "export")
        parser.add_lightning_class_args(DreamBenchEvaluation, "evaluation")
        parser.add_lightning_class_args(QualityCheckpoint, "quality_checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(MaskPreview, "mask_preview")
        parser.add_lightning_class_args(SampleImages, "samples")
        parser.add_lightning_class_args(PredictionWriter, "prediction_writer")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})


def with_commented_print_config(args: list[str]) -> list[str]:
    """A bare ``--print_config`` prints each option's help above it (jsonargparse's ``comments`` flag)."""
    return ["--print_config=comments" if arg == "--print_config" else arg for arg in args]


def cli_main(args: list[str] | None = None, run: bool = True) -> PDMLightningCLI:
    if args is not None:  # None: LightningCLI reads sys.argv (rewritten by main)
        args = with_commented_print_config(list(args))
    return PDMLightningCLI(
        DreamBoothModule,
        DreamBoothDataModule,
        seed_everything_default=0,
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_callback=SaveFitConfig,
        # A typo such as --model.learning_rat must be an error, not an abbreviation silently taken.
        parser_kwargs={"allow_abbrev": False},
        # Re-running the same command to resume rewrites config.yaml instead of refusing to start.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


@contextmanager
def report_input_errors() -> Iterator[None]:
    """Input problems as one clear line (and exit status 2) instead of a traceback."""
    try:
        yield
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    """``train.py``: the CLI."""
    sys.argv[1:] = with_commented_print_config(sys.argv[1:])
    with report_input_errors():
        cli_main()


if __name__ == "__main__":  # `python -m pdm_lightning.cli` = train.py (used by pdm_lightning.runner)
    main()
