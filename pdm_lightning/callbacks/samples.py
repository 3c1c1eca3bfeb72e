"""Sample images during training, from the module's live weights, without disturbing the run."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.callbacks.run_outputs import log_image, run_dir
from pdm_lightning.callbacks.run_parts import dreambooth_module
from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.training.nonfinite import NonFiniteTrainingError, all_finite, first_nonfinite
from pdm_lightning.generation.files import open_rgb, write_grids, write_image
from pdm_lightning.generation.jobs import plan_jobs
from pdm_lightning.generation.sampling import generate_from_module
from pdm_lightning.generation.settings import GenerationSettings, require_positive

# Appended to the instance prompt when no prompts are configured: the subject alone, then in contexts
# that show whether it has overfitted to its training backgrounds.
DEFAULT_CONTEXTS = ("", " on the beach", " in the snow")
# A quick look at the training's progress, taken again and again: fewer steps than predict's default.
SAMPLE_STEPS = 25
DEFAULTS = GenerationSettings()


class SampleImages(L.Callback):
    """Every ``every_n_train_steps`` optimizer steps and at the end of fit, samples the same prompts
    with the same seeds from the weights being trained (LoRA active, nothing reloaded), so that the
    images of successive steps are comparable. Saves PNGs under ``<log dir>/samples/step_XXXXXX/``, a grid
    per prompt (its images side by side) in ``step_XXXXXX/grids/NN_<prompt>.png``, and logs the grids to
    TensorBoard (``samples/NN_<prompt>``). Training continues exactly as it
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
        num_inference_steps: int = SAMPLE_STEPS,
        guidance_scale: float = DEFAULTS.guidance_scale,
        negative_prompt: str | None = DEFAULTS.negative_prompt,
        scheduler: str = DEFAULTS.scheduler,
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
        if not isinstance(trainer.datamodule, DreamBoothDataModule):
            raise ValueError("SampleImages needs prompts: set them (--samples.prompts) or use the DreamBoothDataModule "
                             "(its instance prompt is sampled).")
        return [trainer.datamodule.hparams.instance_prompt + context for context in DEFAULT_CONTEXTS]

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
        require_finite_weights(pl_module, step)  # every rank (same weights): none waits at the barrier for a failed one
        out_dir = run_dir(trainer) / self.dirname / f"step_{step:06d}"  # every rank: a collective
        written: list[Path] = []
        if trainer.is_global_zero:
            written = self._sample_to(out_dir, trainer, pl_module)
            rank_zero_info(f"Sampled {len(written)} images at step {step} into {out_dir} (a grid per prompt in grids/)")
        trainer.strategy.barrier("sample_images")
        return written

    def _sample_to(self, out_dir: Path, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        module = dreambooth_module(pl_module, "SampleImages")
        prompts = self.resolve_prompts(trainer)
        jobs = plan_jobs(prompts, self.num_images, self.seed)
        # The PDM query hook records every UNet call: sampling hands back what it held.
        images = generate_from_module(module, jobs, self.settings, self.batch_size,
                                      trainer.precision_plugin.forward_context, held=(module.query_capture,))
        out_dir.mkdir(parents=True, exist_ok=True)
        model = f"{module.hparams.pretrained_model_name_or_path} @ step {trainer.global_step}"
        written = [write_image(out_dir, job, image, self.settings, model, self.seed) for job, image in zip(jobs, images)]
        # The grids on disk too (as predict writes them), not only in TensorBoard; the logged grid is the file's.
        for grid_path in write_grids(out_dir, jobs):
            log_image(trainer, f"{self.dirname}/{grid_path.stem}", open_rgb(grid_path), trainer.global_step)
        return written


def require_finite_weights(pl_module: L.LightningModule, step: int) -> None:
    """Never samples from NaN or infinite weights (the non-finite guard stops a run before that)."""
    trained = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
    if not all_finite(p for _, p in trained):  # one fused pass; the per-tensor search only to name the culprit
        raise NonFiniteTrainingError(f"SampleImages: not sampling at step {step}: the weights are not finite, "
                                     f"first {first_nonfinite(trained)}.")
