"""The DreamBooth LightningModule: UNet (and optionally text encoder) fine-tuning with prior preservation."""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import lightning as L
import torch

from pdm_lightning.data.sampler import derive_seed
from pdm_lightning.losses.diffusion import (
    add_noise,
    compute_snr,
    diffusion_target,
    dreambooth_loss,
    min_snr_weights,
    per_sample_mse,
    sample_noise,
)
from pdm_lightning.model.loading import load_components
from pdm_lightning.model.lora import LoraSettings, add_lora_adapters
from pdm_lightning.model.optim import OptimizerConfig, build_lr_scheduler, build_optimizer


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
        learning_rate: peak learning rate (anchor: 1e-6 full fine-tune per METHOD.md).
        prior_loss_weight: weight of the prior-preservation loss.
        offset_noise: offset-noise strength (0 disables; 0.05-0.1 is common).
        snr_gamma: min-SNR-gamma loss weighting (None disables; 5.0 is the paper's value).
        gradient_checkpointing: trade compute for activation memory.
        attention_backend: ``sdpa`` (PyTorch scaled-dot-product attention) or ``xformers``.
        optimizer: optimizer and learning-rate schedule settings.
        noise_seed: seed of the per-step noise, timesteps and VAE sampling.
        lora: train LoRA adapters (on the UNet, and on the text encoder with train_text_encoder)
            instead of the full weights; None fine-tunes the full weights.
    """

    def __init__(
        self,
        pretrained_model_name_or_path: str,
        revision: str | None = None,
        variant: str | None = None,
        train_text_encoder: bool = False,
        learning_rate: float = 5e-6,
        prior_loss_weight: float = 1.0,
        offset_noise: float = 0.0,
        snr_gamma: float | None = None,
        gradient_checkpointing: bool = False,
        attention_backend: Literal["sdpa", "xformers"] = "sdpa",
        optimizer: OptimizerConfig | None = None,
        noise_seed: int = 0,
        lora: LoraSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.optimizer_config = optimizer or OptimizerConfig()
        self.lora = lora
        self.tokenizer = self.text_encoder = self.vae = self.unet = self.noise_scheduler = None
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
        return self

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

    def _step_generator(self) -> torch.Generator:
        # Seeded from the global batch counter (restored on resume) and the rank, so a resumed run
        # draws exactly the noise an uninterrupted one would, and each rank draws its own.
        batch_counter = self.trainer.fit_loop.total_batch_idx
        seed = derive_seed(self.hparams.noise_seed, self.global_rank, batch_counter)
        return torch.Generator(device=self.device).manual_seed(seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        generator = self._step_generator()
        latents = self.encode_images(batch["pixel_values"], generator)
        noise = sample_noise(latents.shape, generator, self.device, self.hparams.offset_noise)
        num_timesteps = self.alphas_cumprod.shape[0]
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator, device=self.device)
        noisy_latents = add_noise(latents, noise, timesteps, self.alphas_cumprod)

        prediction = self(noisy_latents, timesteps, batch["input_ids"])
        target = diffusion_target(latents, noise, timesteps, self.alphas_cumprod, self.prediction_type)
        weights = None
        if self.hparams.snr_gamma is not None:
            snr = compute_snr(self.alphas_cumprod, timesteps)
            weights = min_snr_weights(snr, self.hparams.snr_gamma, self.prediction_type)
        loss = dreambooth_loss(
            per_sample_mse(prediction, target), int(batch["num_instance"]), self.hparams.prior_loss_weight, weights
        )

        self.log("train/loss", loss.total, prog_bar=True)
        self.log("train/loss_instance", loss.instance)
        if loss.prior is not None:
            self.log("train/loss_prior", loss.prior)
        return loss.total

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
