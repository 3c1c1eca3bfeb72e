"""VAE latents encoded once per run and sampled exactly as a fresh encoding (``--model.cache_latents``).

The VAE encodes an image into a Gaussian (its posterior); a training step's latent is one sample
``mean + std * eps`` of it. An image whose crop never changes has the same mean and std at every
step, so it is encoded once, at the start of fit, and each step draws only ``eps`` from the step's
generator: the latents follow the same distribution as when every image is encoded every step (they
differ only by the rounding of a VAE call on another batch). Cached:

- the PDM chunk's centre crops of the photos (always fixed);
- the class images, when their crop is fixed (generated class images are squares at the
  resolution; otherwise with ``center_crop``); other class images are encoded every step;
- the instance chunk when its crop is fixed too (square photos, or ``center_crop``): the same
  centre crops; random crops of other photos are encoded every step, or
- with ``latent_crops``, the whole resized photos: the instance chunk's random crop becomes a slice
  of the photo's latent, at multiples of 8 pixels (``data.crops.latent_crop_box``).

The cache is rebuilt at each fit start (never checkpointed) in a fixed order and batch size, so a
resumed run samples from bit-identical values; every DDP rank builds its own copy (no collectives).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from pdm_lightning.data.batch import Batch
from pdm_lightning.data.crops import LATENT_CELL, latent_crop_image, load_training_image
from pdm_lightning.data.dataset import DreamBoothDataset

ENCODE_BATCH_SIZE = 8  # fixed (not the training batch size): the cached values are the same whatever the run's settings


class Posterior(NamedTuple):
    """The VAE posterior of a stack of images: mean and standard deviation, [N, 4, h, w] each (the VAE's dtype)."""

    mean: torch.Tensor
    std: torch.Tensor

    def rows(self, index: torch.Tensor | slice) -> Posterior:
        return Posterior(self.mean[index], self.std[index])

    @staticmethod
    def cat(parts: Sequence[Posterior]) -> Posterior:
        if len(parts) == 1:
            return parts[0]
        return Posterior(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


def keep_vae_float32(vae: torch.nn.Module) -> None:
    """Makes the (float32) ``vae`` encode and decode in float32 also inside a 16-bit autocast region.

    SDXL's VAE overflows to NaN in float16, so under ``16-mixed`` the module keeps it in float32
    (``core.loading.vae_dtype``); autocast would still run its convolutions in float16 (the training step,
    samples and evaluation all run under the Trainer's autocast). Its ``encode`` / ``decode`` therefore
    switch autocast off and take their input in float32. The weights and their outputs are those of the
    float32 VAE (posteriors and decoded images in float32).
    """
    for name in ("encode", "decode"):
        method = getattr(vae, name)

        def in_float32(sample: torch.Tensor, *args: object, _method=method, **kwargs: object) -> object:  # noqa: ANN001
            with torch.autocast(sample.device.type, enabled=False):
                return _method(sample.to(torch.float32), *args, **kwargs)

        setattr(vae, name, in_float32)


def vae_posterior(
    vae: torch.nn.Module, pixel_values: torch.Tensor, vae_input: tuple[torch.device, torch.dtype] | None = None
) -> Posterior:
    """The VAE's posterior of ``pixel_values`` ([N, 3, H, W] in [-1, 1]). ``vae_input``: the VAE's device and dtype
    when the caller knows them (diffusers' ``vae.device`` and ``vae.dtype`` look for hooks in every submodule first:
    almost 1 ms at every training step)."""
    device, dtype = vae_input or (vae.device, vae.dtype)
    latent_dist = vae.encode(pixel_values.to(device=device, dtype=dtype)).latent_dist
    return Posterior(latent_dist.mean, latent_dist.std)


def sample_latents(posterior: Posterior, generator: torch.Generator | None, scaling_factor: float) -> torch.Tensor:
    """Scaled float32 latents ``(mean + std * eps) * scaling_factor``: exactly diffusers' ``latent_dist.sample``
    (one normal draw of the whole stack from ``generator``, in the posterior's dtype)."""
    mean, std = posterior
    eps = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return (mean + std * eps).float() * scaling_factor


@dataclass
class LatentCache:
    """The run's cached posteriors, on the VAE's device; ``rows`` serves a batch's cached chunk."""

    centre_crops: Posterior | None = None  # [P, 4, r, r]: each photo's centre crop (the PDM chunk; fixed instance crops)
    class_images: Posterior | None = None  # [K, 4, r, r]: each class image's fixed crop
    photos: list[Posterior] | None = None  # [1, 4, h_i, w_i] each: the whole resized photos (latent crops)
    latent_size: int = 0  # r: the resolution in latent cells

    def rows(self, chunk: str, batch: Batch) -> Posterior:
        """The posteriors of ``batch``'s rows of ``chunk`` (a chunk the batch serves from the cache)."""
        index = batch.cache_index(chunk)
        if chunk == "class":
            return self.class_images.rows(index)
        if chunk == "pdm" or batch.instance_cell is None:  # the PDM chunk, or fixed instance crops
            return self.centre_crops.rows(index)
        size = self.latent_size
        crops = [
            self.photos[photo].rows((slice(None), slice(None), slice(top, top + size), slice(left, left + size)))
            for photo, (top, left) in zip(index.tolist(), batch.instance_cell.tolist())
        ]
        return Posterior.cat(crops)


def batch_posterior(batch: Batch, encoded: Posterior | None, cache: LatentCache | None) -> Posterior:
    """Every row's posterior in the batch's row order: ``encoded`` (the VAE's posterior of ``batch.pixel_values``)
    for the chunks that came as pixels, the cache for the others."""
    parts, start = [], 0
    for chunk, size in batch.chunk_sizes():
        if batch.cache_index(chunk) is None:
            parts.append(encoded.rows(slice(start, start + size)))
            start += size
        elif cache is None:
            raise RuntimeError(
                f"The batch serves its {chunk} chunk from the latent cache but the model has none: the model builds it "
                "at fit start (on_fit_start); outside a fit, build the dataset without use_latent_cache."
            )
        else:
            parts.append(cache.rows(chunk, batch))
    return Posterior.cat(parts)


def encode_images(
    vae: torch.nn.Module,
    paths: Sequence[Path],
    load: Callable[[Path], torch.Tensor],
    batch_size: int,
    progress: tqdm | None = None,
) -> list[Posterior]:
    """The posteriors of ``paths`` (each loaded as pixels by ``load``), ``batch_size`` images per VAE call, in order."""
    batches = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start : start + batch_size]
        posterior = vae_posterior(vae, torch.stack([load(path) for path in chunk]))
        if not (torch.isfinite(posterior.mean).all() and torch.isfinite(posterior.std).all()):
            finite = torch.isfinite(posterior.mean).flatten(1).all(1) & torch.isfinite(posterior.std).flatten(1).all(1)
            bad = chunk[int((~finite).nonzero()[0])]
            raise RuntimeError(
                f"The VAE's encoding of {bad} is not finite (NaN or infinite): check the image; with a 16-bit VAE, "
                "train in float32 or bf16 (--trainer.precision), or turn the cache off (--model.cache_latents false)."
            )
        batches.append(posterior)
        if progress is not None:
            progress.update(len(chunk))
    return batches


def build_latent_cache(
    dataset: DreamBoothDataset,
    vae: torch.nn.Module,
    latent_crops: bool,
    context: Callable[[], AbstractContextManager] = nullcontext,
    show_progress: bool = False,
) -> tuple[LatentCache, list[str]]:
    """Encodes what ``dataset`` lets the model cache, then makes the dataset serve those chunks as indices.

    ``context`` is the training step's precision context (the same autocast as the per-step encoding).
    Returns the cache and notes for the user (a chunk that could not be cached, and why).
    """
    resolution = dataset.resolution
    instance_chunk = dataset.crops_are_fixed("instance")
    class_chunk = dataset.crops_are_fixed("class")
    pdm_chunk = dataset.pdm_targets is not None
    notes = []
    if dataset.class_images is not None and not class_chunk:
        notes.append(
            f"The class images are not all {resolution}x{resolution} squares, so their random crops change every step: "
            "the class chunk is VAE-encoded at every step (--data.center_crop true fixes their crops and caches them)."
        )
    photos = dataset.instance_images
    jobs: list[tuple[str, Sequence[Path], Callable[[Path], torch.Tensor], int]] = []
    if pdm_chunk or instance_chunk:
        jobs.append(("centre_crops", photos, lambda path: load_training_image(path, resolution, None), ENCODE_BATCH_SIZE))
    if class_chunk:
        jobs.append(("class_images", dataset.class_images, lambda path: load_training_image(path, resolution, None), ENCODE_BATCH_SIZE))
    if latent_crops and not instance_chunk:  # photos of different sizes: one per call
        jobs.append(("photos", photos, lambda path: latent_crop_image(path, resolution), 1))
    cache = LatentCache(latent_size=resolution // LATENT_CELL)
    total = sum(len(paths) for _, paths, _, _ in jobs)
    with torch.no_grad(), context(), tqdm(total=total, desc="Caching latents", unit="img", disable=not (show_progress and total)) as progress:
        for name, paths, load, batch_size in jobs:
            posteriors = encode_images(vae, paths, load, batch_size, progress)
            setattr(cache, name, posteriors if name == "photos" else Posterior.cat(posteriors))
    dataset.use_latent_cache(instance_chunk, class_chunk, pdm_chunk, latent_crops)
    return cache, notes
