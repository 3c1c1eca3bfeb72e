"""Cached VAE latents and prompt embeddings: fewer encoder calls per step, the same training distribution, exact resumes."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EXAMPLE_SUBJECT, REPO_ROOT, build_cli
from pdm_lightning.data.batch import Batch, collate_examples
from pdm_lightning.core.images import load_rgb_image
from pdm_lightning.data.crops import (
    latent_crop_box,
    latent_crop_image,
    load_training_image,
    resize_shorter_side,
    to_tensor,
)
from pdm_lightning.data.dataset import DreamBoothDataset
from pdm_lightning.training.latent_cache import LatentCache, Posterior, batch_posterior, build_latent_cache, vae_posterior
from pdm_lightning.training.text_cache import PromptCache
from test_resume import InterruptAtStep, trained_weights

PRIOR = ("--data.with_prior_preservation", "true", "--data.num_class_images", "3",
         "--data.class_generation.num_inference_steps", "2")
PDM = ("--model.pdm", "{}", "--model.pdm.inversion_steps", "4")
QUIET = ("--samples.at_fit_end", "false")


@pytest.fixture
def cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
    return tmp_path


def cut_to_wide(source: Path, pattern: str, folder: Path) -> Path:
    """The 256 px squares of ``source`` cut to landscape (even) and portrait (odd) shapes into ``folder``."""
    folder.mkdir()
    for index, image in enumerate(sorted(source.glob(pattern))):
        box = (0, 32, 256, 224) if index % 2 == 0 else (32, 0, 224, 256)
        Image.open(image).crop(box).save(folder / image.name, quality=95)
    return folder


@pytest.fixture
def wide_photos(tmp_path: Path) -> Path:
    """The example photos cut so that their random crops really move (at 64 px: 85 x 64 or 64 x 85 after the
    resize, three latent-cell offsets along the long side)."""
    return cut_to_wide(EXAMPLE_SUBJECT, "*.jpg", tmp_path / "wide")


@pytest.fixture
def wide_masks(tmp_path: Path) -> Path:
    """The example subject masks cut as ``wide_photos``."""
    return cut_to_wide(REPO_ROOT / "examples" / "dog_masks", "*.png", tmp_path / "wide_masks")


class EncoderCalls(L.Callback):
    """Counts the VAE encoder's and the text encoder's calls before training (rows per call) and in each step
    (rows per call in units of the batch size: 3 = instance + class + PDM chunks)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[int]] = {"vae": [], "text": []}
        self.at_start: dict[str, list[int]] = {}
        self.per_step: list[dict[str, list[int]]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Callbacks' on_fit_start runs before the module's, which builds the caches.
        for name, part in (("vae", pl_module.vae.encoder), ("text", pl_module.text_encoder)):
            part.register_forward_pre_hook(lambda _m, args, name=name: self.calls[name].append(args[0].shape[0]))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        if not self.per_step:
            self.at_start = {name: list(calls) for name, calls in self.calls.items()}
        self._clear()
        self.batch_size = batch.num_instance

    def on_train_batch_end(self, *args: object) -> None:
        self.per_step.append({name: [rows / self.batch_size for rows in calls] for name, calls in self.calls.items()})
        self._clear()

    def _clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()


# Encoder calls in each step, as the chunks each call covers (a step has 3: instance, class and PDM).
CASES = {
    # Default: the class chunk (generated squares) and the PDM centre crops come from the cache.
    "default": ([], {"vae": [1], "text": []}),
    # Square photos have one fixed crop: the instance chunk is their cached centre crops too.
    "square_photos": ([], {"vae": [], "text": []}),
    "latent_crops": (["--model.latent_crops", "true"], {"vae": [], "text": []}),
    "cache_off": (["--model.cache_latents", "false", "--model.cache_text_embeddings", "false"], {"vae": [3], "text": [3]}),
    "trained_text_encoder": (["--model.train_text_encoder", "true"], {"vae": [1], "text": [3]}),
}


@pytest.mark.parametrize("case", CASES)
def test_encoder_calls_per_step(
    cache_env: Path, tiny_model_dir: Path, wide_photos: Path, instance_dir: Path, case: str
) -> None:
    overrides, expected = CASES[case]
    photos = instance_dir if case == "square_photos" else wide_photos
    cli = build_cli(cache_env / "run", tiny_model_dir, photos, *PRIOR, *PDM, *QUIET,
                    "--trainer.max_steps", "3", "--model.train_text_encoder", "false", *overrides)
    counter = EncoderCalls()
    cli.trainer.callbacks.append(counter)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)

    assert counter.per_step == [expected] * 3
    # Once per run, before the first step: the 5 centre crops and the 3 class images (one VAE call each,
    # batches of up to 8), with latent crops the 5 whole photos one by one; the two prompts in one call.
    cached_latents = case != "cache_off"
    assert counter.at_start["vae"] == ([5, 3] if cached_latents else []) + ([1] * 5 if case == "latent_crops" else [])
    assert counter.at_start["text"] == ([2] if case in ("default", "square_photos", "latent_crops") else [])
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_pdm"])


