"""Subject masks: user folders, CLIPSeg masks and their cache, crops aligned with the photo, latent/token weights."""

from __future__ import annotations

import json
import random
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import REPO_ROOT, folder_snapshot
from pdm_lightning.data import masks as masks_module
from pdm_lightning.data import segmentation
from pdm_lightning.data.crops import load_training_crop, load_training_image
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.data.masks import (
    MASK_MANIFEST_NAME,
    MaskSettings,
    check_mask_coverage,
    decode_mask,
    default_mask_prompt,
    find_user_masks,
    load_subject_mask,
    mask_overlay,
    resolve_instance_masks,
    write_mask_manifest,
)
from pdm_lightning.losses.masks import mask_to_latent, mask_to_tokens, token_grid
from pdm_lightning.losses.diffusion import per_sample_mse

EXIF_ORIENTATION = 0x0112


def save_image(path: Path, array: np.ndarray, orientation: int | None = None) -> Path:
    image = Image.fromarray(array)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        image.save(path, exif=exif)
    return path


def photo_with_subject(width: int, height: int, box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A grey photo with a red rectangle (the subject) and its exact mask."""
    photo = np.full((height, width, 3), 90, dtype=np.uint8)
    mask = np.zeros((height, width), dtype=np.uint8)
    left, top, right, bottom = box
    photo[top:bottom, left:right] = (230, 20, 20)
    mask[top:bottom, left:right] = 255
    return photo, mask


# ---------------------------------------------------------------------------------------------- user masks


def test_user_masks_match_by_stem_in_any_format(tmp_path: Path) -> None:
    photos, mask_dir = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), mask_dir.mkdir()
    photo, mask = photo_with_subject(40, 30, (5, 5, 25, 20))
    a = save_image(photos / "a.jpg", photo)
    b = save_image(photos / "b.png", photo)
    save_image(mask_dir / "a.png", mask)
    save_image(mask_dir / "b.bmp", mask)
    (mask_dir / "notes.txt").write_text("not a mask")
    assert find_user_masks([a, b], mask_dir) == {a: mask_dir / "a.png", b: mask_dir / "b.bmp"}

    save_image(mask_dir / "a.webp", mask)
    with pytest.raises(InputDataError, match=r"a\.jpg has 2 masks"):
        find_user_masks([a], mask_dir)


def test_missing_mask_names_the_photo_and_the_fix(tmp_path: Path) -> None:
    photos, mask_dir = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), mask_dir.mkdir()
    photo, mask = photo_with_subject(40, 30, (5, 5, 25, 20))
    a, b = save_image(photos / "a.jpg", photo), save_image(photos / "b.jpg", photo)
    save_image(mask_dir / "a.png", mask)
    settings = MaskSettings(instance_mask_dir=str(mask_dir), mask_instance_loss=True)
    with pytest.raises(InputDataError, match=r"no mask for 1 photo\(s\): b\.jpg.*b\.png.*auto_mask_model"):
        resolve_instance_masks([a, b], settings)
    with pytest.raises(InputDataError, match="is not a folder"):
        resolve_instance_masks([a], MaskSettings(instance_mask_dir=str(tmp_path / "nope"), mask_instance_loss=True))


def test_mask_modes_and_exif(tmp_path: Path) -> None:
    # Transparent = background, whatever colour the hidden pixels hold.
    rgba = np.zeros((4, 6, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[:, :3, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    assert np.array_equal(np.asarray(decode_mask(tmp_path / "alpha.png"))[0], [255, 255, 255, 0, 0, 0])
    # 16-bit white is white, not clipped noise.
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert np.asarray(decode_mask(tmp_path / "deep.png")).min() == 255
    # A mask stored sideways with an EXIF rotation, like its photo, lines up with the upright photo.
    photo, mask = photo_with_subject(40, 30, (0, 0, 10, 30))
    photo_path = save_image(tmp_path / "p.jpg", np.ascontiguousarray(np.rot90(photo, 1)), orientation=6)
    mask_path = save_image(tmp_path / "p.png", np.ascontiguousarray(np.rot90(mask, 1)), orientation=6)
    loaded = load_subject_mask(mask_path, photo_path)
    assert loaded.size == (40, 30)
    assert np.array_equal(np.asarray(loaded), mask)


def test_size_mismatch_and_unreadable_mask(tmp_path: Path) -> None:
    photo, mask = photo_with_subject(80, 60, (10, 10, 50, 40))
    photo_path = save_image(tmp_path / "p.png", photo)
    half = save_image(tmp_path / "half.png", np.asarray(Image.fromarray(mask).resize((40, 30), Image.NEAREST)))
    resized = load_subject_mask(half, photo_path)
    assert resized.size == (80, 60)
    assert abs(float(np.asarray(resized).mean()) - float(mask.mean())) < 3.0

    square = save_image(tmp_path / "square.png", np.zeros((60, 60), dtype=np.uint8))
    with pytest.raises(InputDataError, match=r"square\.png is 60x60 px but its photo .*p\.png is 80x60 px"):
        load_subject_mask(square, photo_path)

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputDataError, match=r"broken\.png cannot be read.*greyscale PNG"):
        load_subject_mask(broken, photo_path)


EXAMPLES = REPO_ROOT / "examples"


def test_bundled_dog_masks_refuse_the_backpack_photos() -> None:
    """Issue 11, fault 4: the dog masks were silently applied to another subject's same-named, same-sized photos."""
    backpack = sorted((EXAMPLES / "backpack").glob("*.jpg"))
    dog_masks = EXAMPLES / "dog_masks"
    # Names and sizes match, so neither can tell the masks are another subject's: only the manifest can.
    assert [p.stem for p in backpack] == [p.stem for p in sorted(dog_masks.glob("*.png"))]
    assert {Image.open(p).size for p in [*backpack, *dog_masks.glob("*.png")]} == {(256, 256)}
    settings = MaskSettings(instance_mask_dir=str(dog_masks), mask_instance_loss=True)
    with pytest.raises(
        InputDataError,
        match=r"drawn for other photos \(5 of 5, per .*dog_masks/masks\.json\): 00\.png was drawn for a photo 00\.jpg "
        r"with sha256 3c931c544e9e\.\.\., but .*backpack/00\.jpg has sha256 .*Point --data\.masks\.instance_mask_dir at "
        r"this subject's masks, or remove the mask options",
    ):
        resolve_instance_masks(backpack, settings)


def test_bundled_dog_masks_still_fit_the_dog_photos(instance_dir: Path) -> None:
    photos = sorted(instance_dir.glob("*.jpg"))  # a copy of examples/dog: same bytes, another folder
    settings = MaskSettings(instance_mask_dir=str(EXAMPLES / "dog_masks"), mask_instance_loss=True)
    resolved = resolve_instance_masks(photos, settings)
    assert resolved == {photo: EXAMPLES / "dog_masks" / f"{photo.stem}.png" for photo in photos}
    coverages = masks_module.validate_masks(resolved)
    assert all(0.05 < coverage < 0.95 for coverage in coverages.values())


def test_a_folder_without_manifest_needs_masks_of_the_photos_exact_size(tmp_path: Path) -> None:
    photos, mask_dir = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), mask_dir.mkdir()
    photo, mask = photo_with_subject(80, 60, (10, 10, 50, 40))
    a, b = save_image(photos / "a.jpg", photo), save_image(photos / "b.jpg", photo)
    save_image(mask_dir / "a.png", mask)
    save_image(mask_dir / "b.png", mask)
    settings = MaskSettings(instance_mask_dir=str(mask_dir), mask_instance_loss=True)
    before = folder_snapshot(mask_dir)
    assert resolve_instance_masks([a, b], settings) == {a: mask_dir / "a.png", b: mask_dir / "b.png"}

    # The same picture at half scale is no longer taken on trust: it names both files and both fixes.
    save_image(mask_dir / "b.png", np.asarray(Image.fromarray(mask).resize((40, 30), Image.NEAREST)))
    with pytest.raises(
        InputDataError,
        match=r"1 mask\(s\) of .*masks do not have their photo's size .*mask .*masks/b\.png is 40x30 px but its photo "
        r".*photos/b\.jpg is 80x60 px.*export each mask at its photo's size.*write_mask_manifest",
    ):
        resolve_instance_masks([a, b], settings)
    assert not (mask_dir / MASK_MANIFEST_NAME).exists()  # a run never writes into the mask folder

    # Recorded in a manifest, the scaled mask is known to be this photo's and is resized to it.
    write_mask_manifest(mask_dir, photos)
    assert set(json_records(mask_dir)) == {"a.png", "b.png"}
    assert resolve_instance_masks([a, b], settings) == {a: mask_dir / "a.png", b: mask_dir / "b.png"}
    assert np.asarray(load_subject_mask(mask_dir / "b.png", b)).shape == (60, 80)

    # The recorded photo edited afterwards: its mask is refused, naming the photo and the mask.
    save_image(photos / "b.jpg", np.ascontiguousarray(photo[:, ::-1]))
    with pytest.raises(InputDataError, match=r"\(1 of 2, .*b\.png was drawn for a photo b\.jpg .*photos/b\.jpg has sha256"):
        resolve_instance_masks([a, b], settings)
    assert set(folder_snapshot(mask_dir)) == set(before) | {MASK_MANIFEST_NAME}


