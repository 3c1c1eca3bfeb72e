"""The same training step written as a plain PyTorch loop: no Lightning, none of our training code.

What the reference implementation (and diffusers' train_dreambooth.py) does every step: crop the photos, VAE-encode
every chunk (instance, class and PDM crops), run the text encoder on every prompt, one UNet forward over the whole
batch with a forward hook on the PDM layer, the DreamBooth + prior + PDM losses, backward, gradient clipping, AdamW.
The PDM targets are rows of the same teacher bank our run reads (built or reused through our bank code before the
loop; reading a row is the only part of ours inside the loop, besides the photo crop helper).

``python -m benchmarks`` times it against ``train.py`` on the same recipe, model and batch: the ratio is our
framework's overhead (or gain). tests/test_benchmarks.py checks that ``plain_loss`` equals our module's loss for the
same batch and noise. SD1.x / SD2.x models only (one text encoder).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.measure import FlopCount, PeakMemory, StepClock, step_result

PDM_LAYER = "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class LayerOutput:
    """A forward hook keeping ``layer``'s latest output (its graph too: the student's query backpropagates)."""

    def __init__(self, model: torch.nn.Module, layer: str) -> None:
        self.output: torch.Tensor | None = None
        model.get_submodule(layer).register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        self.output = output


@dataclass
class PlainModels:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor
    prediction_type: str
    query: LayerOutput | None
    trainable: list[torch.nn.Parameter]


def frozen_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else torch.float32


def load_models(model_dir: str, precision: str, device: torch.device, train_text_encoder: bool = False,
                lora: dict[str, Any] | None = None, pdm: bool = False) -> PlainModels:
    """The pipeline's parts as diffusers' DreamBooth example sets them up: frozen parts in the compute dtype."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")

    half = frozen_dtype(precision)
    train_text_encoder = train_text_encoder and lora is None
    vae.requires_grad_(False).eval().to(dtype=half)
    text_encoder.requires_grad_(train_text_encoder).to(dtype=torch.float32 if train_text_encoder else half)
    text_encoder.train(train_text_encoder)
    unet.train()
    if lora is not None:
        from peft import LoraConfig

        unet.requires_grad_(False).to(dtype=half)
        rank = int(lora["rank"])
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=lora.get("alpha") or rank,
                                    init_lora_weights=lora.get("init_lora_weights", "gaussian"), target_modules=LORA_TARGETS))
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()  # adapters train in float32
    for part in (text_encoder, vae, unet):
        part.to(device)
    trainable = [p for part in (unet, text_encoder) for p in part.parameters() if p.requires_grad]
    return PlainModels(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        alphas_cumprod=scheduler.alphas_cumprod.to(device),
        prediction_type=scheduler.config.prediction_type,
        query=LayerOutput(unet, PDM_LAYER) if pdm else None,  # after the adapters: the query includes their delta
        trainable=trainable,
    )


def plain_loss(
    models: PlainModels,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    num_instance: int,
    generator: torch.Generator,
    prior_loss_weight: float = 1.0,
    pdm_weight: float = 0.0,
    pdm_timesteps: torch.Tensor | None = None,
    teacher_queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """The step's loss. ``pixel_values`` / ``input_ids`` hold the instance chunk, the class chunk (if any) and the
    PDM chunk (``len(pdm_timesteps)`` rows, if any), in that order. Draws from ``generator`` in this order: the VAE
    latent sample, the noise, the instance and class timesteps."""
    device = pixel_values.device
    num_pdm = 0 if pdm_timesteps is None else len(pdm_timesteps)
    with torch.no_grad():
        latent_dist = models.vae.encode(pixel_values.to(models.vae.dtype)).latent_dist
        latents = latent_dist.sample(generator=generator).float() * models.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator, device=device)
    num_diffusion = len(latents) - num_pdm
    timesteps = torch.randint(0, len(models.alphas_cumprod), (num_diffusion,), generator=generator, device=device)
    if num_pdm:
        timesteps = torch.cat([timesteps, pdm_timesteps.to(timesteps)])
    abar = models.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise

    with torch.set_grad_enabled(models.text_encoder.training):
        prompt_embeds = models.text_encoder(input_ids)[0]
    prediction = models.unet(noisy, timesteps, prompt_embeds).sample[:num_diffusion]

    if models.prediction_type == "epsilon":
        target = noise
    else:  # v_prediction
        target = abar.sqrt() * noise - (1 - abar).sqrt() * latents
    per_sample = ((prediction.float() - target[:num_diffusion].float()) ** 2).mean(dim=(1, 2, 3))
    loss = per_sample[:num_instance].mean()
    if num_diffusion > num_instance:
        loss = loss + prior_loss_weight * per_sample[num_instance:].mean()
    if num_pdm:
        student = models.query.output[num_diffusion:]
        pdm = ((student.float() - teacher_queries.to(device).float()) ** 2).mean(dim=(1, 2)).mean()
        loss = loss + pdm_weight * pdm
    return loss