def _prepared(run: Path, model_dir: Path, photos: Path, *overrides: str):  # noqa: ANN202
    """Model and data module of a prior + PDM run, prepared and set up without a Trainer fit."""
    cli = build_cli(run, model_dir, photos, *PRIOR, *PDM, *QUIET, "--model.pdm.dtype", "float32", *overrides)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    cli.model.configure_model()
    return cli.model, cli.datamodule.train_dataset


def test_cached_latents_have_the_fresh_encodings_distribution(cache_env: Path, tiny_model_dir: Path, wide_photos: Path) -> None:
    module, dataset = _prepared(cache_env / "run", tiny_model_dir, wide_photos)
    keys = [(0, 11), (3, 12)]
    per_step = collate_examples([dataset[key] for key in keys])  # before the cache: every chunk as pixels
    cache, notes = build_latent_cache(dataset, module.vae, latent_crops=False)
    assert not notes and dataset.cached_class_chunk and dataset.cached_pdm_chunk
    cached = collate_examples([dataset[key] for key in keys])
    assert cached.pixel_values.shape[0] == 2 and cached.class_index.tolist() == [0, 0]  # 3 class images: 0 % 3, 3 % 3
    assert cached.pdm_index.tolist() == [0, 3] and torch.equal(cached.input_ids, per_step.input_ids)

    # The cached posterior is the VAE's posterior of the same crop (one image per call here).
    for index, path in enumerate(dataset.class_images):
        fresh = vae_posterior(module.vae, load_training_image(path, dataset.resolution, None)[None])
        torch.testing.assert_close(cache.class_images.mean[index : index + 1], fresh.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cache.class_images.std[index : index + 1], fresh.std, rtol=1e-5, atol=1e-6)

    # A step's latent is mean + std * eps, eps one normal draw of the whole batch from the step's generator.
    module.latent_cache = cache
    latents = module.sample_latents(cached, torch.Generator().manual_seed(7))
    posterior = batch_posterior(cached, vae_posterior(module.vae, cached.pixel_values), cache)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.equal(latents, (posterior.mean + posterior.std * eps) * module.vae.config.scaling_factor)
    # ... and the same draw as when every chunk is encoded at the step: equal up to the VAE's rounding.
    module.latent_cache = None
    fresh_latents = module.sample_latents(per_step, torch.Generator().manual_seed(7))
    torch.testing.assert_close(latents, fresh_latents, rtol=1e-5, atol=1e-5)


def test_the_workers_decode_no_cached_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = sorted(EXAMPLE_SUBJECT.glob("*.jpg"))
    classes = [tmp_path / f"c{i}.png" for i in range(3)]
    for path in classes:
        Image.new("RGB", (64, 64), (40, 90, 200)).save(path)
    dataset = DreamBoothDataset(photos, torch.zeros(77, dtype=torch.long), 64, class_images=classes,
                                class_input_ids=torch.ones(77, dtype=torch.long))
    dataset.use_latent_cache(instance_chunk=False, class_chunk=True, pdm_chunk=False, latent_crops=True)
    decoded: list[Path] = []
    monkeypatch.setattr("pdm_lightning.data.dataset.load_training_crop", lambda path, *a, **k: decoded.append(path))
    examples = [dataset[(index, index)] for index in range(5)]
    assert not decoded
    assert all(e.instance_pixel_values is None and e.class_pixel_values is None for e in examples)
    assert [e.class_index for e in examples] == [0, 1, 2, 0, 1]
    assert collate_examples(examples).pixel_values is None


