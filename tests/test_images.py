"""Decoding and checking the user's photos (core/images.py) and the training examples (data/crops.py, data/dataset.py, data/batch.py)."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from conftest import EXAMPLE_SUBJECT, folder_snapshot
from PIL import Image

from pdm_lightning.data.batch import Example, collate_examples
from pdm_lightning.data.dataset import DreamBoothDataset
from pdm_lightning.data.crops import crop_box, resize_shorter_side, to_tensor
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import list_image_files, load_rgb_image, to_rgb, validate_image_folder


def pixels(image):
    """The image's pixels as an (H, W, C) uint8 array."""
    return np.asarray(image)


# --- to_rgb -------------------------------------------------------------------------------------


def test_to_rgb_rgba_transparent_pixels_become_white():
    """Fully transparent pixels turn white (not their hidden colour); opaque ones keep their colour."""
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 20, 30, 0))
    image.putpixel((1, 0), (10, 20, 30, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (3, 1)
    out = pixels(rgb)[0]
    assert out[0].tolist() == [255, 255, 255]
    assert out[1].tolist() == [10, 20, 30]
    # Half-transparent black over white: about mid grey.
    assert np.all(np.abs(out[2].astype(int) - 127) <= 1)


def test_to_rgb_la_transparent_pixels_become_white():
    """LA (grey + alpha): transparent -> white, opaque grey -> the same grey in RGB."""
    image = Image.new("LA", (2, 1), (50, 0))
    image.putpixel((1, 0), (50, 255))
    out = pixels(to_rgb(image))[0]
    assert out.tolist() == [[255, 255, 255], [50, 50, 50]]


def test_to_rgb_palette_without_transparency():
    """A palette image maps through its palette."""
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    out = pixels(to_rgb(image))[0]
    assert out.tolist() == [[255, 0, 0], [0, 0, 255]]


def test_to_rgb_palette_with_transparency_from_a_png(tmp_path):
    """A palette PNG with a transparent index: that index becomes white, the others keep their colour."""
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    image.putpixel((1, 0), 1)
    path = tmp_path / "palette.png"
    image.save(path, transparency=0)
    with Image.open(path) as reopened:
        assert reopened.mode == "P" and "transparency" in reopened.info
    out = pixels(load_rgb_image(path))[0]
    assert out.tolist() == [[255, 255, 255], [0, 0, 255]]


def test_to_rgb_greyscale():
    """L: each grey level is copied to the three channels."""
    image = Image.new("L", (2, 1), 77)
    image.putpixel((1, 0), 200)
    assert pixels(to_rgb(image))[0].tolist() == [[77, 77, 77], [200, 200, 200]]


def test_to_rgb_cmyk():
    """CMYK: pure cyan-free magenta+yellow is red; full black ink is black."""
    image = Image.new("CMYK", (2, 1), (0, 255, 255, 0))
    image.putpixel((1, 0), (0, 0, 0, 255))
    assert pixels(to_rgb(image))[0].tolist() == [[255, 0, 0], [0, 0, 0]]


def test_to_rgb_16_bit_greyscale_is_rescaled_not_clipped():
    """I;16: 65535 -> 255, 32768 -> 128, 0 -> 0 (Pillow's plain convert would clip all but 0 to white)."""
    image = Image.new("I;16", (3, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32768)
    image.putpixel((2, 0), 0)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert pixels(rgb)[0].tolist() == [[255, 255, 255], [128, 128, 128], [0, 0, 0]]


def test_16_bit_png_loads_with_its_grey_levels(tmp_path):
    """A 16-bit greyscale PNG read from disk keeps its mid grey instead of turning white."""
    array = np.array([[0, 16384, 32768, 65535]], dtype=np.uint16)
    path = tmp_path / "grey16.png"
    Image.fromarray(array).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode.startswith("I")
    out = pixels(load_rgb_image(path))[0, :, 0]
    assert out.tolist() == [0, 64, 128, 255]


def test_to_rgb_32_bit_integer_with_16_bit_values():
    """Mode I holding 16-bit values is scaled by 65535 like I;16."""
    image = Image.new("I", (3, 1))
    image.putpixel((0, 0), 65535)
    image.putpixel((1, 0), 32768)
    image.putpixel((2, 0), 0)
    assert pixels(to_rgb(image))[0, :, 0].tolist() == [255, 128, 0]


def test_to_rgb_float_image_is_scaled_to_its_maximum():
    """Mode F: values are scaled so the maximum is white and proportions are kept."""
    image = Image.new("F", (3, 1))
    image.putpixel((0, 0), 0.5)
    image.putpixel((1, 0), 0.25)
    image.putpixel((2, 0), 0.0)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert pixels(rgb)[0, :, 0].tolist() == [255, 128, 0]


def test_to_rgb_keeps_rgb_pixels():
    """An RGB image comes back with identical pixels."""
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert np.array_equal(pixels(to_rgb(image)), pixels(image))


# --- EXIF orientation ---------------------------------------------------------------------------


def _red_left_blue_right(width=40, height=20):
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (width // 2, 0, width, height))
    return image


@pytest.mark.parametrize(("orientation", "top_colour", "bottom_colour"), [(6, "red", "blue"), (8, "blue", "red")])
def test_load_rgb_image_applies_exif_orientation(tmp_path, orientation, top_colour, bottom_colour):
    """A landscape JPEG tagged as rotated (6: 90 deg clockwise, 8: counter-clockwise) loads upright, transposed."""
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = orientation
    _red_left_blue_right().save(path, exif=exif, quality=95)
    before = path.read_bytes()
    image = load_rgb_image(path)
    assert image.mode == "RGB"
    assert image.size == (20, 40)
    colours = {"red": np.array([255, 0, 0]), "blue": np.array([0, 0, 255])}
    array = pixels(image).astype(int)
    assert np.abs(array[5, 10] - colours[top_colour]).max() < 40
    assert np.abs(array[35, 10] - colours[bottom_colour]).max() < 40
    assert path.read_bytes() == before  # reading never rewrites the file


def test_load_rgb_image_without_exif_keeps_size(tmp_path):
    """Without an orientation tag the image is not rotated."""
    path = tmp_path / "plain.jpg"
    _red_left_blue_right().save(path, quality=95)
    assert load_rgb_image(path).size == (40, 20)


# --- list_image_files ---------------------------------------------------------------------------


def _write_png(path, size=(64, 64), colour=(120, 80, 40)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_list_image_files_skips_hidden_non_images_and_folders_with_a_warning(tmp_path):
    """Hidden files, non-image extensions and sub-folders are skipped and named in one warning."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("b.jpg", "a.png", "C.JPG"):
        (folder / name).write_bytes(b"not decoded here")
    (folder / ".hidden.jpg").write_bytes(b"x")
    (folder / "._a.png").write_bytes(b"x")
    (folder / "README.txt").write_text("notes")
    (folder / "nested.jpg").mkdir()
    (folder / "sub").mkdir()
    with pytest.warns(UserWarning, match="Skipping 5 ") as record:
        images = list_image_files(folder, role="instance_data_dir")
    assert [p.name for p in images] == ["C.JPG", "a.png", "b.jpg"]
    message = str(record[0].message)
    for name in (".hidden.jpg", "._a.png", "README.txt", "nested.jpg", "sub"):
        assert name in message


def test_list_image_files_clean_folder_does_not_warn(tmp_path):
    """Only images (plus an explicitly ignored name): no warning."""
    _write_png(tmp_path / "0.png")
    (tmp_path / "manifest.json").write_text("{}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = list_image_files(tmp_path, role="class_data_dir", ignore=("manifest.json",))
    assert [p.name for p in images] == ["0.png"]


@pytest.mark.parametrize("name", ["IMG_0001.heic", "IMG_0002.HEIC", "photo.avif"])
def test_list_image_files_refuses_photo_formats_it_cannot_decode(tmp_path, name):
    """A .heic (or .avif) photo is an error naming the file, not silently skipped."""
    _write_png(tmp_path / "ok.png")
    bad = tmp_path / name
    bad.write_bytes(b"ftypheic")
    with pytest.raises(InputDataError) as excinfo:
        list_image_files(tmp_path, role="instance_data_dir")
    assert str(bad) in str(excinfo.value)


# --- validate_image_folder ----------------------------------------------------------------------


def test_validate_image_folder_returns_images_in_name_order(tmp_path):
    """A good folder: every image is decoded and returned sorted, without warnings, untouched."""
    for name in ("b.png", "a.png"):
        _write_png(tmp_path / name, size=(64, 80))
    before = folder_snapshot(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)
    assert [p.name for p in images] == ["a.png", "b.png"]
    assert folder_snapshot(tmp_path) == before


def test_validate_image_folder_unreadable_jpg(tmp_path):
    """A .jpg holding text is an InputDataError naming it; the folder is left as it was."""
    _write_png(tmp_path / "a.png")
    bad = tmp_path / "b.jpg"
    bad.write_text("this is not a photo")
    before = folder_snapshot(tmp_path)
    with pytest.raises(InputDataError) as excinfo:
        validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)
    assert str(bad) in str(excinfo.value)
    assert folder_snapshot(tmp_path) == before


def test_validate_image_folder_truncated_jpeg(tmp_path):
    """A JPEG cut in half (an interrupted copy) is caught by the full decode and named."""
    data = (EXAMPLE_SUBJECT / "00.jpg").read_bytes()
    bad = tmp_path / "00.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with Image.open(bad) as header_only:  # the header alone still parses
        assert header_only.size == (256, 256)
    with pytest.raises(InputDataError) as excinfo:
        validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)
    assert str(bad) in str(excinfo.value)


def test_validate_image_folder_refuses_far_too_small_image(tmp_path):
    """Shorter side below half the resolution: an error naming the file and its size."""
    bad = _write_png(tmp_path / "tiny.png", size=(100, 31))
    with pytest.raises(InputDataError) as excinfo:
        validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)
    assert str(bad) in str(excinfo.value)
    assert "100x31" in str(excinfo.value)


@pytest.mark.parametrize("size", [(32, 100), (48, 48), (63, 200)])
def test_validate_image_folder_warns_for_smaller_than_resolution(tmp_path, size):
    """Shorter side between half the resolution (inclusive) and the resolution: a warning naming the file."""
    path = _write_png(tmp_path / "small.png", size=size)
    with pytest.warns(UserWarning, match="upscaled") as record:
        images = validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)
    assert images == [path]
    assert any(str(path) in str(w.message) for w in record)


def test_validate_image_folder_empty_folder(tmp_path):
    """No images: an error naming the folder, unless allow_empty."""
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InputDataError) as excinfo:
        validate_image_folder(folder, role="instance_data_dir", resolution=64)
    assert str(folder) in str(excinfo.value)
    assert validate_image_folder(folder, role="class_data_dir", resolution=64, allow_empty=True) == []


def test_validate_image_folder_with_only_non_images_counts_as_empty(tmp_path):
    """A folder holding only a README is empty for training: warning for the skip, then the error."""
    (tmp_path / "README.txt").write_text("photos go here")
    with pytest.warns(UserWarning, match="README.txt"), pytest.raises(InputDataError, match="holds no images"):
        validate_image_folder(tmp_path, role="instance_data_dir", resolution=64)


def test_validate_image_folder_missing_folder_is_not_created(tmp_path):
    """A missing folder is an error naming it, and is not created by the check."""
    missing = tmp_path / "does_not_exist"
    with pytest.raises(InputDataError) as excinfo:
        validate_image_folder(missing, role="instance_data_dir", resolution=64)
    assert str(missing) in str(excinfo.value)
    assert not missing.exists()


def test_validate_image_folder_path_is_a_file(tmp_path):
    """A path to a file instead of a folder is an error naming it."""
    path = _write_png(tmp_path / "photo.png")
    with pytest.raises(InputDataError, match="is a file") as excinfo:
        validate_image_folder(path, role="instance_data_dir", resolution=64)
    assert str(path) in str(excinfo.value)


# --- dataset helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "target", "expected"),
    [((100, 50), 64, (128, 64)), ((50, 100), 64, (64, 128)), ((333, 500), 64, (64, 96)), ((256, 256), 64, (64, 64))],
)
def test_resize_shorter_side(size, target, expected):
    """The shorter side becomes the target and the aspect ratio is kept (rounded)."""
    assert resize_shorter_side(Image.new("RGB", size), target).size == expected


def test_crop_box_centred_without_rng():
    """Without an rng the square is centred (floor of the margin)."""
    assert crop_box(100, 64, 64, None) == (18, 0, 82, 64)
    assert crop_box(64, 101, 64, None) == (0, 18, 64, 82)
    assert crop_box(64, 64, 64, None) == (0, 0, 64, 64)


def test_crop_box_random_is_inside_and_reproducible():
    """With an rng the square stays inside the image, has the right size, varies, and repeats per seed."""
    boxes = set()
    for seed in range(50):
        left, top, right, bottom = box = crop_box(200, 150, 64, random.Random(seed))
        assert 0 <= left and 0 <= top and right <= 200 and bottom <= 150
        assert (right - left, bottom - top) == (64, 64)
        assert crop_box(200, 150, 64, random.Random(seed)) == box
        boxes.add(box)
    assert len(boxes) > 10


def test_to_tensor_range_and_layout():
    """RGB uint8 -> float32 CHW in [-1, 1]: 0 -> -1, 255 -> 1, channels first."""
    image = Image.new("RGB", (3, 2), (0, 0, 0))
    image.putpixel((2, 1), (255, 0, 51))
    image.putpixel((0, 0), (255, 255, 255))
    tensor = to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 2, 3)
    assert tensor.min().item() == -1.0 and tensor.max().item() == 1.0
    torch.testing.assert_close(tensor[:, 1, 2], torch.tensor([1.0, -1.0, 51 / 127.5 - 1.0]))
    torch.testing.assert_close(tensor[:, 0, 0], torch.ones(3))
    torch.testing.assert_close(tensor[:, 0, 1], -torch.ones(3))


INSTANCE_IDS = torch.tensor([49406, 1, 2, 49407])
CLASS_IDS = torch.tensor([49406, 3, 49407, 49407])


def _solid_images(folder, count, prefix, size=(48, 40)):
    folder.mkdir(exist_ok=True)
    paths = []
    for i in range(count):
        paths.append(_write_png(folder / f"{prefix}{i}.png", size=size, colour=(10 * i, 100, 255 - 10 * i)))
    return paths


def _colour_of(tensor):
    """The single colour of a solid image tensor, back in 0..255."""
    return [round((v + 1.0) * 127.5) for v in tensor.mean(dim=(1, 2)).tolist()]


def test_dataset_length_is_the_longer_list_and_the_shorter_one_cycles(tmp_path):
    """len = max(#instance, #class); index i uses instance i % n_instance and class i % n_class."""
    instance = _solid_images(tmp_path / "instance", 3, "i")
    classes = _solid_images(tmp_path / "class", 5, "c")
    dataset = DreamBoothDataset(instance, INSTANCE_IDS, 32, class_images=classes, class_input_ids=CLASS_IDS)
    assert len(dataset) == 5
    assert len(DreamBoothDataset(instance, INSTANCE_IDS, 32)) == 3
    assert len(DreamBoothDataset(classes, INSTANCE_IDS, 32, class_images=instance, class_input_ids=CLASS_IDS)) == 5
    example = dataset[4]
    assert example.instance_pixel_values.shape == (3, 32, 32)
    assert example.class_pixel_values.shape == (3, 32, 32)
    assert _colour_of(example.instance_pixel_values) == [10 * (4 % 3), 100, 255 - 10 * (4 % 3)]
    assert _colour_of(example.class_pixel_values) == [40, 100, 215]
    assert torch.equal(example.instance_input_ids, INSTANCE_IDS)
    assert torch.equal(example.class_input_ids, CLASS_IDS)


def test_dataset_without_class_images_has_no_class_keys(tmp_path):
    """Without class images an example holds only the instance image and ids."""
    dataset = DreamBoothDataset(_solid_images(tmp_path, 2, "i"), INSTANCE_IDS, 32)
    example = dataset[0]
    filled = {name for name, value in vars(example).items() if value is not None}
    assert filled == {"instance_pixel_values", "instance_input_ids"}


def _noise_image(path, size=(96, 64), seed=0):
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


def test_dataset_crops_are_a_function_of_index_and_seed(tmp_path):
    """The same (index, crop_seed) gives identical tensors; other seeds give other crops; int i means (i, i)."""
    instance = [_noise_image(tmp_path / f"{i}.png", seed=i) for i in range(2)]
    dataset = DreamBoothDataset(instance, INSTANCE_IDS, 32)
    first = dataset[(1, 5)].instance_pixel_values
    assert torch.equal(first, dataset[(1, 5)].instance_pixel_values)
    others = [dataset[(1, seed)].instance_pixel_values for seed in range(6, 12)]
    assert any(not torch.equal(first, other) for other in others)
    assert torch.equal(dataset[3].instance_pixel_values, dataset[(3, 3)].instance_pixel_values)


def test_dataset_center_crop_ignores_the_crop_seed(tmp_path):
    """center_crop=True: every crop seed gives the centre crop."""
    instance = [_noise_image(tmp_path / "0.png")]
    dataset = DreamBoothDataset(instance, INSTANCE_IDS, 32, center_crop=True)
    first = dataset[(0, 1)].instance_pixel_values
    for seed in range(2, 6):
        assert torch.equal(first, dataset[(0, seed)].instance_pixel_values)
    resized = resize_shorter_side(Image.open(instance[0]).convert("RGB"), 32)  # 48 x 32
    assert torch.equal(first, to_tensor(resized.crop((8, 0, 40, 32))))


def test_dataset_rejects_bad_arguments(tmp_path):
    """No instance images, an empty class list or class images without ids are refused."""
    instance = _solid_images(tmp_path, 1, "i")
    with pytest.raises(ValueError):
        DreamBoothDataset([], INSTANCE_IDS, 32)
    with pytest.raises(ValueError):
        DreamBoothDataset(instance, INSTANCE_IDS, 32, class_images=[], class_input_ids=CLASS_IDS)
    with pytest.raises(ValueError):
        DreamBoothDataset(instance, INSTANCE_IDS, 32, class_images=instance, class_input_ids=None)


def _example(value, with_class=True):
    example = Example(torch.full((3, 4, 4), float(value)), INSTANCE_IDS + value)
    if with_class:
        example.class_pixel_values = torch.full((3, 4, 4), float(value) + 10)
        example.class_input_ids = CLASS_IDS + value
    return example


def test_collate_with_prior_preservation_puts_instance_chunk_then_class_chunk():
    """Batch = [instance_0, instance_1, class_0, class_1]; num_instance is the instance chunk size."""
    batch = collate_examples([_example(0), _example(1)])
    assert batch.num_instance == 2
    assert batch.pixel_values.shape == (4, 3, 4, 4)
    assert batch.pixel_values.dtype == torch.float32
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 10.0, 11.0]
    assert torch.equal(batch.input_ids, torch.stack([INSTANCE_IDS, INSTANCE_IDS + 1, CLASS_IDS, CLASS_IDS + 1]))


def test_collate_without_prior_preservation_has_only_the_instance_chunk():
    """Without prior preservation (no class image in the examples) the batch is the instance chunk."""
    batch = collate_examples([_example(0, with_class=False), _example(1, with_class=False), _example(2, with_class=False)])
    assert batch.num_instance == 3 and batch.num_pdm == 0 and batch.class_mask is None
    assert batch.pixel_values[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert torch.equal(batch.input_ids, torch.stack([INSTANCE_IDS, INSTANCE_IDS + 1, INSTANCE_IDS + 2]))


def test_dark_16_bit_image_stays_dark():
    """An I;16 image is 16-bit whatever its brightest pixel: values 200 and 100 are near black, not 200 / 100."""
    image = Image.new("I;16", (2, 1))
    image.putpixel((0, 0), 200)
    image.putpixel((1, 0), 100)
    rgb = to_rgb(image)
    assert rgb.getpixel((0, 0)) == (1, 1, 1)
    assert rgb.getpixel((1, 0)) == (0, 0, 0)
