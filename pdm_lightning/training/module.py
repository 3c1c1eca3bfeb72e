"""The DreamBooth LightningModule: UNet (and optionally text encoder) fine-tuning with prior preservation."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from pdm_lightning.core.dtypes import compute_dtype
from pdm_lightning.losses.masks import MaskMode, mask_to_latent, mask_to_tokens
from pdm_lightning.core.seeding import derive_seed
from pdm_lightning.generation.sampling import generate_batch
from pdm_lightning.losses.diffusion import (
    add_noise,
    compute_snr,
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    per_sample_mse,
    sample_noise,
)
from pdm_lightning.losses.pdm import pdm_loss
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.data.batch import Batch
from pdm_lightning.training.lora import LoraSettings, add_lora_adapters
from pdm_lightning.training.nonfinite import (
    NonFiniteGuard,
    NonFiniteSettings,
    NonFiniteTrainingError,
    all_finite,
    describe_terms,
    gradient_norm,
    nonfinite_terms,
    prevent_checkpoints_on_exception,
)
from pdm_lightning.training.optim import OptimizerConfig, build_lr_scheduler, build_optimizer
from pdm_lightning.pdm.capture import QueryCapture
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.teacher import PDMTeacher


class DreamBoothModule(L.LightningModule):
    """Fine-tunes a Stable Diffusion UNet (and optionally its text encoder) on a subject.

    Weights are loaded in ``configure_model``, after the data module has validated the inputs, so
    a bad photo fails the run before gigabytes of weights are read. Checkpoints hold only the
    trainable weights; the frozen ones are reloaded from ``pretrained_model_name_or_path``.

    Args:
        pretrained_model_name_or_path: local diffusers folder or hub id of the base model.
        revision: hub revision of the base model.
        variant: weight variant to load, e.g. "fp16".
        train_text_encoder: also fine-tune the text encoder.
        learning_rate: peak learning rate (the reference's full fine-tune: 1e-6; its LoRA recipe: 1e-4).
        prior_loss_weight: weight of the prior-preservation loss.
        offset_noise: offset-noise strength (0 disables; 0.05-0.1 is common).
        snr_gamma: min-SNR-gamma loss weighting (None disables; 5.0 is the paper's value).
        gradient_checkpointing: trade compute for activation memory.
        attention_backend: ``sdpa`` (PyTorch scaled-dot-product attention) or ``xformers``.
        optimizer: optimizer and learning-rate schedule settings.
        noise_seed: seed of the per-step noise, timesteps and VAE sampling.
        lora: train LoRA adapters (on the UNet, and on the text encoder with train_text_encoder)
            instead of the full weights; None fine-tunes the full weights.
        pdm: the PDM loss (PDMBooth) and its teacher (weight, layer, bank or on-the-fly teacher, bank
            settings); None trains without it. train.py hands the same settings to the data module, which
            then adds the PDM chunk to every batch.
        mask_instance_loss: restrict the instance loss to the subject (needs subject masks).
        mask_prior_loss: restrict the prior loss to the subject of each class image (needs class masks).
        mask_pdm_loss: restrict the PDM loss to the subject's tokens (needs subject masks).
        mask_mode: ``binary`` (any latent cell with some subject counts as subject, as the reference)
            or ``soft`` (area weights); set with the masks (``--data.masks.mode``).
        nonfinite: what a NaN or infinite loss term or gradient norm does: stop the run at that step
            (default) or drop that optimizer step (``--model.nonfinite.action skip``, with a limit on
            drops in a row). No checkpoint, sample or export is ever written from non-finite weights.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        train_text_encoder: bool = False,
        learning_rate: float = 1e-6,
        prior_loss_weight: float = 1.0,
        offset_noise: float = 0.0,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: Literal["sdpa", "xformers"] = "sdpa",
        optimizer: OptimizerConfig | None = None,
        noise_seed: int = 0,
        lora: LoraSettings | None = None,
        pdm: PDMSettings | None = None,
        mask_instance_loss: bool = False,
        mask_prior_loss: bool = False,
        mask_pdm_loss: bool = False,
        mask_mode: MaskMode = "binary",
        nonfinite: NonFiniteSettings = NonFiniteSettings(),  # noqa: B008 - frozen: one shared default is safe
    ) -> None:
        super().__init__()
        self.trained_steps: int | None = None  # the loaded checkpoint's global_step (on_load_checkpoint)
        self.save_hyperparameters()
        # A local base model is recorded absolute, also when the CLI hands over its config as typed (it replaces
        # what save_hyperparameters reads): predict.py --checkpoint may run from another directory.
        if Path(pretrained_model_name_or_path).expanduser().exists():
            self.hparams.pretrained_model_name_or_path = str(Path(pretrained_model_name_or_path).expanduser().resolve())
        self.optimizer_config = optimizer or OptimizerConfig()
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.pdm = PDMSettings(**pdm) if isinstance(pdm, dict) else pdm
        self.nonfinite_guard = NonFiniteGuard(NonFiniteSettings(**nonfinite) if isinstance(nonfinite, dict) else nonfinite)
        self.tokenizer = self.text_encoder = self.vae = self.unet = self.noise_scheduler = None
        self.pdm_teacher: PDMTeacher | None = None
        self.teacher_unet = None  # registered here so it moves with the module (on-the-fly teacher, full fine-tune)
        # Checkpoints carry only trainable weights; on_load_checkpoint checks none of those is missing.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        parts = self.source.components()
        self.tokenizer, self.noise_scheduler = parts.tokenizer, parts.noise_scheduler
        self.text_encoder, self.vae, self.unet = parts.text_encoder, parts.vae, parts.unet
        self.register_buffer("alphas_cumprod", parts.noise_scheduler.alphas_cumprod.clone(), persistent=False)

        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(self.hparams.train_text_encoder)
        self.unet.requires_grad_(True)
        self.train(self.training)
        frozen_dtype = compute_dtype(self.trainer.precision if self._trainer else None)
        frozen = [self.vae] if self.hparams.train_text_encoder else [self.vae, self.text_encoder]
        if self.lora is not None:  # under LoRA every base weight is frozen; adapters stay float32
            frozen = [self.vae, self.text_encoder, self.unet]
        for part in frozen:
            if part.dtype != frozen_dtype:  # casting to the same dtype would only log a diffusers warning
                part.to(dtype=frozen_dtype)
        if self.lora is not None:
            add_lora_adapters(self.unet, self.lora, self.lora.unet_target_modules)
            if self.hparams.train_text_encoder:
                add_lora_adapters(self.text_encoder, self.lora, self.lora.text_encoder_target_modules)
            else:
                self.text_encoder.requires_grad_(False)
        if self.pdm is not None:
            self.pdm_teacher = PDMTeacher(self.pdm, self.source)
            self.pdm_teacher.attach(self.unet, lora=self.lora is not None, teacher_dtype=frozen_dtype)
            self.teacher_unet = self.pdm_teacher.teacher_unet

        if self.hparams.attention_backend == "xformers":
            if importlib.util.find_spec("xformers") is None:
                raise ImportError(
                    "attention_backend 'xformers' needs the xformers package: `pip install -e .[xformers]` "
                    "(CUDA builds only), or keep the default 'sdpa' (PyTorch's fused attention)."
                )
            self.unet.enable_xformers_memory_efficient_attention()
        if self.hparams.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.hparams.train_text_encoder:
                self.text_encoder.gradient_checkpointing_enable()

    def train(self, mode: bool = True) -> DreamBoothModule:
        """Switches the trained parts' mode; frozen parts stay in eval mode (from_pretrained loads all in eval)."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
            if not self.hparams.train_text_encoder:
                self.text_encoder.eval()
        if self.teacher_unet is not None:
            self.teacher_unet.eval()
        return self

    @property
    def source(self) -> ModelSource:
        """The base model this module loads (and the data module prepares with)."""
        return ModelSource(self.hparams.pretrained_model_name_or_path, self.hparams.revision, self.hparams.variant)

    @property
    def pdm_loss_weight(self) -> float:
        return self.pdm.loss_weight(self.lora is not None) if self.pdm is not None else 0.0

    @property
    def query_capture(self) -> QueryCapture | None:
        """The PDM hook on the student's query layer (None without PDM)."""
        return self.pdm_teacher.capture if self.pdm_teacher is not None else None

    def release_pdm_teacher(self) -> None:
        """Drops the PDM hook and teacher copy (generation from a trained run needs neither)."""
        if self.pdm_teacher is not None:
            self.pdm_teacher.release()
        self.pdm_teacher = None
        self.teacher_unet = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (noise or velocity) for noisy latents and prompt token ids."""
        return self.unet(noisy_latents, timesteps, self.encode_prompts(input_ids)).sample

    def encode_prompts(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.hparams.train_text_encoder and self.training):
            return self.text_encoder(input_ids)[0]

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        latent_dist = self.vae.encode(pixel_values.to(dtype=self.vae.dtype)).latent_dist
        return latent_dist.sample(generator=generator).float() * self.vae.config.scaling_factor

    def _step_seed(self, *stream: int) -> int:
        # From the global batch counter (restored on resume) and the rank: a resumed run draws exactly
        # what an uninterrupted one would, and each rank draws its own.
        return derive_seed(self.hparams.noise_seed, self.global_rank, self.trainer.fit_loop.total_batch_idx, *stream)

    def _step_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._step_seed())

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # LoRA dropout (like anything drawing from the global RNG) then depends only on the step:
        # Lightning checkpoints hold no RNG state, so this is what makes resumes with dropout exact.
        torch.manual_seed(self._step_seed(1))

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        generator = self._step_generator()
        latents = self.encode_images(batch.pixel_values, generator)
        noise = sample_noise(latents.shape, generator, self.device, self.hparams.offset_noise)
        num_pdm = batch.num_pdm
        if bool(num_pdm) != (self.pdm is not None):
            raise RuntimeError(
                f"The model {'has' if self.pdm is not None else 'has no'} PDM settings but the batch "
                f"{'has' if num_pdm else 'lacks'} a PDM chunk: give the data module the same pdm settings (train.py links them)."
            )
        num_diffusion = latents.shape[0] - num_pdm  # instance (+ class) chunks; the PDM chunk comes last
        num_timesteps = self.alphas_cumprod.shape[0]
        timesteps = torch.randint(0, num_timesteps, (num_diffusion,), generator=generator, device=self.device)
        if num_pdm:  # the PDM chunk's timesteps come from the teacher's trajectory (never interpolated)
            timesteps = torch.cat([timesteps, batch.pdm_timesteps.to(timesteps)])
        noisy_latents = add_noise(latents, noise, timesteps, self.alphas_cumprod)

        prediction = self(noisy_latents, timesteps, batch.input_ids)[:num_diffusion]
        latents, noise, timesteps = latents[:num_diffusion], noise[:num_diffusion], timesteps[:num_diffusion]
        target = diffusion_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        weights = None
        if self.hparams.snr_gamma is not None:
            snr = compute_snr(self.alphas_cumprod, timesteps)
            weights = min_snr_weights(snr, self.hparams.snr_gamma, self.prediction_type)
        num_instance = batch.num_instance
        loss = dreambooth_loss(
            per_sample_mse(prediction, target, self._diffusion_mask(batch, num_instance, latents)),
            num_instance,
            self.hparams.prior_loss_weight,
            weights,
        )
        total = loss.total
        if num_pdm:
            student = self.pdm_teacher.student_queries()[num_diffusion:]
            token_mask = None
            if self.hparams.mask_pdm_loss:
                latent_mask = self._latent_mask(batch, "pdm", latents.shape[-2:])
                token_mask = mask_to_tokens(latent_mask, student.shape[1], self.hparams.mask_mode)
            loss_pdm = pdm_loss(student, self.pdm_teacher.targets(batch.teacher, batch.pdm_timesteps), token_mask)
            total = total + self.pdm_loss_weight * loss_pdm
            self.log("train/loss_pdm", loss_pdm)

        self.log("train/loss", total, prog_bar=True)
        self.log("train/loss_instance", loss.instance)
        if loss.prior is not None:
            self.log("train/loss_prior", loss.prior)
        terms = {"train/loss": total, "train/loss_instance": loss.instance, "train/loss_prior": loss.prior}
        if num_pdm:
            terms["train/loss_pdm"] = loss_pdm
        self.check_losses_finite(terms)
        return total

    # The non-finite guard (training/nonfinite.py): losses here, gradients before the optimizer step,
    # weights after it; a stop raises before anything (checkpoint, sample, export) sees the weights.

    def check_losses_finite(self, terms: dict[str, torch.Tensor | None]) -> None:
        """Flags a NaN or infinite loss term; with ``stop`` the run ends now, before the backward pass."""
        bad = nonfinite_terms(terms)
        # Every rank takes the same decision (a collective), so none waits for a rank that stopped.
        # (A step called outside a Trainer, as the tests of the loss do, decides alone.)
        any_bad = self.trainer.strategy.reduce_boolean_decision(bool(bad), all=False) if self._trainer else bool(bad)
        if not any_bad:
            return
        self.nonfinite_guard.flag(describe_terms(bad) if bad else "a loss on another rank is not finite")
        if self.nonfinite_guard.settings.action == "stop":
            self._stop_nonfinite()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Once per optimizer step, after backward (and unscaling): checks the gradient norm, then stops,
        drops the step (gradients set to None: the optimizer leaves every weight and its state alone) or goes on."""
        # Under 16-bit AMP the GradScaler itself drops steps with infinite gradients (expected while it
        # calibrates its scale); the guard leaves those to it.
        if getattr(self.trainer.precision_plugin, "scaler", None) is None:
            norm = gradient_norm(self.trainable_parameters())
            if not math.isfinite(norm):
                self.nonfinite_guard.flag(f"the gradient norm is {norm}")
        decision = self.nonfinite_guard.decide()
        if decision == "stop":
            self._stop_nonfinite()
        if decision == "skip":
            optimizer.zero_grad(set_to_none=True)
            rank_zero_warn(f"Dropped optimizer step {self.global_step} (non-finite loss or gradients; "
                           f"{self.nonfinite_guard.skipped_steps} dropped so far, --model.nonfinite.action skip).")
        if self.nonfinite_guard.settings.action == "skip":
            self.log("train/nonfinite_skipped_steps", float(self.nonfinite_guard.skipped_steps))

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then a check that it left every trained weight finite (finite gradients with
        a huge learning rate or weight decay can still overflow); runs before any checkpoint of the step."""
        super().optimizer_step(*args, **kwargs)
        if not all_finite(self.trainable_parameters()):
            prevent_checkpoints_on_exception(self.trainer)
            raise NonFiniteTrainingError(
                f"The update of step {self.global_step} made weights NaN or infinite although its losses and "
                f"gradient norm were finite: lower --model.learning_rate (now {self.hparams.learning_rate:g}) or "
                "--model.optimizer.adam_weight_decay. Nothing is written from these weights. "
                f"{self.nonfinite_guard.checkpoint_line()}"
            )

    def on_train_start(self) -> None:
        # Checkpoint files already there are older than this fit; a resumed run's last finite weights
        # are those of the checkpoint it resumed from.
        self.nonfinite_guard.note_checkpoints(self.trainer, None)
        if self.trainer.ckpt_path:
            self.nonfinite_guard.note_resumed(self.trainer.ckpt_path, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        # Runs after the callbacks' hook: a checkpoint saved at this step is on disk now.
        self.nonfinite_guard.note_checkpoints(self.trainer, self.global_step)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def _stop_nonfinite(self) -> None:
        raise NonFiniteTrainingError(self.nonfinite_guard.stop_message(self.global_step, self.hparams.learning_rate))

    def _diffusion_mask(self, batch: Batch, num_instance: int, latents: torch.Tensor) -> torch.Tensor | None:
        """Latent-resolution subject masks of the instance (+ class) chunk; ones where masking is off."""
        chunks = {
            "instance": (0, num_instance, self.hparams.mask_instance_loss),
            "class": (num_instance, latents.shape[0], self.hparams.mask_prior_loss),
        }
        mask = None
        for chunk, (start, stop, enabled) in chunks.items():
            if enabled and stop > start:
                mask = latents.new_ones(latents.shape[0], 1, *latents.shape[-2:]) if mask is None else mask
                mask[start:stop] = self._latent_mask(batch, chunk, latents.shape[-2:])
        return mask

    def _latent_mask(self, batch: Batch, chunk: str, latent_hw: torch.Size) -> torch.Tensor:
        pixel_mask = batch.mask(chunk)
        if pixel_mask is None:
            loss = "prior" if chunk == "class" else chunk
            raise RuntimeError(
                f"mask_{loss}_loss is on but the batch has no {chunk} masks: give the data module subject masks "
                "(--data.masks.instance_mask_dir, or --data.masks.auto_mask_model)."
            )
        return mask_to_latent(pixel_mask, latent_hw, self.hparams.mask_mode)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates a batch of ``DreamBoothDataModule.predict_dataloader`` with the live weights (LoRA active).

        Each image has its own seeded generator, so it does not depend on the batch it falls in;
        ``PredictionWriter`` saves the returned images.
        """
        return generate_batch(self, batch, held=(self.query_capture,))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates the batch's evaluation images (``DreamBenchEvaluation`` embeds and scores them)."""
        return self.generate_evaluation_images(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates the batch's evaluation images (``DreamBenchEvaluation`` embeds and scores them)."""
        return self.generate_evaluation_images(batch)

    def generate_evaluation_images(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch of ``DreamBoothDataModule.evaluation_plan`` jobs with one PIL image per job (``images``)."""
        return generate_batch(self, batch, held=(self.query_capture,))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = build_optimizer(
            [p for p in self.parameters() if p.requires_grad], self.hparams.learning_rate, self.optimizer_config
        )
        scheduler = build_lr_scheduler(optimizer, self.optimizer_config, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def trainable_state_keys(self) -> set[str]:
        return {name for name, param in self.named_parameters() if param.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.trained_steps = checkpoint.get("global_step")  # test/validate's trainer.global_step is 0, not this
        missing = self.trainable_state_keys() - checkpoint["state_dict"].keys()
        if missing:
            raise RuntimeError(
                f"The checkpoint lacks {len(missing)} of this model's trainable weights (e.g. {sorted(missing)[0]}). "
                "It was probably saved with other settings (train_text_encoder, base model): resume with the "
                "settings of the run that wrote it."
            )