def test_class_images_with_random_crops_are_encoded_every_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder="vae")
    photos = sorted(EXAMPLE_SUBJECT.glob("*.jpg"))
    classes = [tmp_path / f"c{i}.png" for i in range(2)]
    for index, path in enumerate(classes):  # not square: random crops
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (64, 96, 3), dtype=np.uint8)).save(path)
    ids = torch.zeros(77, dtype=torch.long)
    dataset = DreamBoothDataset(photos, ids, 64, class_images=classes, class_input_ids=ids)
    uncached = [dataset[(index, 100 + index)] for index in range(4)]
    cache, notes = build_latent_cache(dataset, vae, latent_crops=False)
    assert cache.class_images is None and not dataset.cached_class_chunk
    assert len(notes) == 1 and "class chunk is VAE-encoded at every step" in notes[0]
    # The square photos' fixed crops are cached; the class crops drawn after them are the same as without the cache.
    assert dataset.cached_instance_chunk and cache.centre_crops.mean.shape == (5, 4, 8, 8)
    for index, before in enumerate(uncached):
        example = dataset[(index, 100 + index)]
        assert example.instance_pixel_values is None and example.instance_index == index
        assert torch.equal(example.class_pixel_values, before.class_pixel_values)
    assert len({tuple(e.class_pixel_values.flatten()[:8].tolist()) for e in uncached}) > 1  # the class crops do move
    # Centre crops are fixed: then they are cached.
    centred = DreamBoothDataset(photos, ids, 64, center_crop=True, class_images=classes, class_input_ids=ids)
    cache, notes = build_latent_cache(centred, vae, latent_crops=False)
    assert not notes and cache.class_images.mean.shape == (2, 4, 8, 8) and centred[(0, 3)].class_index == 0


