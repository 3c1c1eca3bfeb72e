"""Keeping the best checkpoints by quality: a light DreamBench evaluation (DINO-I, CLIP-T) every N steps."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from pdm_lightning.callbacks.evaluation import evaluation_data, load_instance_images
from pdm_lightning.evaluation.embedders import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, ClipEmbedder, DinoEmbedder
from pdm_lightning.evaluation.generation import generate_for_requests
from pdm_lightning.evaluation.metrics import all_pairs_mean, matched_pairs_mean
from pdm_lightning.evaluation.report import write_json_report
from pdm_lightning.model.inference import preserved_training_state


class QualityCheckpoint(ModelCheckpoint):
    """Every ``every_n_train_steps`` a light evaluation, and the best ``save_top_k`` checkpoints by its score.

    The light evaluation generates ``num_images_per_prompt`` images for ``num_prompts`` prompts
    (spread over the evaluation prompt list of ``--data.evaluation``, same seeds at every step),
    computes DINO-I and CLIP-T, and logs ``eval/dino_i``, ``eval/clip_t`` and
    ``eval/score = dino_weight * DINO-I + clip_t_weight * CLIP-T`` to TensorBoard. Checkpoints go to
    ``<run>/checkpoints/best-step=NNNNNN.ckpt``, each with its scores beside it in
    ``best-step=NNNNNN.json`` (:func:`best_scored_checkpoint` picks the best by them). Overfitting shows as CLIP-T falling while DINO-I
    rises. Training continues exactly as without it: generation runs in eval mode without
    gradients, on a forked random state, and restores the modules' train mode.

    Args:
        every_n_train_steps: evaluation cadence; None (the default) turns the callback off.
        num_prompts: prompts of the light evaluation, spread over the evaluation prompt list.
        num_images_per_prompt: images per prompt (seeds as in the full evaluation).
        num_inference_steps: sampler steps (guidance and sampler from ``--data.evaluation``).
        dino_weight: weight of DINO-I in the score.
        clip_t_weight: weight of CLIP-T in the score.
        dino_model: DINO model id or folder.
        clip_model: CLIP model id or folder.
        save_top_k: how many best checkpoints to keep.
        filename: checkpoint name pattern.
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        num_prompts: int = 4,
        num_images_per_prompt: int = 2,
        num_inference_steps: int = 25,
        dino_weight: float = 1.0,
        clip_t_weight: float = 1.0,
        dino_model: str = DEFAULT_DINO_MODEL,
        clip_model: str = DEFAULT_CLIP_MODEL,
        save_top_k: int = 1,
        filename: str = "best-{step:06d}",
    ) -> None:
        super().__init__(filename=filename, monitor="eval/score", mode="max", save_top_k=save_top_k,
                         every_n_train_steps=every_n_train_steps, save_last=False)
        self.enabled = bool(every_n_train_steps)
        self.num_prompts, self.num_images_per_prompt, self.num_inference_steps = num_prompts, num_images_per_prompt, num_inference_steps
        self.dino_weight, self.clip_t_weight = dino_weight, clip_t_weight
        self.dino_model, self.clip_model = dino_model, clip_model
        self._embedders: tuple[DinoEmbedder, ClipEmbedder] | None = None
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_evaluated_step = -1
        self._scores: dict[str, float] = {}

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # The file names order checkpoints by step, not by score; the score file says which is best
        # (also across a resume, where the restored top-k state may not know every file on disk).
        if trainer.is_global_zero:
            write_json_report(score_file(filepath), {"checkpoint": Path(filepath).name, "step": trainer.global_step, **self._scores})

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            score_file(filepath).unlink(missing_ok=True)

    def _should_skip_saving_checkpoint(self, trainer: L.Trainer) -> bool:
        return not self.enabled or super()._should_skip_saving_checkpoint(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # step > 0: with gradient accumulation the first micro-batches end at step 0 (untrained weights).
        if self.enabled and step > 0 and step % self._every_n_train_steps == 0 and step != self._last_evaluated_step and not trainer.sanity_checking:
            self._last_evaluated_step = step
            scores = self._scores = self.evaluate(trainer, pl_module)
            # logger=False: the scalars go to the loggers below at this exact step; self.log makes them monitorable.
            pl_module.log_dict({f"eval/{k}": v for k, v in scores.items()}, on_step=True, on_epoch=False, logger=False)
            for logger in trainer.loggers:
                logger.log_metrics({f"eval/{k}": v for k, v in scores.items()}, step=step)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _load(self, trainer: L.Trainer, device: torch.device) -> None:
        if self._embedders is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._embedders = (DinoEmbedder(self.dino_model, device), ClipEmbedder(self.clip_model, device))
            real = load_instance_images(evaluation_data(trainer).hparams.instance_data_dir)
            self._real = (self._embedders[0].images(real), self._embedders[1].images(real))

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """DINO-I, CLIP-T and the score of the module as it is now; training state is left untouched."""
        plan = evaluation_data(trainer).evaluation_plan(
            max_prompts=self.num_prompts, num_images_per_prompt=self.num_images_per_prompt,
            num_inference_steps=self.num_inference_steps, pres_num_images=0,
        )
        images = generate_untouched(trainer, pl_module, plan.requests, evaluation_data(trainer).evaluation.batch_size)
        self._load(trainer, pl_module.device)
        dino, clip = self._embedders
        prompt_clip = clip.texts(plan.prompts)[[r["prompt_index"] for r in plan.requests]]
        dino_i = all_pairs_mean(dino.images(images), self._real[0])
        clip_t = matched_pairs_mean(clip.images(images), prompt_clip)
        return {"dino_i": dino_i, "clip_t": clip_t, "score": self.dino_weight * dino_i + self.clip_t_weight * clip_t}


def score_file(checkpoint: str | Path) -> Path:
    """The JSON beside a QualityCheckpoint checkpoint that holds its step and scores."""
    return Path(checkpoint).with_suffix(".json")


def best_scored_checkpoint(checkpoints: Path) -> Path | None:
    """The ``best-*.ckpt`` in ``checkpoints`` with the highest ``eval/score`` (None when there is none)."""
    scored = [(json.loads(score_file(c).read_text())["score"], c) for c in checkpoints.glob("best-*.ckpt") if score_file(c).is_file()]
    return max(scored)[1] if scored else None


def generate_untouched(trainer: L.Trainer, pl_module: L.LightningModule, requests: Sequence[dict], batch_size: int) -> list[Image.Image]:
    """Generates the requests' images with training state (modes, RNGs, gradients) left as it was."""
    images: list[Image.Image] = []
    with preserved_training_state(pl_module), trainer.precision_plugin.forward_context():
        for start in range(0, len(requests), batch_size):
            images += generate_for_requests(pl_module, list(requests[start : start + batch_size]))
    return images
