"""The LightningCLI entry point: ``python train.py fit --config configs/quickstart.yaml``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pdm_lightning.core import console  # the standard library only: it quiets the libraries imported below

if __name__ == "__main__":  # `python -m pdm_lightning.cli` (the runner's subprocesses): before those imports
    console.install(sys.argv)

import lightning as L  # this import and the ones below: after console.install
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from pdm_lightning.callbacks.checkpoint import StepCheckpoint
from pdm_lightning.callbacks.export import ExportWeights
from pdm_lightning.callbacks.mask_preview import MaskPreview
from pdm_lightning.callbacks.evaluation import DreamBenchEvaluation
from pdm_lightning.callbacks.predictions import PredictionWriter
from pdm_lightning.callbacks.progress import StepProgressBar, with_step_progress_bar
from pdm_lightning.callbacks.quality_checkpoint import QualityCheckpoint
from pdm_lightning.callbacks.samples import SampleImages
from pdm_lightning.cli_parser import PDMArgumentParser
from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.training.checkpoint_io import AtomicCheckpointIO, CheckpointWriteError
from pdm_lightning.training.module import DreamBoothModule
from pdm_lightning.training.resume import check_explicit_checkpoint, choose_resume_checkpoint, damage_note
from pdm_lightning.export.export_set import ExportSetError
from pdm_lightning.export.verify import ExportVerificationError, NonFiniteExportError
from pdm_lightning.training.nonfinite import NonFiniteTrainingError

# The run directory is the logger's folder (name and version empty), so checkpoints/, the
# TensorBoard events and export/ sit at one stable path and `--ckpt_path last` finds last.ckpt there.
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs/pdm_lightning", "name": "", "version": "", "default_hp_metric": False},
    },
    "log_every_n_steps": 1,
    "max_steps": 700,
    # Lightning's table (with "FLOPs 0": nothing gives it an example input) becomes ParameterCounts' one
    # line; --verbose or --trainer.enable_model_summary true brings the table back.
    "enable_model_summary": False,
}

# Values of --ckpt_path that Lightning resolves itself ("last" is checked in PDMLightningCLI.resolve_last_checkpoint).
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
REMOTE_CKPT_PREFIXES = ("registry:",)  # Lightning's model-registry paths (fetched, then loaded by AtomicCheckpointIO)

# The frozen VAE (and text encoder) stay in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)


class ParameterCounts(L.Callback):
    """One line at the start of fit: what trains and what stays frozen (a LoRA run: the adapters alone).

    Replaces Lightning's model-summary table: its three rows (text encoder, VAE, UNet) say less than
    this line, and its FLOPs column reads 0 for a model that has no example input.
    """

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            rank_zero_info(parameter_counts(pl_module))


def parameter_counts(module: L.LightningModule) -> str:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return f"Parameters: {get_human_readable_count(trainable)} trained, {get_human_readable_count(frozen)} frozen."


def trainer_defaults(verbose: bool) -> dict[str, Any]:
    """``TRAINER_DEFAULTS`` and ParameterCounts (a new instance per CLI); with --verbose, Lightning's table."""
    if verbose:
        return {**TRAINER_DEFAULTS, "enable_model_summary": True}
    return {**TRAINER_DEFAULTS, "callbacks": [ParameterCounts()]}