def test_a_latent_crop_is_a_crop_of_the_resized_photo_at_latent_cell_offsets(wide_photos: Path, wide_masks: Path) -> None:
    photo = min(wide_photos.glob("*.jpg"))  # 256 x 192: 85 x 64 at 64 px
    whole = latent_crop_image(photo, 64)
    assert whole.shape == (3, 64, 80)  # cut to whole latent cells
    resized = resize_shorter_side(load_rgb_image(photo), 64)
    boxes = {latent_crop_box(*resized.size, 64, random.Random(seed)) for seed in range(40)}
    assert boxes == {(0, 0, 64, 64), (8, 0, 72, 64), (16, 0, 80, 64)}  # every latent-cell offset, no other
    for box in boxes:  # the encoded picture holds exactly that crop of the resized photo
        left, top, right, bottom = box
        assert torch.equal(whole[:, top:bottom, left:right], to_tensor(resized.crop(box)))
    assert latent_crop_box(*resized.size, 64, None) == (8, 0, 72, 64)  # center_crop: the middle offset
    # The dataset hands out the crop's cell and the same crop of the subject mask.
    mask_path = wide_masks / f"{photo.stem}.png"
    dataset = DreamBoothDataset([photo], torch.zeros(77, dtype=torch.long), 64, instance_masks={photo: mask_path})
    dataset.use_latent_cache(instance_chunk=False, class_chunk=False, pdm_chunk=False, latent_crops=True)
    resized_mask = Image.open(mask_path).convert("L").resize(resized.size, Image.BILINEAR)
    for seed in range(6):
        example = dataset[(0, seed)]
        box = latent_crop_box(*resized.size, 64, random.Random(seed))
        assert example.instance_cell == (box[1] // 8, box[0] // 8) and example.instance_pixel_values is None
        expected = torch.from_numpy(np.asarray(resized_mask.crop(box), dtype=np.float32) / 255.0)[None]
        assert torch.equal(example.instance_mask, expected)


def test_a_cached_chunk_gets_the_centre_crop_mask_without_decoding_the_photo(wide_photos: Path, wide_masks: Path) -> None:
    photos = sorted(wide_photos.glob("*.jpg"))[:2]
    masks = {photo: wide_masks / f"{photo.stem}.png" for photo in photos}
    decoded = DreamBoothDataset(photos, torch.zeros(77, dtype=torch.long), 64, instance_masks=masks)
    cached = DreamBoothDataset(photos, torch.zeros(77, dtype=torch.long), 64, instance_masks=masks)
    cached.use_latent_cache(instance_chunk=False, class_chunk=False, pdm_chunk=False, latent_crops=True)
    for index in range(len(photos)):
        assert torch.equal(cached._centre_mask(index), decoded._centre_crop(index)[1])
    assert not cached._centre_crops  # no photo was decoded for its mask


def test_prompt_embeddings_are_the_text_encoders_rows(tiny_model_dir: Path) -> None:
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel.from_pretrained(tiny_model_dir, subfolder="text_encoder").eval()
    instance, other = torch.arange(77) % 50, torch.arange(77) % 30
    cache = PromptCache.encode([text_encoder], [(instance,), (other,), (instance,)])
    assert cache.input_ids[0].shape[0] == 2
    rows = torch.stack([other, instance, instance])
    with torch.no_grad():
        expected = text_encoder(rows)[0]
    torch.testing.assert_close(cache.lookup((rows,)).encoder_hidden_states, expected, rtol=1e-5, atol=1e-6)
    assert cache.lookup((torch.stack([instance, torch.arange(77) % 20]),)) is None  # an unknown prompt: computed as before


def test_resume_with_latent_crops_is_exact(cache_env: Path, tiny_model_dir: Path, wide_photos: Path, wide_masks: Path) -> None:
    """Cached class images, cached centre crops, latent crops of moving photos with their masks and cached
    prompts, resumed mid-epoch."""
    overrides = [*PRIOR, *PDM, *QUIET, "--model.latent_crops", "true", "--model.train_text_encoder", "false",
                 "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2", "--model.learning_rate", "1e-3",
                 "--data.masks.instance_mask_dir", str(wide_masks), "--data.masks.mask_instance_loss", "true"]
    straight = build_cli(cache_env / "straight", tiny_model_dir, wide_photos, *overrides)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    expected = trained_weights(straight.model)

    crashed = build_cli(cache_env / "resumed", tiny_model_dir, wide_photos, *overrides)
    crashed.trainer.callbacks.append(InterruptAtStep(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    resumed = build_cli(cache_env / "resumed", tiny_model_dir, wide_photos, *overrides)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert resumed.trainer.global_step == 5
    actual = trained_weights(resumed.model)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_a_latent_crop_slices_rows_by_top_and_columns_by_left() -> None:
    """(top, left) cells pick latent rows and columns of the whole photo's posterior, each row its own photo."""
    landscape = torch.arange(1 * 4 * 8 * 10, dtype=torch.float32).view(1, 4, 8, 10)
    portrait = -torch.arange(1 * 4 * 11 * 8, dtype=torch.float32).view(1, 4, 11, 8)
    cache = LatentCache(photos=[Posterior(landscape, landscape + 0.5), Posterior(portrait, portrait + 0.5)], latent_size=8)
    batch = Batch(pixel_values=None, input_ids=torch.zeros(2, 77, dtype=torch.long), num_instance=2,
                  instance_index=torch.tensor([0, 1]), instance_cell=torch.tensor([[0, 2], [3, 0]]))
    rows = cache.rows("instance", batch)
    assert torch.equal(rows.mean[0], landscape[0, :, 0:8, 2:10]) and torch.equal(rows.mean[1], portrait[0, :, 3:11, 0:8])
    assert torch.equal(rows.std, rows.mean + 0.5)
