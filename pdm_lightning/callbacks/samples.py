"""Sample images during training, from the module's live weights, without disturbing the run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image

from pdm_lightning.generate import (
    GenerationSettings,
    ImageJob,
    chunked,
    make_grid,
    plan_jobs,
    require_positive,
    sample_images,
    slugify,
    write_image,
)
from pdm_lightning.model.inference import inference_pipeline, preserved_training_state

# Appended to the instance prompt when no prompts are configured: the subject alone, then in contexts
# that show whether it has overfitted to its training backgrounds.
DEFAULT_CONTEXTS = ("", " on the beach", " in the snow")


class SampleImages(L.Callback):
    """Every ``every_n_train_steps`` optimizer steps and at the end of fit, samples the same prompts
    with the same seeds from the weights being trained (LoRA active, nothing reloaded), so that the
    images of successive steps are comparable. Saves PNGs under ``<log dir>/samples/step_XXXXXX/`` and
    logs a grid per prompt to TensorBoard (``samples/<prompt>``). Training continues exactly as it
    would have without it (modes, RNG states and gradients untouched). Runs on global rank 0 only.

    Args:
        prompts: prompts to sample; None: the instance prompt alone, on the beach and in the snow.
        every_n_train_steps: sampling period in optimizer steps (0: only at the end of fit).
        at_fit_end: also sample once training ends (skipped when that step was just sampled).
        num_images: images per prompt.
        seed: image k of each prompt uses seed derive_seed(seed, k) at every step.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        negative_prompt: prompt to steer away from.
        scheduler: sampler name (dpmsolver++, ddim, euler, euler_a, pndm, unipc, ddpm).
        batch_size: images per sampling batch.
        dirname: folder under the run's log directory.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        every_n_train_steps: int = 100,
        at_fit_end: bool = True,
        num_images: int = 2,
        seed: int = 0,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | None = None,
        scheduler: str = "dpmsolver++",
        batch_size: int = 4,
        dirname: str = "samples",
    ) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0 (0: only at fit end), got {every_n_train_steps}.")
        self.prompts = list(prompts) if prompts else None
        self.every_n_train_steps = every_n_train_steps
        self.at_fit_end = at_fit_end
        # Checked now: a bad value found at the first sampling would stop a run that has trained for a while.
        self.num_images = require_positive("samples.num_images", num_images)
        self.seed = seed
        self.settings = GenerationSettings(num_inference_steps, guidance_scale, negative_prompt, scheduler)
        self.batch_size = require_positive("samples.batch_size", batch_size)
        self.dirname = dirname
        self._last_sampled_step: int | None = None

    def resolve_prompts(self, trainer: L.Trainer) -> list[str]:
        if self.prompts:
            return self.prompts
        datamodule = getattr(trainer, "datamodule", None)
        instance_prompt = datamodule.hparams.get("instance_prompt") if datamodule is not None else None
        if not instance_prompt:
            raise ValueError("SampleImages needs prompts: set them (--samples.prompts) or use a data module with "
                             "an instance_prompt.")
        return [instance_prompt + context for context in DEFAULT_CONTEXTS]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_train_steps or self.at_fit_end:
            self.resolve_prompts(trainer)  # no prompt to sample fails before training, not at the first sampling

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        # With gradient accumulation this hook runs once per micro-batch: sample once per optimizer step.
        if self.every_n_train_steps and step > 0 and step % self.every_n_train_steps == 0:
            self.sample(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_fit_end and not trainer.interrupted:
            self.sample(trainer, pl_module)

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        """Samples at the current step (once per step); returns the PNGs written (empty off rank 0)."""
        step = trainer.global_step
        if step == self._last_sampled_step:
            return []
        self._last_sampled_step = step
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / self.dirname / f"step_{step:06d}"  # every rank
        written: list[Path] = []
        if trainer.is_global_zero:
            # The PDM query hook records every UNet call; hand back what it held before sampling.
            capture = getattr(pl_module, "query_capture", None)
            captured = capture.output if capture is not None else None
            try:
                with preserved_training_state(pl_module), trainer.precision_plugin.forward_context():
                    written = self._sample_to(out_dir, trainer, pl_module)
            finally:
                if capture is not None:
                    capture.output = captured
            rank_zero_info(f"Sampled {len(written)} images at step {step} into {out_dir}")
        trainer.strategy.barrier("sample_images")
        return written

    def _sample_to(self, out_dir: Path, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        prompts = self.resolve_prompts(trainer)
        pipeline = inference_pipeline(pl_module, self.settings.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        jobs = plan_jobs(prompts, self.num_images, self.seed)
        images: dict[ImageJob, Image.Image] = {}
        for batch in chunked(jobs, self.batch_size):
            images.update(zip(batch, sample_images(pipeline, batch, self.settings)))
        model = f"{pl_module.hparams.get('pretrained_model_name_or_path', '')} @ step {trainer.global_step}"
        written = [write_image(out_dir, job, image, self.settings, model, self.seed) for job, image in images.items()]
        for prompt_index, prompt in enumerate(prompts):
            grid = make_grid([image for job, image in images.items() if job.prompt_index == prompt_index])
            self._log_grid(trainer, f"{self.dirname}/{prompt_index:02d}_{slugify(prompt)}", grid)
        return written

    @staticmethod
    def _log_grid(trainer: L.Trainer, tag: str, grid: Image.Image) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, np.asarray(grid), trainer.global_step, dataformats="HWC")
