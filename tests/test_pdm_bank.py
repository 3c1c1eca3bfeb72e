"""The PDM teacher bank against a plainly written loop of the equations in docs/method.md, its cache, resume and teachers.

Faithful banks (999 inversion steps, 1999 UNet calls per batch) use a micro UNet (2 levels, 8
channels) inside a copy of the tiny pipeline, so the 2000-call trajectories run in seconds; the
bank is built once per module.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pdm_lightning.data.crops import load_training_image
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import list_image_files
from pdm_lightning.core.loading import load_components
from pdm_lightning.pdm import (
    BankSettings,
    QueryBank,
    build_bank,
    class_condition,
    ensure_cached_bank,
    open_bank,
    trajectory_timesteps,
    unet_query_fn,
)
from pdm_lightning.pdm.storage import TMP_PREFIX, TMP_SUFFIX, _host_tag

from conftest import EXAMPLE_SUBJECT

MICRO_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
CLASS_PROMPT = "a photo of dog"
RESOLUTION = 64
PROBE_TIMESTEPS = [0, 1, 2, 250, 500, 998, 999]


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.fixture(scope="module")
def micro_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline with a micro UNet (same conditioning, same schedule), saved and loaded via from_pretrained."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("models") / "micro-sd"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("unet"))
    torch.manual_seed(1)
    UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=2,
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    return folder


@pytest.fixture(scope="module")
def two_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("instance")
    for path in list_image_files(EXAMPLE_SUBJECT, "instance")[:2]:
        shutil.copy(path, folder / path.name)
    return list_image_files(folder, "instance")


class CallCounter:
    """Counts UNet forwards with a pre-hook; can raise at a given call to simulate an interruption."""

    def __init__(self, unet: torch.nn.Module, fail_at: int | None = None) -> None:
        self.calls, self.fail_at = 0, fail_at
        self.handle = unet.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: object) -> None:
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")


def micro_settings(model_dir: Path, **overrides: object) -> BankSettings:
    options = {"layer": MICRO_LAYER, "dtype": "float32", "mode": "both", **overrides}
    return BankSettings(str(model_dir), CLASS_PROMPT, RESOLUTION, **options)


@pytest.fixture(scope="module")
def micro_components(micro_model_dir: Path):  # noqa: ANN201
    return load_components(str(micro_model_dir))


@pytest.fixture(scope="module")
def faithful_bank(micro_model_dir: Path, micro_components, two_images: list[Path], tmp_path_factory) -> dict:  # noqa: ANN001
    """The faithful float32 bank (queries and latents) of two images, extracted in one batch, with its UNet calls."""
    folder = tmp_path_factory.mktemp("bank")
    counter = CallCounter(micro_components.unet)
    report = build_bank(
        micro_settings(micro_model_dir), two_images, folder, batch_size=2, device="cpu",
        progress=False, components=micro_components,
    )
    counter.handle.remove()
    return {"folder": folder, "report": report, "calls": counter.calls}


def plain_reference_bank(model_dir: Path, image: Path, timesteps: list[int]) -> dict[int, torch.Tensor]:
    """The procedure of docs/method.md for one image, written out: no scheduler class, no batching, no bank code."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    config = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config["beta_schedule"] == "scaled_linear"
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    abar = torch.cumprod(1.0 - betas, dim=0).tolist()
    tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder").eval()
    vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").eval()
    queries: dict[int, torch.Tensor] = {}
    seen: list[torch.Tensor] = []
    unet.get_submodule(MICRO_LAYER).register_forward_hook(lambda module, args, output: seen.append(output))
    with torch.no_grad():
        ids = tokenizer(CLASS_PROMPT, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        condition = text_encoder(ids)[0]
        pixels = load_training_image(image, RESOLUTION, None)[None]
        z = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        for s, t in zip(timesteps[:-1], timesteps[1:]):  # inversion: s -> t with eps = unet(z_s, t)
            eps = unet(z, t, condition).sample
            x0 = (z - math.sqrt(1 - abar[s]) * eps) / math.sqrt(abar[s])
            z = math.sqrt(abar[t]) * x0 + math.sqrt(1 - abar[t]) * eps
        for k in range(len(timesteps) - 1, -1, -1):  # reconstruction: t -> previous, last step to abar = 1
            t = timesteps[k]
            eps = unet(z, t, condition).sample
            queries[t] = seen[-1][0].clone()
            abar_previous = abar[timesteps[k - 1]] if k > 0 else 1.0
            x0 = (z - math.sqrt(1 - abar[t]) * eps) / math.sqrt(abar[t])
            z = math.sqrt(abar_previous) * x0 + math.sqrt(1 - abar_previous) * eps
    return queries


def test_faithful_bank_matches_the_plain_reference_loop(faithful_bank: dict, micro_model_dir: Path, two_images) -> None:
    reference = plain_reference_bank(micro_model_dir, two_images[1], list(range(1000)))
    bank = open_bank(faithful_bank["folder"], two_images, micro_settings(micro_model_dir))
    assert torch.equal(bank.timesteps, torch.arange(1000))
    for t in PROBE_TIMESTEPS:
        produced = bank.queries(torch.tensor([1]), torch.tensor([t]))[0]
        # float32 rounding (batch of 2 vs 1) grows along the 2000 steps to ~4e-3 at the last ones;
        # calling the UNet with the wrong timestep (s instead of t) gives 2e-2 at t = 999 and 0.57 at t = 0.
        assert relative_error(produced, reference[t]) < (1e-2 if t <= 10 else 1e-3), t
    # The two images of the batch got their own trajectories.
    assert relative_error(bank.queries(torch.tensor([0]), torch.tensor([500]))[0], reference[500]) > 1e-2


def test_faithful_extraction_costs_1999_unet_calls_per_batch_and_a_rebuild_none(
    faithful_bank: dict, micro_model_dir: Path, two_images, micro_components, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert faithful_bank["calls"] == faithful_bank["report"].unet_calls == 999 + 1000
    counter = CallCounter(micro_components.unet)
    monkeypatch.setattr("pdm_lightning.core.loading.load_components", lambda *a, **k: pytest.fail("loaded a model"))
    report = build_bank(micro_settings(micro_model_dir), two_images, faithful_bank["folder"], progress=False)
    counter.handle.remove()
    assert (counter.calls, report.unet_calls, report.computed, report.reused) == (0, 0, 0, 2)


def test_faithful_files_hold_every_timestep_with_settings_in_metadata(faithful_bank: dict, two_images) -> None:
    path = faithful_bank["folder"] / f"{two_images[0].stem}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        assert handle.get_slice("queries").get_shape() == [1000, 64, 8]
        assert handle.get_slice("latents").get_shape() == [1000, 4, 8, 8]
        metadata = handle.metadata()
    assert metadata["inversion_steps"] == "faithful" and metadata["layer"] == MICRO_LAYER
    assert metadata["class_prompt"] == CLASS_PROMPT and metadata["resolution"] == "64"
    assert metadata["image_name"] == two_images[0].name and metadata["model"].startswith("local:")


def test_on_the_fly_targets_equal_bank_targets(faithful_bank: dict, micro_model_dir: Path, two_images, micro_components) -> None:
    bank = open_bank(faithful_bank["folder"], two_images)
    condition = class_condition(micro_components.tokenizer, micro_components.text_encoder, CLASS_PROMPT)
    images, timesteps = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 999, 37, 640])
    expected = bank.queries(images, timesteps)
    latents = bank.latents(images, timesteps)
    query = unet_query_fn(micro_components.unet, condition, MICRO_LAYER)
    torch.testing.assert_close(query(latents, timesteps), expected, rtol=1e-4, atol=1e-5)
    # Training passes the condition stacked per element ([B, 77, d], as collated): same targets.
    stacked = unet_query_fn(micro_components.unet, condition.encoder_hidden_states.expand(4, -1, -1).clone(), MICRO_LAYER)
    torch.testing.assert_close(stacked(latents, timesteps), expected, rtol=1e-4, atol=1e-5)


