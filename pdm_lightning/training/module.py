"""The DreamBooth LightningModule: UNet (and optionally text encoder) fine-tuning with prior preservation.

One module for Stable Diffusion 1.x/2.x and SDXL (the family is read from the base model's
model_index.json): SDXL adds a second text encoder (trained like the first), the pooled prompt
embedding and the crop's size conditioning (``core.conditioning``, ``Batch.time_ids``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info, rank_zero_warn

from pdm_lightning.core.conditioning import PromptEmbeddings, encode_prompts, unet_conditioning
from pdm_lightning.core.dtypes import compute_dtype
from pdm_lightning.losses.masks import MaskMode, mask_to_latent, mask_to_tokens
from pdm_lightning.core.seeding import derive_seed, seed_global_rng
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
from pdm_lightning.core.loading import ModelSource, vae_dtype
from pdm_lightning.data.batch import Batch
from pdm_lightning.data.dataset import DreamBoothDataset
from pdm_lightning.training.compilation import CompileScope, compile_unet
from pdm_lightning.training.latent_cache import (
    LatentCache,
    batch_posterior,
    build_latent_cache,
    keep_vae_float32,
    sample_latents,
    vae_posterior,
)
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
from pdm_lightning.training.text_cache import PromptCache
from pdm_lightning.pdm.capture import QueryCapture
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.teacher import PDMTeacher


class DreamBoothModule(L.LightningModule):
    """Fine-tunes a Stable Diffusion or SDXL UNet (and optionally its text encoders) on a subject.

    Weights are loaded in ``configure_model``, after the data module has validated the inputs, so
    a bad photo fails the run before gigabytes of weights are read. Checkpoints hold only the
    trainable weights; the frozen ones are reloaded from ``pretrained_model_name_or_path``.

    Args:
        pretrained_model_name_or_path: local diffusers folder or hub id of the base model.
        revision: hub revision of the base model.
        variant: weight variant to load, e.g. "fp16".
        vae_name_or_path: a VAE replacing the base model's (folder or hub id), e.g.
            madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in float16 (without a replacement it is
            kept in float32 under 16-bit precision). Used for training latents, the PDM bank, class images,
            samples, and as the exported pipeline's VAE.
        train_text_encoder: also fine-tune the text encoder (SDXL: both text encoders).
        learning_rate: peak learning rate (the reference's full fine-tune: 1e-6; its LoRA recipe: 1e-4).
        prior_loss_weight: weight of the prior-preservation loss.
        offset_noise: offset-noise strength (0 disables; 0.05-0.1 is common).
        snr_gamma: min-SNR-gamma loss weighting (None disables; 5.0 is the paper's value).
        gradient_checkpointing: trade compute for activation memory.
        attention_backend: ``sdpa`` (PyTorch scaled-dot-product attention) or ``xformers``.
        cache_latents: VAE-encode the images whose crop never changes once at fit start (the PDM chunk's centre
            crops; the class images and the photos when their crop is fixed: squares at the resolution, as
            generated class images are, or ``center_crop``), and sample each step's latent from the cached
            posterior (mean + std * noise from the step's generator): the same distribution as encoding them
            every step, for a fraction of the VAE work. Random crops of other photos are still encoded every
            step (see ``latent_crops``).
        latent_crops: also cache the whole resized photos and take the instance chunk's random crop from the
            photo's latent, so no image is VAE-encoded during training. A small change of augmentation: crop
            offsets are multiples of 8 pixels (one latent cell) and the VAE sees the whole photo rather than the
            crop, so the latent cells at the crop's border differ slightly. Needs ``cache_latents``; photos with
            fixed crops are cached exactly without it.
        cache_text_embeddings: with a frozen text encoder (``train_text_encoder`` off), compute the instance and
            class prompts' embeddings once at fit start instead of at every step (the same values).
        compile: ``torch.compile`` the trained UNet (in place: the same weights and checkpoint keys). The first
            steps are slower while it compiles; mostly worth it on GPU for long runs.
        compile_scope: what ``compile`` compiles: ``blocks`` (each transformer block on its own: regional
            compilation, starts much faster; the block holding the PDM query layer stays eager so that the PDM
            hook sees the student's queries) or ``unet`` (the whole forward in one graph: slower to start, minutes
            on a large UNet).
        channels_last: keep the UNet and VAE in channels-last memory format (faster convolutions on recent
            GPUs, with 16-bit precision).
        optimizer: optimizer and learning-rate schedule settings.
        noise_seed: seed of the per-step noise, timesteps and VAE sampling.
        lora: train LoRA adapters (on the UNet, and on the text encoders with train_text_encoder)
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
        vae_name_or_path: str | None = None,
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
        cache_latents: bool = True,
        latent_crops: bool = False,
        cache_text_embeddings: bool = True,
        compile: bool = False,  # noqa: A002 - the option's name (--model.compile)
        compile_scope: CompileScope = "blocks",
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if latent_crops and not cache_latents:
            raise ValueError("latent_crops takes the crops from cached latents: it needs cache_latents (leave it on).")
        self._trainable_during_fit: list[torch.nn.Parameter] | None = None  # trainable_parameters, taken at fit start
        self.trained_steps: int | None = None  # the loaded checkpoint's global_step (on_load_checkpoint)
        self.save_hyperparameters()
        # A local base model is recorded absolute, also when the CLI hands over its config as typed (it replaces
        # what save_hyperparameters reads): predict.py --checkpoint may run from another directory.
        for name in ("pretrained_model_name_or_path", "vae_name_or_path"):
            value = self.hparams.get(name)
            if value is not None and Path(value).expanduser().exists():
                self.hparams[name] = str(Path(value).expanduser().resolve())
        self.optimizer_config = optimizer or OptimizerConfig()
        self.lora = LoraSettings(**lora) if isinstance(lora, dict) else lora
        self.pdm = PDMSettings(**pdm) if isinstance(pdm, dict) else pdm
        self.nonfinite_guard = NonFiniteGuard(NonFiniteSettings(**nonfinite) if isinstance(nonfinite, dict) else nonfinite)
        self.tokenizer = self.text_encoder = self.vae = self.unet = self.noise_scheduler = None
        self.tokenizer_2 = self.text_encoder_2 = None  # SDXL's second tokenizer and text encoder
        self.pdm_teacher: PDMTeacher | None = None
        self.teacher_unet = None  # registered here so it moves with the module (on-the-fly teacher, full fine-tune)
        # Built at each fit start, never checkpointed (training.latent_cache, training.text_cache).
        self.latent_cache: LatentCache | None = None
        self.prompt_embeddings: PromptCache | None = None
        self._vae_input: tuple[torch.device, torch.dtype] | None = None  # the VAE's device and dtype during fit
        self._gradient_norm: torch.Tensor | None = None  # this optimizer step's, from the guard, for clipping
        # Checkpoints carry only trainable weights; on_load_checkpoint checks none of those is missing.
        self.strict_loading = False

    def configure_model(self) -> None:
        if self.unet is not None:
            return
        parts = self.source.components()
        self.tokenizer, self.tokenizer_2, self.noise_scheduler = parts.tokenizer, parts.tokenizer_2, parts.noise_scheduler
        self.text_encoder, self.text_encoder_2 = parts.text_encoder, parts.text_encoder_2
        self.vae, self.unet = parts.vae, parts.unet
        self.register_buffer("alphas_cumprod", parts.noise_scheduler.alphas_cumprod.clone(), persistent=False)

        train_text_encoder = self.hparams.train_text_encoder
        self.vae.requires_grad_(False)
        for encoder in self.text_encoders:
            encoder.requires_grad_(train_text_encoder)
        self.unet.requires_grad_(True)
        self.train(self.training)
        frozen_dtype = compute_dtype(self.trainer.precision if self._trainer else None)
        frozen = [self.vae] if train_text_encoder else [self.vae, *self.text_encoders]
        if self.lora is not None:  # under LoRA every base weight is frozen; adapters stay float32
            frozen = [self.vae, *self.text_encoders, self.unet]
        for part in frozen:
            dtype = vae_dtype(self.vae, parts.family, frozen_dtype) if part is self.vae else frozen_dtype
            if part.dtype != dtype:  # casting to the same dtype would only log a diffusers warning
                part.to(dtype=dtype)
        if self.vae.dtype == torch.float32 and frozen_dtype == torch.float16:  # SDXL's VAE kept out of float16
            keep_vae_float32(self.vae)
        if self.lora is not None:
            add_lora_adapters(self.unet, self.lora, self.lora.unet_target_modules)
            for encoder in self.text_encoders:  # SDXL: the second encoder has the same q/k/v/out_proj layers
                if train_text_encoder:
                    add_lora_adapters(encoder, self.lora, self.lora.text_encoder_target_modules)
                else:
                    encoder.requires_grad_(False)
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
            if train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable()
        if self.hparams.channels_last:
            self.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if self.hparams.compile:  # last: after LoRA injection and the PDM hook
            hooked = [self.query_capture.layer] if self.query_capture is not None else []
            compile_unet(self.unet, self.hparams.compile_scope, hooked)

    def train(self, mode: bool = True) -> DreamBoothModule:
        """Switches the trained parts' mode; frozen parts stay in eval mode (from_pretrained loads all in eval)."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
            if not self.hparams.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.eval()
        if self.teacher_unet is not None:
            self.teacher_unet.eval()
        return self

    @property
    def source(self) -> ModelSource:
        """The base model this module loads (and the data module prepares with)."""
        return ModelSource(
            self.hparams.pretrained_model_name_or_path, self.hparams.revision, self.hparams.variant,
            self.hparams.get("vae_name_or_path"),
        )

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The loaded text encoders in order: (text_encoder,) for SD, (text_encoder, text_encoder_2) for SDXL."""
        return tuple(encoder for encoder in (self.text_encoder, self.text_encoder_2) if encoder is not None)

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

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        input_ids: torch.Tensor,
        input_ids_2: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's prediction (noise or velocity) for noisy latents and prompt token ids (SDXL: also the second
        tokenizer's ids and each row's time ids [N, 6])."""
        embeddings = self.encode_prompts(input_ids, input_ids_2)
        return self.unet(noisy_latents, timesteps, **unet_conditioning(embeddings, time_ids)).sample

    def encode_prompts(self, input_ids: torch.Tensor, input_ids_2: torch.Tensor | None = None) -> PromptEmbeddings:
        """The prompts' conditioning (``core.conditioning.encode_prompts``): from the run's cache when the text
        encoders are frozen and every row is a cached prompt, else from the encoders (with gradients when trained)."""
        ids = (input_ids,) if input_ids_2 is None else (input_ids, input_ids_2)
        if len(ids) != len(self.text_encoders):
            raise ValueError(
                f"The model has {len(self.text_encoders)} text encoder(s) but the batch has {len(ids)} id tensor(s): "
                "build the data module with the same base model (train.py links it)."
            )
        if self.prompt_embeddings is not None and not self.hparams.train_text_encoder:
            cached = self.prompt_embeddings.lookup(ids)
            if cached is not None:
                return cached
        with torch.set_grad_enabled(self.hparams.train_text_encoder and self.training):
            return encode_prompts(self.text_encoders, ids)

    @torch.no_grad()
    def sample_latents(self, batch: Batch, generator: torch.Generator | None = None) -> torch.Tensor:
        """The batch's scaled latents, every row sampled from its VAE posterior: encoded now for the rows that
        came as pixels, cached (``latent_cache``) for the others; one noise draw for all rows from ``generator``."""
        encoded = vae_posterior(self.vae, batch.pixel_values, self._vae_input) if batch.pixel_values is not None else None
        return sample_latents(batch_posterior(batch, encoded, self.latent_cache), generator, self.vae.config.scaling_factor)

    def on_fit_start(self) -> None:
        """Builds the run's caches (frozen VAE and text encoder outputs) before the DataLoader starts its workers."""
        self.latent_cache = self.prompt_embeddings = None
        self._vae_input = (self.vae.device, self.vae.dtype)  # the module is on its device now, and stays there
        dataset = getattr(self.trainer.datamodule, "train_dataset", None)
        if not isinstance(dataset, DreamBoothDataset):
            if self.hparams.cache_latents or self.hparams.cache_text_embeddings:
                rank_zero_info("No DreamBoothDataModule dataset: latents and prompt embeddings are computed at every step.")
            return
        context = self.trainer.precision_plugin.train_step_context
        if self.hparams.cache_latents:
            self.latent_cache, notes = build_latent_cache(
                dataset, self.vae, self.hparams.latent_crops, context, show_progress=self.trainer.is_global_zero
            )
            for note in notes:
                rank_zero_info(note)
        else:
            dataset.use_latent_cache(instance_chunk=False, class_chunk=False, pdm_chunk=False, latent_crops=False)
        if self.hparams.cache_text_embeddings and not self.hparams.train_text_encoder:
            prompts = [(dataset.instance_input_ids, dataset.instance_input_ids_2)]
            if dataset.class_input_ids is not None:
                prompts.append((dataset.class_input_ids, dataset.class_input_ids_2))
            prompts = [tuple(ids for ids in prompt if ids is not None) for prompt in prompts]
            with context():
                self.prompt_embeddings = PromptCache.encode(self.text_encoders, prompts)

    def _step_seed(self, *stream: int) -> int:
        # From the global batch counter (restored on resume) and the rank: a resumed run draws exactly
        # what an uninterrupted one would, and each rank draws its own.
        return derive_seed(self.hparams.noise_seed, self.global_rank, self.trainer.fit_loop.total_batch_idx, *stream)

    def _step_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._step_seed())

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        # LoRA dropout (like anything drawing from the global RNG) then depends only on the step:
        # Lightning checkpoints hold no RNG state, so this is what makes resumes with dropout exact.
        seed_global_rng(self._step_seed(1), self.device)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        generator = self._step_generator()
        latents = self.sample_latents(batch, generator)
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

        prediction = self(noisy_latents, timesteps, batch.input_ids, batch.input_ids_2, batch.time_ids)[:num_diffusion]
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
        self._gradient_norm = None
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is None:
            # Over the optimizer's parameters in its order, as Lightning's clipping reads them: the same norm.
            norm = gradient_norm(plugin.main_params(optimizer))
            value = float(norm) if norm is not None else 0.0
            if not math.isfinite(value):
                self.nonfinite_guard.flag(f"the gradient norm is {value}")
            self._gradient_norm = norm
        decision = self.nonfinite_guard.decide()
        if decision == "stop":
            self._stop_nonfinite()
        if decision == "skip":
            optimizer.zero_grad(set_to_none=True)
            self._gradient_norm = None
            rank_zero_warn(f"Dropped optimizer step {self.global_step} (non-finite loss or gradients; "
                           f"{self.nonfinite_guard.skipped_steps} dropped so far, --model.nonfinite.action skip).")
        if self.nonfinite_guard.settings.action == "skip":
            self.log("train/nonfinite_skipped_steps", float(self.nonfinite_guard.skipped_steps))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clipping by norm (``--trainer.gradient_clip_val``) reuses the gradient norm the guard has just computed
        (``on_before_optimizer_step``): ``clip_grad_norm_`` would compute the same value again. Anything else
        (clipping by value, a GradScaler, strategies that clip their own way) goes through Lightning."""
        norm, self._gradient_norm = self._gradient_norm, None
        plugin = self.trainer.precision_plugin
        if norm is None and getattr(plugin, "scaler", None) is None:
            return  # no gradients (a dropped step): nothing to clip, and fused AdamW must not meet Lightning's check
        by_norm = GradClipAlgorithmType.NORM == (gradient_clip_algorithm or "norm")  # case-insensitive, str or enum
        if (
            norm is None
            or not by_norm
            or not isinstance(gradient_clip_val, (int, float))
            or gradient_clip_val <= 0
            or type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm
            # MixedPrecision adds a check for optimizers that unscale a GradScaler's gradients themselves (fused
            # AdamW): without a scaler (bf16-mixed, the only case with a norm here) there is nothing to unscale.
            or type(plugin).clip_gradients not in (Precision.clip_gradients, MixedPrecision.clip_gradients)
        ):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        torch.nn.utils.clip_grads_with_norm_(plugin.main_params(optimizer), gradient_clip_val, norm)

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

    def on_train_end(self) -> None:
        self._trainable_during_fit = None
        self._vae_input = None

    def on_validation_model_zero_grad(self) -> None:
        """Releases the gradients before validation inside fit (at each epoch end), as Lightning's default does, walking
        only the trained weights: its ``self.zero_grad()`` walks every frozen weight too (7 ms on the tiny model)."""
        for param in self.trainable_parameters():
            param.grad = None

    def on_train_start(self) -> None:
        self._trainable_during_fit = [p for p in self.parameters() if p.requires_grad]
        # Checkpoint files already there are older than this fit; a resumed run's last finite weights
        # are those of the checkpoint it resumed from.
        self.nonfinite_guard.note_checkpoints(self.trainer, None)
        if self.trainer.ckpt_path:
            self.nonfinite_guard.note_resumed(self.trainer.ckpt_path, self.global_step)

    def on_train_batch_end(self, outputs: Any, batch: Batch, batch_idx: int) -> None:
        # Runs after the callbacks' hook: a checkpoint saved at this step is on disk now.
        self.nonfinite_guard.note_checkpoints(self.trainer, self.global_step)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        # Walking every module of UNet, VAE and text encoders costs ~2 ms per walk: during fit the list is
        # taken once (which weights train cannot change then).
        if self._trainable_during_fit is not None:
            return self._trainable_during_fit
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
        trainer = self.trainer
        clipped_with_grad_scaler = bool(trainer.gradient_clip_val) and (
            getattr(trainer.precision_plugin, "scaler", None) is not None
        )
        optimizer = build_optimizer(
            [p for p in self.parameters() if p.requires_grad], self.hparams.learning_rate, self.optimizer_config,
            clipped_with_grad_scaler,
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