class PlainData:
    """The loop's batches: random crops of the photos (and class images) every step, the PDM chunk's centre crops,
    its timesteps drawn from the bank's trajectory and the bank's rows for them."""

    def __init__(self, spec: dict[str, Any], tokenizer: Any, bank: Any | None, seed: int = 0) -> None:
        from pdm_lightning.data.crops import load_training_crop

        self.crop = load_training_crop
        suffixes = (".jpg", ".jpeg", ".png")
        self.photos = sorted(p for p in Path(spec["photos"]).iterdir() if p.suffix.lower() in suffixes)
        self.class_images = None
        if spec.get("class_images"):
            found = sorted(p for p in Path(spec["class_images"]).iterdir() if p.suffix.lower() in suffixes)
            self.class_images = found[: spec["num_class_images"]]
        self.resolution, self.batch_size, self.bank = spec["resolution"], spec["batch_size"], bank
        self.rng = random.Random(seed)
        self.centre_crops: dict[int, torch.Tensor] = {}

        def ids(prompt: str) -> torch.Tensor:
            return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                             return_tensors="pt").input_ids[0]

        self.instance_ids, self.class_ids = ids(spec["instance_prompt"]), ids(spec["class_prompt"])

    def batch(self, step: int) -> dict[str, Any]:
        count = max(len(self.photos), len(self.class_images or ()))
        indices = [(step * self.batch_size + b) % count for b in range(self.batch_size)]
        photos = [i % len(self.photos) for i in indices]
        pixels = [self.crop(self.photos[i], self.resolution, self.rng)[0] for i in photos]
        ids = [self.instance_ids] * len(photos)
        if self.class_images is not None:
            pixels += [self.crop(self.class_images[i % len(self.class_images)], self.resolution, self.rng)[0] for i in indices]
            ids += [self.class_ids] * len(indices)
        batch: dict[str, Any] = {"num_instance": len(photos)}
        if self.bank is not None:
            timesteps = [self.rng.choice(self.bank.timesteps) for _ in photos]
            for i in photos:
                if i not in self.centre_crops:
                    self.centre_crops[i] = self.crop(self.photos[i], self.resolution, None)[0]
            pixels += [self.centre_crops[i] for i in photos]
            ids += [self.instance_ids] * len(photos)
            batch["pdm_timesteps"] = torch.tensor(timesteps)
            batch["teacher_queries"] = torch.stack([self.bank.item(i, t)["queries"] for i, t in zip(photos, timesteps)])
        batch["pixel_values"] = torch.stack(pixels)
        batch["input_ids"] = torch.stack(ids)
        return batch


def open_teacher_bank(spec: dict[str, Any], tokenizer: Any, device: torch.device) -> Any:
    """The bank our run of the same case reads (built or reused in the shared cache), row access only."""
    from pdm_lightning.core.loading import ModelSource
    from pdm_lightning.pdm.settings import PDMSettings
    from pdm_lightning.pdm.teacher import PDMTeacher

    pdm = spec["pdm"]
    settings = PDMSettings(teacher="bank", inversion_steps=int(pdm["inversion_steps"]), cache_dir=pdm["cache_dir"],
                           compute_dtype=pdm["compute_dtype"])
    teacher = PDMTeacher(settings, ModelSource(spec["model"]))
    photos = sorted(p for p in Path(spec["photos"]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    teacher.prepare(photos, spec["class_prompt"], spec["resolution"], device)
    return teacher.entries(photos, spec["class_prompt"], spec["resolution"], tokenizer)


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Trains ``warmup + steps`` timed steps (and one more under the FLOP counter) and reports like our cases."""
    if spec.get("pdm") and spec["pdm"]["teacher"] != "bank":
        raise ValueError("The plain loop reads bank rows only (no on-the-fly teacher).")
    device = torch.device(spec["device"])
    models = load_models(spec["model"], spec["precision"], device, spec["train_text_encoder"], spec["lora"],
                         pdm=spec["pdm"] is not None)
    bank = open_teacher_bank(spec, models.tokenizer, device) if spec["pdm"] else None
    data = PlainData(spec, models.tokenizer, bank)
    optimizer_settings = spec["optimizer"]
    optimizer = torch.optim.AdamW(
        models.trainable,
        lr=spec["learning_rate"],
        betas=(optimizer_settings.get("adam_beta1", 0.9), optimizer_settings.get("adam_beta2", 0.999)),
        weight_decay=optimizer_settings.get("adam_weight_decay", 1e-2),
        eps=optimizer_settings.get("adam_epsilon", 1e-8),
    )
    autocast = (
        torch.autocast(device.type, dtype=frozen_dtype(spec["precision"]))
        if spec["precision"].startswith(("bf16", "16")) else contextlib.nullcontext()
    )
    pdm_weight = spec["pdm"]["weight"] if spec["pdm"] else 0.0
    clock, memory, flops = StepClock(device), PeakMemory(device), FlopCount()
    timed = spec["warmup"] + spec["steps"]
    first_loss = None
    memory.reset()
    for step in range(timed + (1 if spec["count_flops"] else 0)):
        counting = flops.counting() if step == timed else contextlib.nullcontext()
        with counting:
            batch = data.batch(step)
            generator = torch.Generator(device).manual_seed(step)
            with autocast:
                loss = plain_loss(
                    models,
                    batch["pixel_values"].to(device),
                    batch["input_ids"].to(device),
                    batch["num_instance"],
                    generator,
                    spec["prior_loss_weight"],
                    pdm_weight,
                    batch.get("pdm_timesteps"),
                    batch.get("teacher_queries"),
                )
            loss.backward()
            if spec["gradient_clip_val"]:
                torch.nn.utils.clip_grad_norm_(models.trainable, spec["gradient_clip_val"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if first_loss is None:
            first_loss = loss.detach().item()
        if step < timed:
            clock.tick()
        if step == timed - 1:
            peak = memory.read()
    result = step_result(clock, spec["warmup"], spec["steps"], peak, memory, flops)
    result["first_loss"] = first_loss
    result["trained_parameters"] = sum(p.numel() for p in models.trainable)
    return result