def test_reduced_schedule_rows_match_the_reference_loop_on_that_schedule(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path
) -> None:
    settings = micro_settings(micro_model_dir, inversion_steps=20, mode="bank")
    build_bank(settings, two_images, tmp_path, batch_size=2, device="cpu", progress=False, components=micro_components)
    bank = open_bank(tmp_path, two_images, settings)
    assert torch.equal(bank.timesteps, trajectory_timesteps(1000, 20))
    assert bank.timesteps[0] == 0 and len(bank.timesteps) == 21
    reference = plain_reference_bank(micro_model_dir, two_images[0], bank.timesteps.tolist())
    for t in bank.timesteps.tolist():
        assert relative_error(bank.queries(torch.tensor([0]), torch.tensor([t]))[0], reference[t]) < 1e-4, t
    with pytest.raises(ValueError, match="not in the bank's trajectory"):
        bank.queries(torch.tensor([0]), torch.tensor([2]))  # never interpolated


def test_float16_bank_takes_half_the_float32_storage(tiny_model_dir: Path, two_images, tmp_path: Path) -> None:
    components = load_components(str(tiny_model_dir))
    sizes = {}
    for dtype in ("float16", "float32"):
        settings = BankSettings(str(tiny_model_dir), CLASS_PROMPT, RESOLUTION, inversion_steps=5, dtype=dtype)
        build_bank(settings, two_images[:1], tmp_path / dtype, device="cpu", progress=False, components=components)
        path = tmp_path / dtype / f"{two_images[0].stem}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            queries = handle.get_tensor("queries")
            assert queries.dtype == getattr(torch, dtype) and list(queries.shape) == [6, 64, 32]  # default layer
            assert "latents" not in handle.keys()
        sizes[dtype] = (queries.numel() * queries.element_size(), path.stat().st_size)
    assert sizes["float16"][0] * 2 == sizes["float32"][0]
    # Everything besides the queries (header, timesteps) is small next to them.
    assert sizes["float16"][1] <= 0.5 * sizes["float32"][1] + 1024