class SaveFitConfig(SaveConfigCallback):
    """Writes ``config.yaml`` for ``fit`` only: it is the run's training config, which ``predict``,
    ``test`` and ``--ckpt_path last`` resumes read back (their own options would make it unreadable to fit)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            super().setup(trainer, pl_module, stage)


def model_source(
    pretrained_model_name_or_path: str, revision: str | None, variant: str | None, vae_name_or_path: str | None = None
) -> dict[str, str | None]:
    """The model's base-model options as the data module's ``base_model`` record."""
    return {"pretrained_model_name_or_path": pretrained_model_name_or_path, "revision": revision, "variant": variant,
            "vae_name_or_path": vae_name_or_path}


class PDMLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        if isinstance(parser, PDMArgumentParser):  # --help: our options first; --help-all: LightningCLI's
            parser.use_short_help()
        # The base model is named once, on the model; the data module needs it for the tokenizer, the
        # class images and the bank. The PDM settings too: the data module builds the matching chunk.
        parser.link_arguments(
            ("model.pretrained_model_name_or_path", "model.revision", "model.variant", "model.vae_name_or_path"),
            "data.base_model",
            compute_fn=model_source,
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
        # Not add_lightning_class_args: that would put the bar in the callbacks always, and Lightning refuses a
        # ProgressBar callback with --trainer.enable_progress_bar false. instantiate_trainer adds it.
        parser.add_class_arguments(StepProgressBar, "progress", fail_untyped=False, instantiate=True, sub_configs=True)
        parser.set_defaults({"lr_monitor.logging_interval": "step"})

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        # LightningCLI reads an explicit --ckpt_path's hyper-parameters right after parsing: a damaged
        # file must be named in one line now, not in a torch zip traceback.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and not str(ckpt_path).startswith(REMOTE_CKPT_PREFIXES) \
                and "://" not in str(ckpt_path):
            check_explicit_checkpoint(Path(ckpt_path).expanduser())

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """The trainer, writing checkpoints through ``AtomicCheckpointIO`` unless a CheckpointIO was given."""
        trainer_config = self.config_init.get(str(self.subcommand), self.config_init).get("trainer") or {}
        # The step progress display replaces Lightning's epoch bar, unless the bar is off or one is given.
        subcommand_config = self.config_init.get(str(self.subcommand), self.config_init)
        kwargs["callbacks"] = with_step_progress_bar(
            kwargs.get("callbacks", trainer_config.get("callbacks")),
            kwargs.get("enable_progress_bar", trainer_config.get("enable_progress_bar")),
            subcommand_config.get("progress"),
        )
        plugins = kwargs.get("plugins", trainer_config.get("plugins"))
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        strategy = kwargs.get("strategy", trainer_config.get("strategy"))
        # A strategy object may carry its own CheckpointIO (Lightning refuses one there and one in plugins).
        own_io = isinstance(strategy, Strategy) and getattr(strategy, "_checkpoint_io", None) is not None
        if not own_io and not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            # A plug-in, not a strategy setting: every strategy (DDP included) takes it as its checkpoint_io.
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        return super().instantiate_trainer(**kwargs)

    def resolve_last_checkpoint(self) -> None:
        """``--ckpt_path last``: the newest intact checkpoint of the run, chosen before Lightning reads it.

        Each damaged file is named in one line; those cut short by an interrupted write (nothing can read
        them) are removed, so that the re-run step is saved under its own name again. A fallback to an
        earlier step is said in one line. A run with no checkpoint yet starts from scratch, saying so in
        one line (Lightning's warning would suggest ``save_last=True``, which is always on here).
        """
        config = self.config_init[self.subcommand]
        callback = next((cb for cb in self.trainer.checkpoint_callbacks if isinstance(cb, StepCheckpoint)), None)
        if config.get("ckpt_path") != "last" or callback is None:
            return
        folder = callback.checkpoint_folder(self.trainer)
        choice = choose_resume_checkpoint(folder)
        for check in choice.damaged:
            remove = check.damage.interrupted
            if remove and rank_zero_only.rank == 0:  # in DDP every rank chooses, rank 0 alone removes
                check.path.unlink(missing_ok=True)
            rank_zero_info(damage_note(check, removed=remove))
        if choice.note:
            rank_zero_info(choice.note)
        if choice.path is not None:
            config["ckpt_path"] = str(choice.path)
        else:
            # Lightning would warn "no last checkpoint ... HINT: set save_last=True": we always save last.
            config["ckpt_path"] = None
            start = "starting from scratch" if self.subcommand == "fit" else "using the base model's weights"
            rank_zero_info(f"No checkpoint in {folder} yet: {start}.")

    def before_fit(self) -> None:
        self.resolve_last_checkpoint()

    def before_validate(self) -> None:
        self.resolve_last_checkpoint()

    def before_test(self) -> None:
        self.resolve_last_checkpoint()

    def before_predict(self) -> None:
        self.resolve_last_checkpoint()


# What train.py and each subcommand's --help say first (LightningCLI's are the Trainer methods' docstrings).
DESCRIPTION = ("PDMBooth / DreamBooth fine-tuning of Stable Diffusion. `train.py fit --help` lists the options; "
               "`train.py fit ... --verbose` shows the libraries' notices too.")
SUBCOMMAND_DESCRIPTIONS = {
    "fit": "Trains a run, or resumes it with --ckpt_path last; checkpoints, samples and exports go to its folder.",
    "validate": "Evaluates weights (--ckpt_path, or the base model) with the DreamBench metrics (docs/evaluation.md).",
    "test": "Evaluates weights (--ckpt_path, or the base model) with the DreamBench metrics (docs/evaluation.md).",
    "predict": "Generates the --data.predict prompts' images into <run>/predictions.",
}


def parser_kwargs(prog: str | None = None, description: str | None = None) -> dict[str, Any]:
    """The main parser's and each subcommand's (LightningCLI gives a subcommand only its own entry):
    a truncated option such as --model.learning_rat is an error with "did you mean", never taken as an
    abbreviation."""
    subcommands = {name: {"allow_abbrev": False, "description": text} for name, text in SUBCOMMAND_DESCRIPTIONS.items()}
    return {"allow_abbrev": False, "description": description or DESCRIPTION, **({"prog": prog} if prog else {}),
            **subcommands}


def with_commented_print_config(args: list[str]) -> list[str]:
    """A bare ``--print_config`` prints each option's help above it (jsonargparse's ``comments`` flag)."""
    return ["--print_config=comments" if arg == "--print_config" else arg for arg in args]


def cli_main(args: list[str] | None = None, run: bool = True, prog: str | None = None,
             description: str | None = None) -> PDMLightningCLI:
    """train.py's LightningCLI; ``prog`` and ``description`` are another command's (``python -m
    pdm_lightning.prepare``) in its help and errors."""
    if args is not None:  # None: LightningCLI reads sys.argv (rewritten by main)
        args = with_commented_print_config(list(args))
    return PDMLightningCLI(
        DreamBoothModule,
        DreamBoothDataModule,
        seed_everything_default=0,
        trainer_defaults=trainer_defaults(console.is_verbose()),
        save_config_callback=SaveFitConfig,
        parser_class=PDMArgumentParser,  # --help: our options first; errors in one line, with "did you mean"
        parser_kwargs=parser_kwargs(prog, description),
        # The module's configure_optimizers builds its optimizer (--model.optimizer.*); LightningCLI's
        # --optimizer / --lr_scheduler would replace it with one over no parameters.
        auto_configure_optimizers=False,
        # Re-running the same command to resume rewrites config.yaml instead of refusing to start.
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


@contextmanager
def report_input_errors() -> Iterator[None]:
    """Input problems as one clear line (and exit status 2) instead of a traceback; a failed checkpoint
    write (a full disk), a diverged run or a refused export as one line too, with exit status 1."""
    try:
        yield
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except CheckpointWriteError as error:
        print(f"error: {error.strerror}", file=sys.stderr)
        sys.exit(1)
    except (NonFiniteTrainingError, NonFiniteExportError, ExportVerificationError, ExportSetError) as error:
        # The run stopped on purpose, with the reason and the last good checkpoint in the message.
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    """``train.py``: the CLI."""
    console.install(sys.argv)  # train.py did it before its imports; this takes --verbose off for other callers
    sys.argv[1:] = with_commented_print_config(sys.argv[1:])
    with report_input_errors():
        cli_main()


if __name__ == "__main__":  # `python -m pdm_lightning.cli` = train.py (used by pdm_lightning.runner)
    main()
