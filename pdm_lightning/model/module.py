"""The DreamBooth LightningModule: UNet (and optionally text encoder) fine-tuning with prior preservation."""

from __future__ import annotations

import copy
import importlib.util
from typing import Any, Literal

import lightning as L
import torch

from pdm_lightning.data.masks import MaskMode, mask_to_latent, mask_to_tokens
from pdm_lightning.data.sampler import derive_seed
from pdm_lightning.generate import GenerationSettings, ImageJob, sample_images
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
from pdm_lightning.model.inference import inference_pipeline
from pdm_lightning.model.loading import load_components
from pdm_lightning.model.lora import LoraSettings, add_lora_adapters
from pdm_lightning.model.optim import OptimizerConfig, build_lr_scheduler, build_optimizer
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER, QueryCapture
from pdm_lightning.pdm.teacher import unet_query_fn


def compute_dtype(precision: str | int | None) -> torch.dtype:
    """The dtype the Trainer's precision setting computes in (frozen parts are stored in it)."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


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
        use_pdm_loss: add the PDM loss (PDMBooth); the data module then supplies the PDM chunk.
        pdm_loss_weight: weight of the PDM loss; None takes the method's: 0.1 full fine-tune, 0.05 with LoRA.
        pdm_layer: module path of the ``to_q`` whose output is the appearance query (SD1.5 default).
        pdm_teacher: ``bank`` reads the teacher's queries from the feature bank; ``on_the_fly`` recomputes
            them from stored latents with the pretrained UNet (the same UNet with adapters off under LoRA,
            a frozen copy in the compute dtype under full fine-tuning).
        mask_instance_loss: restrict the instance loss to the subject (needs subject masks).
        mask_prior_loss: restrict the prior loss to the subject of each class image (needs class masks).
        mask_pdm_loss: restrict the PDM loss to the subject's tokens (needs subject masks).
        mask_mode: ``binary`` (any latent cell with some subject counts as subject, as the reference)
            or ``soft`` (area weights); set with the masks (``--data.masks.mode``).
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
        use_pdm_loss: bool = False,
        pdm_loss_weight: float | None = None,
        pdm_layer: str = DEFAULT_PDM_LAYER,
        pdm_teacher: Literal["bank", "on_the_fly"] = "bank",
        mask_instance_loss: bool = False,
        mask_prior_loss: bool = False,
        mask_pdm_loss: bool = False,
        mask_mode: MaskMode = "binary",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.lora = lora
        self.tokenizer = self.text_encoder = self.vae = self.unet = self.noise_scheduler = None
        self.teacher_unet = None  # full fine-tuning with an on-the-fly PDM teacher only
        self.query_capture: QueryCapture | None = None
        # Checkpoints carry only trainable weights; on_load_checkpoint checks none of those is missing.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        parts = load_components(self.hparams.pretrained_model_name_or_path, self.hparams.revision, self.hparams.variant)
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
        if self.hparams.use_pdm_loss:
            self._configure_pdm(frozen_dtype)

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

    def _configure_pdm(self, teacher_dtype: torch.dtype) -> None:
        if self.hparams.pdm_teacher == "on_the_fly" and self.lora is None:
            # Copied before any training step (and before a checkpoint is restored): the pretrained weights.
            self.teacher_unet = copy.deepcopy(self.unet).requires_grad_(False).to(dtype=teacher_dtype).eval()
        # Registered after LoRA injection, so the student's query includes the adapter's delta.
        self.query_capture = QueryCapture(self.unet, self.hparams.pdm_layer)

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
    def pdm_loss_weight(self) -> float:
        if self.hparams.pdm_loss_weight is not None:
            return self.hparams.pdm_loss_weight
        return 0.05 if self.lora is not None else 0.1

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

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        # LoRA dropout (like anything drawing from the global RNG) then depends only on the step:
        # Lightning checkpoints hold no RNG state, so this is what makes resumes with dropout exact.
        torch.manual_seed(self._step_seed(1))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self._step_generator()
        latents = self.encode_images(batch["pixel_values"], generator)
        noise = sample_noise(latents.shape, generator, self.device, self.hparams.offset_noise)
        num_pdm = int(batch.get("num_pdm", 0))
        if bool(num_pdm) != self.hparams.use_pdm_loss:
            raise RuntimeError(
                f"use_pdm_loss is {self.hparams.use_pdm_loss} on the model but the batch {'has' if num_pdm else 'lacks'} "
                "a PDM chunk: set use_pdm_loss on the data module alike (train.py links them)."
            )
        num_diffusion = latents.shape[0] - num_pdm  # instance (+ class) chunks; the PDM chunk comes last
        num_timesteps = self.alphas_cumprod.shape[0]
        timesteps = torch.randint(0, num_timesteps, (num_diffusion,), generator=generator, device=self.device)
        if num_pdm:  # the PDM chunk's timesteps come from the teacher's trajectory (never interpolated)
            timesteps = torch.cat([timesteps, batch["pdm_timestep"].to(timesteps)])
        noisy_latents = add_noise(latents, noise, timesteps, self.alphas_cumprod)

        prediction = self(noisy_latents, timesteps, batch["input_ids"])[:num_diffusion]
        latents, noise, timesteps = latents[:num_diffusion], noise[:num_diffusion], timesteps[:num_diffusion]
        target = diffusion_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        weights = None
        if self.hparams.snr_gamma is not None:
            snr = compute_snr(self.alphas_cumprod, timesteps)
            weights = min_snr_weights(snr, self.hparams.snr_gamma, self.prediction_type)
        num_instance = int(batch["num_instance"])
        loss = dreambooth_loss(
            per_sample_mse(prediction, target, self._diffusion_mask(batch, num_instance, latents)),
            num_instance,
            self.hparams.prior_loss_weight,
            weights,
        )
        total = loss.total
        if num_pdm:
            student = self.query_capture.pop()[num_diffusion:]
            token_mask = None
            if self.hparams.mask_pdm_loss:
                latent_mask = self._latent_mask(batch, "pdm", latents.shape[-2:])
                token_mask = mask_to_tokens(latent_mask, student.shape[1], self.hparams.mask_mode)
            loss_pdm = pdm_loss(student, self.teacher_queries(batch), token_mask)
            total = total + self.pdm_loss_weight * loss_pdm
            self.log("train/loss_pdm", loss_pdm)

        self.log("train/loss", total, prog_bar=True)
        self.log("train/loss_instance", loss.instance)
        if loss.prior is not None:
            self.log("train/loss_prior", loss.prior)
        return total

    def _diffusion_mask(self, batch: dict[str, Any], num_instance: int, latents: torch.Tensor) -> torch.Tensor | None:
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

    def _latent_mask(self, batch: dict[str, Any], chunk: str, latent_hw: torch.Size) -> torch.Tensor:
        key = f"{chunk}_mask"
        if key not in batch:
            loss = "prior" if chunk == "class" else chunk
            raise RuntimeError(
                f"mask_{loss}_loss is on but the batch has no {key}: give the data module subject masks "
                "(--data.masks.instance_mask_dir, or --data.masks.auto_mask_model)."
            )
        return mask_to_latent(batch[key], latent_hw, self.hparams.mask_mode)

    def teacher_queries(self, batch: dict[str, Any]) -> torch.Tensor:
        """The pretrained model's queries for the batch's PDM chunk: read from the bank, or recomputed."""
        if "pdm_queries" in batch:
            return batch["pdm_queries"]
        # Full fine-tuning: the frozen copy. LoRA: the same UNet with its adapters off (no second copy).
        teacher = self.teacher_unet if self.teacher_unet is not None else self.unet
        query = unet_query_fn(teacher, batch["pdm_condition"], self.hparams.pdm_layer, disable_adapters=self.lora is not None)
        return query(batch["pdm_latents"], batch["pdm_timestep"])

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates a batch of ``DreamBoothDataModule.predict_dataloader`` with the live weights (LoRA active).

        Each image has its own seeded generator, so it does not depend on the batch it falls in;
        ``PredictionWriter`` saves the returned images.
        """
        jobs = [ImageJob(**job) for job in batch["jobs"]]
        settings = GenerationSettings(**batch["generation"])
        pipeline = inference_pipeline(self, settings.scheduler)
        pipeline.set_progress_bar_config(disable=True)
        # Plain dicts and images: Lightning's output transfer refuses frozen dataclasses.
        return {**batch, "images": sample_images(pipeline, jobs, settings)}

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates the batch's evaluation images (``DreamBenchEvaluation`` embeds and scores them)."""
        return self.generate_evaluation_images(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Generates the batch's evaluation images (``DreamBenchEvaluation`` embeds and scores them)."""
        return self.generate_evaluation_images(batch)

    @torch.no_grad()
    def generate_evaluation_images(self, batch: dict[str, Any]) -> dict[str, Any]:
        """``{"requests", "images"}``: one PIL image per request, seeded by the request (prompt, image index)."""
        from pdm_lightning.evaluation.generation import generate_for_requests

        return {"requests": batch["requests"], "images": generate_for_requests(self, batch["requests"])}

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
        missing = self.trainable_state_keys() - checkpoint["state_dict"].keys()
        if missing:
            raise RuntimeError(
                f"The checkpoint lacks {len(missing)} of this model's trainable weights (e.g. {sorted(missing)[0]}). "
                "It was probably saved with other settings (train_text_encoder, base model): resume with the "
                "settings of the run that wrote it."
            )