def test_interrupted_build_resumes_per_image(micro_model_dir: Path, micro_components, two_images, tmp_path: Path) -> None:
    settings = micro_settings(micro_model_dir, inversion_steps=5)
    calls_per_image = 2 * 5 + 1
    counter = CallCounter(micro_components.unet, fail_at=calls_per_image + 3)
    with pytest.raises(KeyboardInterrupt):
        build_bank(settings, two_images, tmp_path, device="cpu", progress=False, components=micro_components)
    counter.handle.remove()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{two_images[0].stem}.safetensors"]  # no partial left
    finished = (tmp_path / f"{two_images[0].stem}.safetensors").read_bytes()

    # A partial left by a killed process of this host is removed; one of a live process is kept.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{TMP_PREFIX}{two_images[1].stem}.safetensors.{_host_tag()}.{int(dead.stdout)}{TMP_SUFFIX}"
    live = tmp_path / f"{TMP_PREFIX}{two_images[1].stem}.safetensors.{_host_tag()}.1{TMP_SUFFIX}"
    stale.write_bytes(b"half"), live.write_bytes(b"half")

    counter = CallCounter(micro_components.unet)
    report = build_bank(settings, two_images, tmp_path, device="cpu", progress=False, components=micro_components)
    counter.handle.remove()
    assert counter.calls == calls_per_image and (report.computed, report.reused) == (1, 1)
    assert (tmp_path / f"{two_images[0].stem}.safetensors").read_bytes() == finished  # never rewritten
    assert not stale.exists() and live.exists()
    live.unlink()
    assert len(open_bank(tmp_path, two_images, settings)) == 2


def test_an_interrupted_build_leaves_no_capture_hook_on_the_unet(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path
) -> None:
    layer = micro_components.unet.get_submodule(MICRO_LAYER)
    hooks_before = len(layer._forward_hooks)
    counter = CallCounter(micro_components.unet, fail_at=2)
    with pytest.raises(KeyboardInterrupt):
        build_bank(micro_settings(micro_model_dir, inversion_steps=1), two_images[:1], tmp_path, device="cpu",
                   progress=False, components=micro_components)
    counter.handle.remove()
    # A hook left behind would keep capturing (and holding) every later forward of that UNet.
    assert len(layer._forward_hooks) == hooks_before
    assert list(tmp_path.iterdir()) == []


def test_shards_split_the_images_and_together_make_the_bank(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path
) -> None:
    settings = micro_settings(micro_model_dir, inversion_steps=3, mode="bank")
    reports = [
        build_bank(settings, two_images, tmp_path, rank=rank, world_size=2, device="cpu", progress=False,
                   components=micro_components)
        for rank in (0, 1)
    ]
    assert [r.computed for r in reports] == [1, 1]
    assert [r.files for r in reports] == [[tmp_path / f"{two_images[0].stem}.safetensors"],
                                          [tmp_path / f"{two_images[1].stem}.safetensors"]]
    assert open_bank(tmp_path, two_images, settings).query_shape == (64, 8)


