"""The DreamBench evaluation as a callback.

``DreamBenchEvaluation`` turns ``train.py test`` / ``validate`` into the full protocol: the module's
``test_step`` generates the plan's images, ``evaluation.scoring`` embeds and scores them and writes
the reports, and this callback gathers the ranks' images, logs ``eval/*`` and puts the reports in
place. Its light version at checkpoint time is ``callbacks/quality_checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from pdm_lightning.callbacks.run_outputs import log_image, run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_data, dreambooth_module
from pdm_lightning.core.atomic import replace_directory
from pdm_lightning.evaluation.embedders import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from pdm_lightning.evaluation.report import METRIC_NAMES
from pdm_lightning.evaluation.scoring import (
    ScoredImage,
    SubjectScorer,
    evaluation_report,
    score_subject,
    write_reports,
)
from pdm_lightning.evaluation.settings import EvaluationPlan
from pdm_lightning.export.export_set import MANIFEST_NAME, ExportSetError, read_manifest
from pdm_lightning.generation.jobs import unpack_job_batch
from pdm_lightning.training.module import DreamBoothModule

# The data module gives fit no validation batches on purpose (the full evaluation is for validate/test).
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero", category=UserWarning)


class DreamBenchEvaluation(L.Callback):
    """Metrics and reports of ``train.py test`` / ``validate`` (``--evaluation.*``).

    Outputs under ``<run>/<dirname>/<stage>/``: ``metrics.json`` (metrics, per-prompt metrics,
    settings, what was left out and why), ``metrics.csv`` (one row per prompt plus ``all``),
    ``grids/NN_<prompt>.png`` (a prompt's images side by side; ``grids/class_prompt.png`` for PRES)
    and ``images/`` (every generated image, prompt and seed in its PNG metadata). TensorBoard gets
    ``eval/<metric>`` scalars and the grids, at the step the weights were trained to (``global_step``
    in metrics.json: the checkpoint's, an exported pipeline's from its manifest; else null, and
    TensorBoard step 0).

    Args:
        dino_model: DINO model id or folder (the protocol's: facebook/dino-vits16).
        clip_model: CLIP model id or folder (the protocol's: openai/clip-vit-base-patch32).
        lpips_net: LPIPS backbone; ``none`` leaves LPIPS out. Needs torchvision: without it LPIPS is
            left out with a message, never reported as 0.
        dirname: output folder under the run directory.
        embed_batch_size: images per embedding forward pass.
    """

    def __init__(
        self,
        dino_model: str = DEFAULT_DINO_MODEL,
        clip_model: str = DEFAULT_CLIP_MODEL,
        lpips_net: Literal["alex", "vgg", "squeeze", "none"] = "alex",
        dirname: str = "eval",
        embed_batch_size: int = 32,
    ) -> None:
        self.dino_model, self.clip_model, self.lpips_net = dino_model, clip_model, lpips_net
        self.dirname, self.embed_batch_size = dirname, embed_batch_size
        self.results: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._records: list[ScoredImage] = []
        self._plan: EvaluationPlan | None = None
        self._scorer: SubjectScorer | None = None
        self._out_dir: Path | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn in ("validate", "test") and not trainer.sanity_checking

    def output_dir(self, trainer: L.Trainer, stage: str) -> Path:
        return run_dir(trainer) / self.dirname / stage

    # -- hooks --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._start(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active(trainer):
            self._collect(outputs)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    # -- work ---------------------------------------------------------------------------------

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._reset()
        datamodule = dreambooth_data(trainer, "DreamBenchEvaluation")
        self._plan = datamodule.evaluation_plan()
        # Everything is written to a staging folder that replaces the previous results in one rename at
        # the end, so an interrupted evaluation never leaves a mix of old and new files.
        self._out_dir = self.output_dir(trainer, stage)
        self._staging = self._out_dir.with_name(f".{self._out_dir.name}.partial")
        if trainer.is_global_zero:
            if self._staging.exists():
                shutil.rmtree(self._staging)
            (self._staging / "images").mkdir(parents=True)
        trainer.strategy.barrier()
        self._scorer = SubjectScorer(datamodule.hparams.instance_data_dir, self.dino_model, self.clip_model,
                                     pl_module.device, self.embed_batch_size)
        self._progress = tqdm(total=len(self._plan.jobs), desc="Evaluating", unit="img", disable=trainer.global_rank != 0)

    def _collect(self, outputs: dict[str, Any]) -> None:
        jobs, settings = unpack_job_batch(outputs)
        self._records += self._scorer.embed_and_save(jobs, outputs["images"], settings, self._staging / "images")
        self._progress.update(len(jobs))

    def _gathered_records(self, trainer: L.Trainer) -> list[ScoredImage]:
        records = self._records
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[list[ScoredImage] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, records)
            records = [r for part in everyone for r in part]
        # Distributed samplers repeat a few jobs to even out the ranks: keep one of each.
        unique = {r.job.key: r for r in records}
        return [unique[k] for k in sorted(unique)]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._progress.close()
        module = dreambooth_module(pl_module, "DreamBenchEvaluation")
        datamodule = dreambooth_data(trainer, "DreamBenchEvaluation")
        scores = score_subject(self._scorer, self._gathered_records(trainer), self._plan.prompts, self.lpips_net, module.device)
        if "lpips_i" in scores.left_out:
            rank_zero_warn(scores.left_out["lpips_i"])
        step = trained_step(trainer, module)
        metrics = {f"eval/{name}": value for name, value in scores.metrics.items()}
        # logger=False: the scalars go to the loggers below at the trained step (Lightning's would be 0 in
        # validate/test); self.log keeps them in callback_metrics and the printed results.
        module.log_dict(metrics, rank_zero_only=False, sync_dist=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step or 0)
        self.results = evaluation_report(
            scores, self._plan, datamodule.hparams.instance_data_dir, len(self._scorer.real_paths),
            model={"pretrained_model_name_or_path": str(module.hparams.pretrained_model_name_or_path),
                   "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None, "global_step": step},
            embedders={"dino": self.dino_model, "clip": self.clip_model, "lpips": self.lpips_net},
            # The options as set (height and width only mirror resolution).
            settings={k: v for k, v in dataclasses.asdict(datamodule.evaluation).items()
                      if k in {f.name for f in dataclasses.fields(datamodule.evaluation) if f.init}},
        )
        if trainer.is_global_zero:
            for name, grid in write_reports(self._staging, self.results, scores, self._plan.prompts):
                log_image(trainer, f"eval/{name}", grid, step or 0)
            replace_directory(self._staging, self._out_dir)
        rank_zero_info("Evaluation: " + ", ".join(f"{METRIC_NAMES[k]} {v:.4f}" for k, v in scores.metrics.items())
                       + f" -> {self._out_dir}")


def trained_step(trainer: L.Trainer, module: DreamBoothModule) -> int | None:
    """The optimizer step the evaluated weights were trained to; None when unknown.

    In validate/test a fresh Trainer's ``global_step`` is 0 whatever the weights: the step comes from
    the checkpoint given with ``--ckpt_path``, from this Trainer when it has just trained them, from a
    checkpoint the module was loaded from by hand, or from an exported pipeline's manifest.
    """
    loaded = module.trained_steps
    if trainer.ckpt_path and loaded is not None:
        return loaded
    if trainer.global_step > 0:
        return trainer.global_step
    if loaded is not None:
        return loaded
    return exported_step(str(module.hparams.pretrained_model_name_or_path))


def exported_step(base_model: str) -> int | None:
    """The step of an exported pipeline (``<run>/export/pipeline``) from its set's ``manifest.json``.

    The manifest sits in the set's folder, the pipeline's parent; it counts only when it lists the
    pipeline's files (a base model next to some other export is not that export). None otherwise.
    """
    folder = Path(base_model).expanduser()
    set_folder = folder.parent
    if not (folder.is_dir() and (set_folder / MANIFEST_NAME).is_file()):
        return None
    try:
        manifest = read_manifest(set_folder)
    except ExportSetError:
        return None  # informative only: a damaged manifest does not stop an evaluation
    if not any(name.startswith(f"{folder.name}/") for name in manifest.files):
        return None
    return manifest.step