def test_a_mask_missing_from_the_manifest_needs_the_exact_size(tmp_path: Path) -> None:
    photos, mask_dir = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir(), mask_dir.mkdir()
    photo, mask = photo_with_subject(80, 60, (10, 10, 50, 40))
    a = save_image(photos / "a.jpg", photo)
    save_image(mask_dir / "a.png", mask)
    write_mask_manifest(mask_dir, photos)
    b = save_image(photos / "b.jpg", photo)  # added after the manifest was written
    save_image(mask_dir / "b.png", np.asarray(Image.fromarray(mask).resize((40, 30), Image.NEAREST)))
    settings = MaskSettings(instance_mask_dir=str(mask_dir), mask_instance_loss=True)
    with pytest.raises(InputDataError, match=r"masks/b\.png is 40x30 px but its photo .*b\.jpg is 80x60 px"):
        resolve_instance_masks([a, b], settings)
    save_image(mask_dir / "b.png", mask)
    assert resolve_instance_masks([a, b], settings)[b] == mask_dir / "b.png"


def test_an_unreadable_manifest_is_an_error_naming_it(tmp_path: Path) -> None:
    photo, mask = photo_with_subject(32, 32, (4, 4, 20, 20))
    (tmp_path / "masks").mkdir()
    photo_path = save_image(tmp_path / "a.png", photo)
    save_image(tmp_path / "masks" / "a.png", mask)
    settings = MaskSettings(instance_mask_dir=str(tmp_path / "masks"), mask_instance_loss=True)
    for text in ("{not json", '{"format": 2, "masks": {}}', '{"format": 1, "masks": {"a.png": {"photo": "a.png"}}}'):
        (tmp_path / "masks" / MASK_MANIFEST_NAME).write_text(text)
        with pytest.raises(InputDataError, match=r"Mask manifest .*masks/masks\.json cannot be read.*or delete it"):
            resolve_instance_masks([photo_path], settings)