def test_other_settings_are_an_error_in_a_named_folder_and_a_miss_in_the_cache(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path
) -> None:
    settings = micro_settings(micro_model_dir, inversion_steps=3, mode="bank")
    build_bank(settings, two_images[:1], tmp_path / "named", device="cpu", progress=False, components=micro_components)
    other = micro_settings(micro_model_dir, inversion_steps=4, mode="bank")
    with pytest.raises(InputDataError, match="inversion_steps: '3' != '4'"):
        build_bank(other, two_images[:1], tmp_path / "named", device="cpu", progress=False, components=micro_components)
    with pytest.raises(InputDataError, match=f"{two_images[0].stem}.safetensors does not match"):
        open_bank(tmp_path / "named", two_images[:1], other)
    with pytest.raises(InputDataError, match="lacks"):
        open_bank(tmp_path / "named", two_images, settings)

    cache = tmp_path / "cache"
    first = ensure_cached_bank(settings, two_images[:1], cache, device="cpu", progress=False, components=micro_components)
    second = ensure_cached_bank(other, two_images[:1], cache, device="cpu", progress=False, components=micro_components)
    assert first.folder != second.folder and first.computed == second.computed == 1
    assert (cache / "file-hashes.json").is_file()
    again = ensure_cached_bank(settings, two_images[:1], cache, device="cpu", progress=False)
    assert (again.folder, again.computed, again.unet_calls) == (first.folder, 0, 0)

    # Same name, other bytes: the cache recomputes the file; a named folder refuses it.
    changed = tmp_path / "changed" / two_images[0].name
    changed.parent.mkdir()
    shutil.copy(two_images[1], changed)
    rebuilt = ensure_cached_bank(settings, [changed], cache, device="cpu", progress=False, components=micro_components)
    assert (rebuilt.folder, rebuilt.computed) == (first.folder, 1)
    with pytest.raises(InputDataError, match="image_sha256"):
        open_bank(tmp_path / "named", [changed])


def test_bank_reader_survives_pickling(faithful_bank: dict, two_images) -> None:
    import pickle

    bank = open_bank(faithful_bank["folder"], two_images)
    copy: QueryBank = pickle.loads(pickle.dumps(bank))
    torch.testing.assert_close(copy.queries([1], [3]), bank.queries([1], [3]))


# ---------------------------------------------------------------------------------------------- how the UNet runs


def file_rows(folder: Path, image: Path, name: str = "queries") -> torch.Tensor:
    with safe_open(str(folder / f"{image.stem}.safetensors"), framework="pt") as handle:
        return handle.get_tensor(name)


