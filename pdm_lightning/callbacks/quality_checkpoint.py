"""Keeping the best checkpoints by quality: a light DreamBench evaluation (DINO-I, CLIP-T) every N steps."""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from pdm_lightning.callbacks.run_outputs import run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_data, dreambooth_module
from pdm_lightning.evaluation.embedders import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL
from pdm_lightning.evaluation.report import write_json_report
from pdm_lightning.evaluation.scoring import SubjectScorer
from pdm_lightning.generation.sampling import generate_from_module

CHECKPOINT_DIRNAME = "checkpoints"  # beside the step checkpoints
SCORE_NAMES = ("dino_i", "clip_t", "score")


class QualityCheckpoint(L.Callback):
    """Every ``every_n_train_steps`` a light evaluation, and the best ``save_top_k`` checkpoints by its score.

    The light evaluation generates ``num_images_per_prompt`` images for ``num_prompts`` prompts
    (spread over the evaluation prompt list of ``--data.evaluation``, same seeds at every step),
    computes DINO-I and CLIP-T, and logs ``eval/dino_i``, ``eval/clip_t`` and
    ``eval/score = dino_weight * DINO-I + clip_t_weight * CLIP-T`` to TensorBoard. Checkpoints go to
    ``<run>/checkpoints/best-step=NNNNNN.ckpt``, each with its scores beside it in
    ``best-step=NNNNNN.json`` (:func:`best_scored_checkpoint` picks the best by them). Overfitting shows as
    CLIP-T falling while DINO-I rises. Training continues exactly as without it: generation runs in eval
    mode without gradients, on a forked random state, and restores the modules' train mode.

    Args:
        every_n_train_steps: evaluation cadence; None (the default) turns the callback off.
        num_prompts: prompts of the light evaluation, spread over the evaluation prompt list.
        num_images_per_prompt: images per prompt (seeds as in the full evaluation).
        num_inference_steps: sampler steps (guidance and sampler from ``--data.evaluation``).
        dino_weight: weight of DINO-I in the score.
        clip_t_weight: weight of CLIP-T in the score.
        dino_model: DINO model id or folder.
        clip_model: CLIP model id or folder.
        save_top_k: how many best checkpoints to keep (-1: all, 0: none, only the scores are logged).
        filename: checkpoint name pattern; ``{step}``, ``{epoch}``, ``{score}``, ``{dino_i}``, ``{clip_t}``
            (with a format, e.g. ``{step:06d}``) become ``name=value``.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        num_prompts: int = 4,
        num_images_per_prompt: int = 2,
        # A light evaluation, run again and again during fit: half the DreamBench protocol's 50 steps.
        num_inference_steps: int = 25,
        dino_weight: float = 1.0,
        clip_t_weight: float = 1.0,
        dino_model: str = DEFAULT_DINO_MODEL,
        clip_model: str = DEFAULT_CLIP_MODEL,
        save_top_k: int = 1,
        filename: str = "best-{step:06d}",
    ) -> None:
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"quality_checkpoint.every_n_train_steps must be >= 0 or null, got {every_n_train_steps}.")
        if save_top_k < -1:
            raise ValueError(f"quality_checkpoint.save_top_k must be >= -1 (-1 keeps all), got {save_top_k}.")
        checkpoint_name(filename, {"step": 0, "epoch": 0, **dict.fromkeys(SCORE_NAMES, 0.0)})  # a bad pattern fails now
        self.every_n_train_steps = every_n_train_steps
        self.enabled = bool(every_n_train_steps)
        self.num_prompts, self.num_images_per_prompt, self.num_inference_steps = num_prompts, num_images_per_prompt, num_inference_steps
        self.dino_weight, self.clip_t_weight = dino_weight, clip_t_weight
        self.dino_model, self.clip_model = dino_model, clip_model
        self.save_top_k, self.filename = save_top_k, filename
        self.dirpath: Path | None = None
        self.best_k_models: dict[str, float] = {}  # checkpoint path -> score
        self._scorer: SubjectScorer | None = None
        self._last_evaluated_step = -1

    @property
    def best_model_path(self) -> str:
        """The kept checkpoint with the highest score ("" before the first)."""
        return max(self.best_k_models, key=self.best_k_models.get) if self.best_k_models else ""

    @property
    def best_model_score(self) -> torch.Tensor | None:
        """Its score, as a tensor (as Lightning's checkpoint callbacks report it)."""
        return torch.tensor(self.best_k_models[self.best_model_path]) if self.best_k_models else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.dirpath = run_dir(trainer) / CHECKPOINT_DIRNAME  # every rank: a collective

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": str(self.dirpath) if self.dirpath else None, "best_k_models": dict(self.best_k_models)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Resumed in another folder, the kept files are not this run's to remove.
        if state_dict.get("dirpath") == (str(self.dirpath) if self.dirpath else None):
            self.best_k_models = dict(state_dict.get("best_k_models", {}))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # step > 0: with gradient accumulation the first micro-batches end at step 0 (untrained weights);
        # once per step: the hook runs for every micro-batch of an accumulated step.
        if not self.enabled or step == 0 or step % self.every_n_train_steps or step == self._last_evaluated_step:
            return
        if trainer.sanity_checking or trainer.fast_dev_run:
            return
        self._last_evaluated_step = step
        scores = self.evaluate(trainer, pl_module)
        metrics = {f"eval/{k}": v for k, v in scores.items()}
        # logger=False: the scalars go to the loggers below at this exact step; self.log makes them callback metrics.
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self._keep_if_among_best(trainer, scores)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """DINO-I, CLIP-T and the score of the module as it is now; training state is left untouched."""
        module = dreambooth_module(pl_module, "QualityCheckpoint")
        datamodule = dreambooth_data(trainer, "QualityCheckpoint")
        plan = datamodule.evaluation_plan(
            max_prompts=self.num_prompts, num_images_per_prompt=self.num_images_per_prompt,
            num_inference_steps=self.num_inference_steps, pres_num_images=0,
        )
        images = generate_from_module(module, plan.jobs, plan.generation, datamodule.evaluation.batch_size,
                                      trainer.precision_plugin.forward_context, held=(module.query_capture,))
        if self._scorer is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._scorer = SubjectScorer(datamodule.hparams.instance_data_dir, self.dino_model, self.clip_model, module.device)
        return self._scorer.quality_scores(images, plan.jobs, plan.prompts, self.dino_weight, self.clip_t_weight)

    def _keep_if_among_best(self, trainer: L.Trainer, scores: dict[str, float]) -> None:
        """Saves the checkpoint when its score is among the best ``save_top_k``, removing the one it displaces."""
        if self.save_top_k == 0:
            return
        score = scores["score"]
        score = float("-inf") if math.isnan(score) else score  # a NaN score is never among the best
        worst = min(self.best_k_models, key=self.best_k_models.get) if self.best_k_models else None
        full = self.save_top_k != -1 and len(self.best_k_models) >= self.save_top_k
        # Every rank must agree, or some would wait forever in save_checkpoint.
        if full and not trainer.strategy.reduce_boolean_decision(score > self.best_k_models[worst]):
            return
        values = {"step": trainer.global_step, "epoch": trainer.current_epoch, **scores}
        path = str(self.dirpath / f"{checkpoint_name(self.filename, values)}.ckpt")
        displaced = worst if full else None
        if displaced is not None:
            self.best_k_models.pop(displaced)
        self.best_k_models[path] = score  # before saving: the checkpoint holds this callback's state
        trainer.save_checkpoint(path)  # every rank (a collective); rank 0 writes
        if trainer.is_global_zero:
            # The file names order checkpoints by step, not by score; the score file says which is best
            # (also across a resume, where the restored top-k may not know every file on disk).
            write_json_report(score_file(path), {"checkpoint": Path(path).name, "step": trainer.global_step, **scores})
        # Never the file this run resumed from (Lightning's rule too), nor the one just written under the same name.
        resumed_from = Path(trainer.ckpt_path).absolute() if trainer.ckpt_path else None
        if displaced is not None and displaced != path and Path(displaced).absolute() != resumed_from:
            trainer.strategy.remove_checkpoint(displaced)
            if trainer.is_global_zero:
                score_file(displaced).unlink(missing_ok=True)


def checkpoint_name(pattern: str, values: dict[str, float | int]) -> str:
    """``best-{step:06d}`` -> ``best-step=000002``: each field as ``name=value`` (Lightning's checkpoint naming)."""

    def field(match: re.Match[str]) -> str:
        name, spec = match.group(1), match.group(2) or ""
        if name not in values:
            raise ValueError(f"quality_checkpoint.filename {pattern!r} uses {{{name}}}: use {', '.join(values)}.")
        return f"{name}={format(values[name], spec)}"

    return re.sub(r"\{([^{}:]+)(?::([^{}]*))?\}", field, pattern)


def score_file(checkpoint: str | Path) -> Path:
    """The JSON beside a QualityCheckpoint checkpoint that holds its step and scores."""
    return Path(checkpoint).with_suffix(".json")


def best_scored_checkpoint(checkpoints: Path) -> Path | None:
    """The ``best-*.ckpt`` in ``checkpoints`` with the highest ``eval/score`` (None when there is none)."""
    scored = [(json.loads(score_file(c).read_text())["score"], c) for c in checkpoints.glob("best-*.ckpt") if score_file(c).is_file()]
    return max(scored)[1] if scored else None