def json_records(mask_dir: Path) -> dict[str, dict[str, str]]:
    return json.loads((mask_dir / MASK_MANIFEST_NAME).read_text())["masks"]


def test_coverage_reports(tmp_path: Path) -> None:
    where = (tmp_path / "m.png", tmp_path / "p.png")
    with pytest.raises(InputDataError, match="completely black"):
        check_mask_coverage(Image.new("L", (100, 100), 0), *where)
    with pytest.warns(UserWarning, match=r"covers 100\.0%"):
        check_mask_coverage(Image.new("L", (100, 100), 255), *where)
    speck = Image.new("L", (100, 100), 0)
    speck.paste(255, (0, 0, 5, 10))
    with pytest.warns(UserWarning, match=r"covers 0\.5%"):
        check_mask_coverage(speck, *where)
    half = Image.new("L", (100, 100), 0)
    half.paste(255, (0, 0, 50, 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_mask_coverage(half, *where) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- crops


@pytest.mark.parametrize("size", [(96, 64), (64, 112)])
def test_mask_crop_follows_the_image_crop(tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    photo, mask = photo_with_subject(width, height, (width // 3, height // 4, width - 8, height - 10))
    photo_path = save_image(tmp_path / "p.png", photo)
    mask_path = save_image(tmp_path / "m.png", np.asarray(Image.fromarray(mask).resize((width // 2, height // 2))))
    resolution = 32
    crops_seen = set()
    for seed in range(12):
        rng, reference_rng = random.Random(seed), random.Random(seed)
        image, mask_crop = load_training_crop(photo_path, resolution, rng, mask_path)
        # The image crop is exactly the unmasked dataset's, and the rng is left in the same state.
        assert torch.equal(image, load_training_image(photo_path, resolution, reference_rng))
        assert rng.getstate() == reference_rng.getstate()
        assert mask_crop.shape == (1, resolution, resolution)
        assert 0.0 <= mask_crop.min() and mask_crop.max() <= 1.0
        # Where the crop shows the red subject, the mask says subject, and nowhere else.
        red = (image[0] > 0.5) & (image[1] < -0.5)
        sure = (mask_crop[0] > 0.9) | (mask_crop[0] < 0.1)
        assert torch.equal(red[sure], (mask_crop[0] > 0.5)[sure])
        assert sure.float().mean() > 0.8
        crops_seen.add(round(float(mask_crop.mean()), 3))
    assert len(crops_seen) > 3  # the crops really moved


# ---------------------------------------------------------------------------------------------- latent, tokens


def test_soft_mask_to_latent_is_an_area_average() -> None:
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :, :12] = 1.0  # left 12 columns: latent columns 0 full, 1 half
    mask[1, :, :8, :] = 1.0
    latent = mask_to_latent(mask, (2, 2), "soft")
    assert torch.equal(latent[0, 0], torch.tensor([[1.0, 0.5], [1.0, 0.5]]))
    assert torch.equal(latent[1, 0], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        mask_to_latent(torch.zeros(1, 16, 16), (2, 2))


def test_mask_to_tokens_is_row_major_and_resizes() -> None:
    latent = torch.arange(12.0).reshape(1, 1, 3, 4)
    assert torch.equal(mask_to_tokens(latent, (3, 4), "soft"), torch.arange(12.0).reshape(1, 12))
    assert torch.equal(mask_to_tokens(latent, 12, "soft"), torch.arange(12.0).reshape(1, 12))
    # A diffusers attention layer lays tokens out as hidden_states.permute(0, 2, 3, 1).reshape(B, h * w, C).
    feature = torch.randn(1, 5, 3, 4)
    tokens = feature.permute(0, 2, 3, 1).reshape(1, 12, 5)
    assert torch.equal(tokens[0, 6], feature[0, :, 1, 2])
    assert mask_to_tokens(latent, 12, "soft")[0, 6] == latent[0, 0, 1, 2]

    coarse = mask_to_tokens(torch.ones(2, 1, 8, 8).tril(), (4, 4), "soft")
    assert coarse.shape == (2, 16) and coarse[0, 0] == pytest.approx(0.75)
    fine = mask_to_tokens(torch.ones(1, 1, 4, 4), (8, 8))
    assert fine.shape == (1, 64) and torch.allclose(fine, torch.ones(1, 64))
    assert token_grid(4096, (64, 64)) == (64, 64)
    assert token_grid(25, (9, 9)) == (5, 5)
    assert token_grid(8, (4, 8)) == (2, 4)
    with pytest.raises(ValueError, match="do not form a grid"):
        token_grid(10, (8, 8))


def test_binary_masks_count_every_covered_cell_as_subject() -> None:
    # A hand-made 32 x 32 mask over a 4 x 4 latent (8 px cells): a 16 x 16 square at pixels 3..18
    # touches cells 0, 1 and 2 in each direction (9 cells), of which only cell (1, 1) is fully covered.
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 3:19, 3:19] = 1.0
    binary, soft = mask_to_latent(mask, (4, 4)), mask_to_latent(mask, (4, 4), "soft")
    expected = torch.zeros(4, 4)
    expected[:3, :3] = 1.0
    assert torch.equal(binary[0, 0], expected) and int(binary.sum()) == 9
    assert soft[0, 0, 1, 1] == 1.0 and soft[0, 0, 0, 0] == pytest.approx(25 / 64)
    assert soft[0, 0, 2, 2] == pytest.approx(9 / 64) and int((soft == 1).sum()) == 1
    assert soft.sum().item() == pytest.approx(256 / 64)  # area weights add up to the covered area
    # One pixel of subject is enough to make its cell subject; an empty mask stays empty.
    speck = torch.zeros(1, 1, 32, 32)
    speck[..., 31, 0] = 1.0
    assert mask_to_latent(speck, (4, 4))[0, 0, 3, 0] == 1.0 and int(mask_to_latent(speck, (4, 4)).sum()) == 1
    assert int(mask_to_latent(torch.zeros(1, 1, 32, 32), (4, 4)).sum()) == 0
    # Tokens: a coarser grid counts any covered cell, a finer one stays 0 / 1.
    coarse = mask_to_tokens(binary, (2, 2))
    assert torch.equal(coarse, torch.tensor([[1.0, 1.0, 1.0, 1.0]]))  # cell (2, 2) reaches every quadrant
    assert torch.equal(mask_to_tokens(mask_to_latent(speck, (4, 4)), (2, 2)), torch.tensor([[0.0, 0.0, 1.0, 0.0]]))
    fine = mask_to_tokens(binary, (8, 8))
    assert set(fine.unique().tolist()) == {0.0, 1.0} and int(fine.sum()) == 36
    assert torch.equal(mask_to_tokens(binary, 16), binary.flatten(1))
    assert torch.equal(mask_to_tokens(soft, (2, 2), "soft"), F.avg_pool2d(soft, 2).flatten(1))


def test_token_mask_restricts_the_pdm_mean() -> None:
    student, teacher = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    pixel_mask = torch.zeros(2, 1, 32, 32)
    pixel_mask[:, :, :16, :16] = 1.0  # top-left quarter: tokens (0..1, 0..1) of the 4x4 grid
    weights = mask_to_tokens(mask_to_latent(pixel_mask, (4, 4)), 16)
    subject = [0, 1, 4, 5]
    expected = ((student[:, subject] - teacher[:, subject]) ** 2).mean(dim=(1, 2))
    assert torch.allclose(per_sample_mse(student, teacher, weights[..., None]), expected)


# ---------------------------------------------------------------------------------------------- overlay, prompt, settings


def test_mask_overlay_tints_only_the_subject() -> None:
    image = Image.new("RGB", (4, 2), (0, 100, 200))
    mask = Image.new("L", (4, 2), 0)
    mask.paste(255, (0, 0, 2, 2))
    out = np.asarray(mask_overlay(image, mask, color=(255, 0, 0), alpha=0.5)).astype(int)
    assert np.array_equal(out[0, 3], [0, 100, 200])
    assert np.abs(out[0, 0] - [128, 50, 100]).max() <= 1
    assert mask_overlay(image, mask.resize((8, 4)), alpha=0.5).size == (4, 2)


def test_default_prompt_and_settings() -> None:
    assert default_mask_prompt("a photo of dog") == "dog"
    assert default_mask_prompt("A picture of a red backpack") == "red backpack"
    assert default_mask_prompt("teapot") == "teapot"
    with pytest.raises(InputDataError, match="auto_mask_prompt"):
        default_mask_prompt(None)
    with pytest.raises(InputDataError, match="threshold"):
        MaskSettings(threshold=1.0)
    with pytest.raises(InputDataError, match="need masks"):
        MaskSettings(mask_pdm_loss=True).check_sources()
    with pytest.raises(InputDataError, match="mask_prior_loss needs auto_mask_model"):
        MaskSettings(instance_mask_dir="m", mask_prior_loss=True).check_sources()
    with pytest.warns(UserWarning, match="no loss uses them"):
        MaskSettings(instance_mask_dir="m").check_sources()


# ---------------------------------------------------------------------------------------------- CLIPSeg


def build_tiny_clipseg(folder: Path) -> Path:
    """A random CLIPSeg (32 px input, 2-layer encoders) with the project's tiny tokenizer and a PIL CLIP processor."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from pdm_lightning.tiny import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(folder / "tokenizer-files")
    layers = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPSegConfig(
        text_config={
            **layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=32,
        reduce_dim=16,
        extract_layers=[0, 1],
        decoder_num_attention_heads=2,
        decoder_intermediate_size=32,
    )
    # CLIP's default geometry (shortest edge + centre crop): load_clipseg must keep the whole photo.
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model_dir = folder / "clipseg"
    CLIPSegForImageSegmentation(config).save_pretrained(model_dir)
    CLIPSegProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def tiny_clipseg_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clipseg(tmp_path_factory.mktemp("clipseg"))


def test_segment_batch_maps_the_model_output_onto_the_whole_photo(tiny_clipseg_dir: Path) -> None:
    """With a stand-in model whose logits are the red channel, a red subject comes back where it is."""
    model, processor = segmentation.load_clipseg(str(tiny_clipseg_dir), None, "cpu")
    assert processor.image_processor.do_center_crop is False

    class RedIsSubject(torch.nn.Module):
        config = model.config

        def __init__(self) -> None:
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, pixel_values: torch.Tensor, **_: torch.Tensor) -> types.SimpleNamespace:
            return types.SimpleNamespace(logits=pixel_values[:, 0] - pixel_values[:, 1])

    wide, wide_mask = photo_with_subject(120, 60, (0, 0, 30, 60))  # the left quarter: a centre crop would lose it
    tall, tall_mask = photo_with_subject(48, 96, (0, 72, 48, 96))
    images = [Image.fromarray(wide), Image.fromarray(tall)]
    masks = segmentation.segment_batch(RedIsSubject(), processor, images, "dog", threshold=0.5)
    for mask, expected in zip(masks, (wide_mask > 0, tall_mask > 0)):
        assert mask.shape == expected.shape
        assert (mask == expected).mean() > 0.95


def test_auto_masks_are_cached_and_reused_without_the_model(
    tiny_clipseg_dir: Path, instance_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = sorted(instance_dir.iterdir())[:3]
    before = folder_snapshot(instance_dir)
    cache = tmp_path / "cache"
    first = segmentation.compute_auto_masks(photos, "dog", str(tiny_clipseg_dir), threshold=0.5, cache_dir=cache, batch_size=2)
    assert list(first) == photos and len(set(first.values())) == 3
    for photo, mask_file in first.items():
        mask = Image.open(mask_file)
        assert mask.mode == "L" and mask.size == Image.open(photo).size
        assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert folder_snapshot(instance_dir) == before

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded although every mask is cached")

    monkeypatch.setattr(segmentation, "load_clipseg", must_not_load)
    assert segmentation.compute_auto_masks(photos, "dog", str(tiny_clipseg_dir), threshold=0.5, cache_dir=cache) == first
    # Another prompt or threshold is another mask.
    with pytest.raises(AssertionError, match="was loaded"):
        segmentation.compute_auto_masks(photos, "cat", str(tiny_clipseg_dir), threshold=0.5, cache_dir=cache)
    with pytest.raises(AssertionError, match="was loaded"):
        segmentation.compute_auto_masks(photos, "dog", str(tiny_clipseg_dir), threshold=0.4, cache_dir=cache)


def test_user_masks_first_then_computed(tiny_clipseg_dir: Path, instance_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos = sorted(instance_dir.iterdir())[:2]
    mask_dir = tmp_path / "my-masks"
    mask_dir.mkdir()
    user_mask = np.zeros((256, 256), dtype=np.uint8)
    user_mask[64:192, 64:192] = 255
    save_image(mask_dir / f"{photos[0].stem}.png", user_mask)
    snapshots = folder_snapshot(instance_dir), folder_snapshot(mask_dir)
    # The random tiny model may well return an empty mask; this test is about where masks come from.
    monkeypatch.setattr(masks_module, "validate_masks", lambda pairs: {p: 0.5 for p in pairs})
    settings = MaskSettings(
        instance_mask_dir=str(mask_dir), auto_mask_model=str(tiny_clipseg_dir), cache_dir=str(tmp_path / "cache"),
        mask_instance_loss=True,
    )
    resolved = resolve_instance_masks(photos, settings, class_prompt="a photo of dog")
    assert resolved[photos[0]] == mask_dir / f"{photos[0].stem}.png"
    assert resolved[photos[1]].parent == tmp_path / "cache"
    assert (folder_snapshot(instance_dir), folder_snapshot(mask_dir)) == snapshots


def test_unloadable_mask_model_is_an_input_error(tmp_path: Path, instance_dir: Path) -> None:
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(InputDataError, match=r"auto_mask_model .*not-a-model.* cannot be loaded as CLIPSeg"):
        segmentation.compute_auto_masks(
            sorted(instance_dir.iterdir())[:1], "dog", str(tmp_path / "not-a-model"), cache_dir=tmp_path / "cache"
        )


def test_class_masks_warn_on_class_images_without_the_subject(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo, mask = photo_with_subject(32, 32, (4, 4, 20, 20))
    images = [save_image(tmp_path / f"class{i}.png", photo) for i in range(3)]
    found = save_image(tmp_path / "found.png", mask)
    nothing = save_image(tmp_path / "nothing.png", np.zeros_like(mask))
    calls = []

    def fake_compute(paths: list[Path], prompt: str, **kwargs: object) -> dict[Path, Path]:
        calls.append(prompt)
        return {path: (nothing if path.name == "class1.png" else found) for path in paths}

    monkeypatch.setattr(segmentation, "compute_auto_masks", fake_compute)
    settings = MaskSettings(auto_mask_model="some/clipseg", mask_prior_loss=True)
    with pytest.warns(UserWarning, match=r"found no 'dog' in 1 of 3 class images \(class1\.png\)"):
        resolved = masks_module.resolve_class_masks(images, settings, class_prompt="a photo of dog")
    assert resolved[images[1]] == nothing and calls == ["dog"]


def test_class_masks_are_checked_without_decoding_the_class_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """setup() checks hundreds of class masks on every rank: only the (photo-sized) mask files are read."""
    photo, mask = photo_with_subject(32, 32, (4, 4, 20, 20))
    images = [save_image(tmp_path / f"class{i}.png", photo) for i in range(2)]
    found = save_image(tmp_path / "found.png", mask)
    monkeypatch.setattr(segmentation, "compute_auto_masks", lambda paths, prompt, **_: {path: found for path in paths})

    def no_photo_decoding(path: Path) -> Image.Image:
        raise AssertionError(f"decoded the class image {path}")

    monkeypatch.setattr(masks_module, "load_rgb_image", no_photo_decoding)
    settings = MaskSettings(auto_mask_model="some/clipseg", mask_prior_loss=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a found subject: no warning
        assert masks_module.resolve_class_masks(images, settings, class_prompt="a photo of dog") == dict.fromkeys(images, found)


def test_an_empty_user_mask_stops_the_run(tmp_path: Path) -> None:
    photo, mask = photo_with_subject(32, 32, (4, 4, 20, 20))
    (tmp_path / "masks").mkdir()
    photo_path = save_image(tmp_path / "a.png", photo)
    save_image(tmp_path / "masks" / "a.png", np.zeros_like(mask))
    settings = MaskSettings(instance_mask_dir=str(tmp_path / "masks"), mask_instance_loss=True)
    with pytest.raises(InputDataError, match=r"masks/a\.png of .*a\.png is completely black"):
        resolve_instance_masks([photo_path], settings)