def test_traced_unet_builds_the_eager_bank_bit_for_bit(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from pdm_lightning.pdm import query_unet

    settings = micro_settings(micro_model_dir, inversion_steps=4)
    traces = []
    trace = query_unet._trace
    monkeypatch.setattr(query_unet, "_trace", lambda *args: traces.append(1) or trace(*args))
    options = {"batch_size": 2, "device": "cpu", "progress": False, "components": micro_components}
    build_bank(settings, two_images, tmp_path / "eager", **options)  # 9 calls: too few to trace
    assert traces == []
    monkeypatch.setattr(query_unet, "MIN_CALLS_TO_TRACE", 0)
    with caplog.at_level(logging.INFO, logger=query_unet.__name__):
        build_bank(settings, two_images, tmp_path / "traced", **options)
    assert traces == [1] and "eagerly" not in caplog.text  # one trace (one batch shape), kept
    for image in two_images:
        name = f"{image.stem}.safetensors"
        assert (tmp_path / "traced" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes()

    # A hook on the UNet would be skipped by a trace: the UNet then runs eagerly, and the hook sees every call.
    counter = CallCounter(micro_components.unet)
    with caplog.at_level(logging.INFO, logger=query_unet.__name__):
        report = build_bank(settings, two_images[:1], tmp_path / "hooked", **options)
    counter.handle.remove()
    assert counter.calls == report.unet_calls == 9 and traces == [1]
    assert "forward hooks" in caplog.text


def test_batch_of_one_and_batched_rows_agree_to_float_rounding(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path
) -> None:
    """The same rows whatever the batch, up to float32 rounding (measured: 2.5e-5 at most over 10 steps): a
    batched matmul or convolution need not round exactly as the same call on one image does (CPU kernels
    block by problem size), so batched rows are not bit for bit those of a batch of one."""
    settings = micro_settings(micro_model_dir, inversion_steps=10)
    options = {"device": "cpu", "progress": False, "components": micro_components}
    build_bank(settings, two_images, tmp_path / "one", batch_size=1, **options)
    build_bank(settings, two_images, tmp_path / "two", batch_size=2, **options)
    for image in two_images:
        for name in ("queries", "latents"):
            single, batched = file_rows(tmp_path / "one", image, name), file_rows(tmp_path / "two", image, name)
            assert single.shape == batched.shape
            for row in range(len(single)):
                assert relative_error(batched[row], single[row]) < 1e-4, (image.name, name, row)
    # Far below what tells the two photos apart.
    assert relative_error(file_rows(tmp_path / "two", two_images[1])[5], file_rows(tmp_path / "one", two_images[0])[5]) > 1e-2


def test_progress_bar_counts_calls_and_names_the_photos(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = micro_settings(micro_model_dir, inversion_steps=2, mode="bank")
    build_bank(settings, two_images, tmp_path, batch_size=1, device="cpu", components=micro_components)
    err = capsys.readouterr().err
    assert "PDM teacher bank: photo 1/2" in err and "PDM teacher bank: photo 2/2" in err
    assert "10/10" in err and "call" in err  # 2 photos x (2 + 3) UNet calls


def test_compiled_unet_builds_the_eager_bank_to_float_rounding_under_the_same_cache_key(
    micro_model_dir: Path, micro_components, two_images, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled path: Dynamo captures the call with the capture hook inside it. AOT-eager stands in for
    inductor here (the same graph capture and guards, without minutes of C++ code generation on a 2-core CPU;
    with inductor this test passes too, in 140 s). The cache treats compiled and eager rows as one bank."""
    compiled_with = []
    compile_function = torch.compile

    def aot_eager(model, **options):  # noqa: ANN001, ANN202
        compiled_with.append(options)
        return compile_function(model, **{**options, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", aot_eager)
    settings = micro_settings(micro_model_dir, inversion_steps=2, mode="bank")
    options = {"batch_size": 2, "device": "cpu", "progress": False, "components": micro_components}
    build_bank(settings, two_images, tmp_path / "eager", **options)
    assert compiled_with == []
    try:
        report = build_bank(settings, two_images, tmp_path / "compiled", compile_unet=True, **options)
    finally:
        torch._dynamo.reset()
    assert compiled_with == [{"mode": None, "dynamic": False}]  # CUDA graphs ("reduce-overhead") on CUDA only
    assert report.unet_calls == 5
    for image in two_images:
        torch.testing.assert_close(
            file_rows(tmp_path / "compiled", image), file_rows(tmp_path / "eager", image), rtol=1e-4, atol=1e-5
        )
    cache = tmp_path / "cache"
    ensure_cached_bank(settings, two_images, cache, **options)
    again = ensure_cached_bank(settings, two_images, cache, compile_unet=True, **options)
    assert (again.computed, again.unet_calls) == (0, 0)


FIDELITY_BAR = 5e-3  # relative error per row the issue asks of a half-precision bank


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_half_precision_bank_error_against_float32(tiny_model_dir: Path, two_images, tmp_path: Path, compute_dtype: str) -> None:
    """Per row, ||q_half - q_fp32|| / ||q_fp32|| on a one-step inversion of the tiny model (queries stored in float32).

    Measured here: bfloat16 5.6e-2 mean, 6.1e-2 max; float16 6.7e-3 mean, 7.7e-3 max. Neither meets the 5e-3
    bar: one bfloat16 UNet call alone is off by about 2e-2 (an 8-bit mantissa), float16 by 2.5e-3, and the
    VAE encode in the same dtype adds to it (docs: float32 compute, the default, for a faithful bank). What is
    asserted is that error: of the order of the dtype's rounding, so a wrong row (another timestep or photo,
    a cast gone wrong) still fails.
    """
    components = load_components(str(tiny_model_dir))
    rows = {}
    for dtype in ("float32", compute_dtype):
        settings = BankSettings(str(tiny_model_dir), CLASS_PROMPT, RESOLUTION, inversion_steps=1, dtype="float32",
                                compute_dtype=dtype)
        build_bank(settings, two_images[:1], tmp_path / dtype, device="cpu", progress=False, components=components)
        rows[dtype] = file_rows(tmp_path / dtype, two_images[0])
    errors = [relative_error(half, full) for half, full in zip(rows[compute_dtype], rows["float32"])]
    rounding = torch.finfo(getattr(torch, compute_dtype)).eps / 2  # the unit roundoff: 2^-9 and 2^-12
    assert len(errors) == 2 and max(errors) < 40 * rounding, errors
    if compute_dtype == "bfloat16":
        assert min(errors) > FIDELITY_BAR  # documented above: bfloat16 does not meet the bar
