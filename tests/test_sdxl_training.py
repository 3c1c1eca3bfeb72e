"""SDXL through train.py on the tiny SDXL model: fit (LoRA on the UNet and both text encoders, PDM, prior
preservation, full fine-tune), exports loaded back by plain diffusers, bitwise resume, predict and test."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from conftest import EXAMPLE_SUBJECT, REPO_ROOT, build_cli, quickstart_args
from pdm_lightning.cli import cli_main
from pdm_lightning.core.images import list_image_files
from pdm_lightning.data.batch import collate_examples
from pdm_lightning.data.crops import crop_box, to_tensor
from pdm_lightning.evaluation.tiny_models import save_tiny_evaluation_models

SDXL_PDM_LAYER = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"
QUIET = ("--samples.at_fit_end", "false", "--samples.every_n_train_steps", "0")
PRIOR = ("--data.with_prior_preservation", "true", "--data.num_class_images", "2",
         "--data.class_generation.num_inference_steps", "2", "--data.class_generation.sample_batch_size", "2")
LORA = ("--model.lora.rank", "2", "--model.learning_rate", "1e-2")
PDM = ("--model.pdm", "{}", "--model.pdm.inversion_steps", "2", "--model.pdm.dtype", "float32")


@pytest.fixture(autouse=True)
def bank_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
    return tmp_path / "bank-cache"


def fit(run: Path, model: Path, instance: Path, *overrides: str):  # noqa: ANN201 - the LightningCLI
    cli = build_cli(run, model, instance, *QUIET, *overrides)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


def trained(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


@torch.no_grad()
def unet_prediction(unet: torch.nn.Module, text_encoders, tokenizers) -> torch.Tensor:  # noqa: ANN001
    """One UNet call of fixed inputs, conditioned through the given text encoders (trained parts included)."""
    from pdm_lightning.core.conditioning import encode_prompts, sdxl_time_ids, tokenize, unet_conditioning

    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    embeddings = encode_prompts(text_encoders, tokenize(tokenizers, ["a photo of sks dog"]))
    return unet(latents, 500, **unet_conditioning(embeddings, sdxl_time_ids((64, 64), (0, 0), (64, 64)))).sample


def test_lora_fit_with_prior_preservation_trains_the_unet_and_both_text_encoders_and_exports_load_back(
    tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path
) -> None:
    run = tmp_path / "run"
    cli = fit(run, tiny_sdxl_model_dir, instance_dir, *LORA, *PRIOR, "--trainer.max_steps", "2",
              "--model.train_text_encoder", "true", "--export.pipeline", "true")
    module = cli.model
    assert module.text_encoder_2 is not None and module.tokenizer_2 is not None
    keys = set(torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(k.startswith(part) and "lora_" in k for k in keys), part
    assert not any("lora_" not in k for k in keys)  # the base stays frozen
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_prior"])

    expected = unet_prediction(module.unet, module.text_encoders, (module.tokenizer, module.tokenizer_2))
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    plain = unet_prediction(base.unet, (base.text_encoder, base.text_encoder_2), (base.tokenizer, base.tokenizer_2))
    assert (plain - expected).abs().max() > 1e-3  # the LoRA changed the model
    export = run / "export"
    for weights in (export / "lora", export / "pdm_lightning_lora.safetensors"):
        pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
        if weights.is_dir():
            pipeline.load_lora_weights(str(weights))
        else:
            pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name)
        loaded = unet_prediction(pipeline.unet, (pipeline.text_encoder, pipeline.text_encoder_2),
                                 (pipeline.tokenizer, pipeline.tokenizer_2))
        torch.testing.assert_close(loaded, expected, rtol=1e-4, atol=1e-5, msg=str(weights))
    merged = StableDiffusionXLPipeline.from_pretrained(export / "pipeline")
    fused = unet_prediction(merged.unet, (merged.text_encoder, merged.text_encoder_2), (merged.tokenizer, merged.tokenizer_2))
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def test_full_fine_tune_exports_a_pipeline_and_a_single_file_that_load_back(
    tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path
) -> None:
    run = tmp_path / "run"
    cli = fit(run, tiny_sdxl_model_dir, instance_dir, "--trainer.max_steps", "1", "--model.learning_rate", "1e-3",
              "--model.train_text_encoder", "true", "--samples.at_fit_end", "true", "--samples.num_inference_steps", "2")
    module = cli.model
    samples = sorted(path for path in (run / "samples").rglob("*.png") if "grids" not in path.parts)
    assert samples and Image.open(samples[0]).size == (64, 64)  # sampled with the SDXL pipeline at its native size
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model_dir)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(module, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(ours[k], theirs[k]) for k in theirs), f"{name} did not train"
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in module.vae.state_dict().items())
    expected = unet_prediction(module.unet, module.text_encoders, (module.tokenizer, module.tokenizer_2))
    folder = StableDiffusionXLPipeline.from_pretrained(run / "export" / "pipeline")
    single = StableDiffusionXLPipeline.from_single_file(
        str(run / "export" / "pdm_lightning.safetensors"), config=str(tiny_sdxl_model_dir)
    )
    for pipeline in (folder, single):
        loaded = unet_prediction(pipeline.unet, (pipeline.text_encoder, pipeline.text_encoder_2),
                                 (pipeline.tokenizer, pipeline.tokenizer_2))
        torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("teacher", ["bank", "on_the_fly"])
def test_pdm_fit_uses_the_sdxl_layer(tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path, teacher: str) -> None:
    # The bank teacher with subject masks on the instance and PDM losses (the PDM mask on SDXL's coarser token grid).
    masks = ["--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks"), "--data.masks.mask_pdm_loss",
             "true", "--data.masks.mask_instance_loss", "true"] if teacher == "bank" else []
    cli = fit(tmp_path / "run", tiny_sdxl_model_dir, instance_dir, *LORA, *PDM, "--model.pdm.teacher", teacher,
              "--trainer.max_steps", "2", *masks)
    assert cli.model.pdm.layer is None and cli.model.pdm_teacher.layer == SDXL_PDM_LAYER
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_pdm"]) and float(metrics["train/loss_pdm"]) > 0


def test_batch_time_ids_are_the_crops_the_dataset_took(tmp_path: Path, tiny_sdxl_model_dir: Path) -> None:
    instance = tmp_path / "photos"
    instance.mkdir()
    with Image.open(list_image_files(EXAMPLE_SUBJECT, "instance")[0]) as image:
        wide = image.convert("RGB").resize((96, 64))
    wide.save(instance / "wide.png")
    cli = build_cli(tmp_path / "run", tiny_sdxl_model_dir, instance, *PDM)
    data = cli.datamodule
    data.prepare_data()
    data.setup("fit")
    dataset = data.train_dataset
    assert dataset.with_time_ids and dataset.instance_input_ids_2 is not None
    seeds = [3, 4, 5, 6, 7]
    centre = [64, 96, 0, 16, 64, 64]  # the PDM chunk's centre crop: original (64, 96), 16 px from the left
    examples = [dataset[(0, seed)] for seed in seeds]
    lefts = []
    for seed, example in zip(seeds, examples):  # random crops of the 96 x 64 photo at 64 px
        left, top, _, _ = crop_box(96, 64, 64, random.Random(seed))
        lefts.append(left)
        assert example.instance_time_ids.tolist() == [64, 96, top, left, 64, 64]
        assert torch.equal(example.instance_pixel_values, to_tensor(wide.crop((left, top, left + 64, top + 64))))
        assert example.pdm.time_ids.tolist() == centre
    assert len(set(lefts)) > 1  # the crops really move
    batch = collate_examples(examples[:2])  # rows in chunk order: instance, then PDM
    assert batch.time_ids.tolist() == [e.instance_time_ids.tolist() for e in examples[:2]] + [centre] * 2
    assert batch.input_ids_2.shape == batch.input_ids.shape == (4, 77)
    assert not torch.equal(batch.input_ids_2, batch.input_ids)  # the second tokenizer pads with "!"

    # Latent crops: the crop's corner on the latent grid, and the time ids say so.
    dataset.use_latent_cache(instance_chunk=False, class_chunk=False, pdm_chunk=True, latent_crops=True)
    for seed in seeds:
        example = dataset[(0, seed)]
        top, left = (8 * cell for cell in example.instance_cell)
        assert left % 8 == 0 and example.instance_time_ids.tolist() == [64, 96, top, left, 64, 64]
        assert example.pdm.time_ids.tolist() == centre
    # And a fit on those latent crops (min-SNR weighting too) takes its steps.
    cli = fit(tmp_path / "latent-crops", tiny_sdxl_model_dir, instance, *PDM, "--model.latent_crops", "true",
              "--model.snr_gamma", "5.0", "--trainer.max_steps", "2")
    assert cli.trainer.datamodule.train_dataset.latent_crops and torch.isfinite(cli.trainer.callback_metrics["train/loss"])


def test_train_predict_predict_py_and_test_on_an_sdxl_run(tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path) -> None:
    from test_predict import pixels, run_predict

    run = tmp_path / "run"
    fit(run, tiny_sdxl_model_dir, instance_dir, *LORA, "--trainer.max_steps", "1")
    checkpoint = run / "checkpoints" / "last.ckpt"
    prompts = '["a {identifier} {class_noun} in the snow"]'
    cli_main(["predict", *quickstart_args(run, tiny_sdxl_model_dir, instance_dir, *LORA, "--ckpt_path", str(checkpoint),
                                          "--data.predict.prompts", prompts, "--data.predict.num_images_per_prompt", "2",
                                          "--data.predict.num_inference_steps", "2", "--data.predict.seed", "1")])
    predicted = sorted((run / "predictions").glob("*.png"))
    assert [p.name for p in predicted] == ["00_a_sks_dog_in_the_snow_00.png", "00_a_sks_dog_in_the_snow_01.png"]
    with Image.open(predicted[0]) as image:
        assert image.size == (64, 64)  # the model's native size
    prompt = ("a sks dog in the snow",)
    standalone = run_predict(tmp_path / "ckpt", "--checkpoint", str(checkpoint), prompts=prompt)
    with_lora = run_predict(tmp_path / "lora", "--pretrained_model_name_or_path", str(tiny_sdxl_model_dir),
                            "--lora", str(run / "export" / "lora"), prompts=prompt)
    base = run_predict(tmp_path / "base", "--pipeline", str(tiny_sdxl_model_dir), prompts=prompt)
    for ours, lora, reference, plain in zip(standalone, with_lora, predicted, base):
        assert np.abs(pixels(ours) - pixels(reference)).max() <= 1
        assert np.abs(pixels(lora) - pixels(reference)).max() <= 1
        assert np.abs(pixels(ours) - pixels(plain)).mean() > 1, "the checkpoint's weights were not used"

    clip, dino = save_tiny_evaluation_models(tmp_path / "eval-models")
    cli_main(["test", *quickstart_args(
        run, tiny_sdxl_model_dir, instance_dir, *LORA, "--ckpt_path", str(checkpoint),
        "--evaluation.dino_model", str(dino), "--evaluation.clip_model", str(clip),
        "--data.evaluation.max_prompts", "2", "--data.evaluation.num_images_per_prompt", "1",
        "--data.evaluation.num_inference_steps", "2", "--data.evaluation.pres_num_images", "1",
    )])
    report = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert {"dino_i", "clip_i", "clip_t", "pres"} <= set(report["metrics"]) and report["num_generated"] == 2
    assert all(np.isfinite(value) for value in report["metrics"].values())


def test_resume_matches_the_uninterrupted_run(tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path) -> None:
    from test_resume import InterruptAtStep

    overrides = [*LORA, *PRIOR, *PDM, "--model.lora.dropout", "0.1", "--model.train_text_encoder", "true",
                 "--model.offset_noise", "0.05", "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "2",
                 "--data.center_crop", "false"]
    straight = fit(tmp_path / "straight", tiny_sdxl_model_dir, instance_dir, *overrides)
    expected = trained(straight.model)
    crashed = build_cli(tmp_path / "resumed", tiny_sdxl_model_dir, instance_dir, *QUIET, *overrides)
    crashed.trainer.callbacks.append(InterruptAtStep(3))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    resumed = build_cli(tmp_path / "resumed", tiny_sdxl_model_dir, instance_dir, *QUIET, *overrides)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert resumed.trainer.global_step == 5
    actual = trained(resumed.model)
    assert any(k.startswith("text_encoder_2.") for k in actual)
    mismatched = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert actual.keys() == expected.keys() and not mismatched, mismatched[:3]


def test_sdxl_vae_stays_float32_under_float16_and_runs_outside_autocast(
    tiny_sdxl_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pdm_lightning.training import module as module_file
    from pdm_lightning.training.module import DreamBoothModule

    monkeypatch.setattr(module_file, "compute_dtype", lambda precision: torch.float16)  # as under 16-mixed
    module = DreamBoothModule(str(tiny_sdxl_model_dir), lora={"rank": 2})
    module.configure_model()
    assert module.unet.dtype == module.text_encoder.dtype == module.text_encoder_2.dtype == torch.float16
    assert module.vae.dtype == torch.float32
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    plain = module.vae.__class__.encode(module.vae, pixels).latent_dist.mean  # the float32 VAE outside autocast
    with torch.autocast("cpu", dtype=torch.float16):
        encoded = module.vae.encode(pixels.half()).latent_dist.mean
        decoded = module.vae.decode(encoded.half()).sample
        unguarded = module.vae.__class__.encode(module.vae, pixels).latent_dist.mean
    assert encoded.dtype == decoded.dtype == torch.float32
    assert (unguarded.float() - plain).abs().max() > 0  # autocast alone would run it in float16
    torch.testing.assert_close(encoded, plain, rtol=1e-3, atol=1e-3)  # only the float16 input's rounding differs


def test_sdxl_configs_carry_their_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name, pdm in (("sdxl_lora.yaml", False), ("sdxl_lora_pdm.yaml", True)):
        cli = cli_main(["--config", str(REPO_ROOT / "configs" / name), "--trainer.accelerator", "cpu"], run=False)
        model, data = cli.model, cli.datamodule
        assert model.hparams.pretrained_model_name_or_path == "stabilityai/stable-diffusion-xl-base-1.0"
        assert data.resolution == 1024 and model.lora.rank == 4 and model.hparams.learning_rate == 1e-4
        assert not model.hparams.train_text_encoder and model.hparams.gradient_checkpointing
        assert cli.trainer.precision == "bf16-mixed" and cli.trainer.max_steps == 500
        assert (model.pdm is not None) == pdm and data.pdm == model.pdm
        if pdm:
            assert model.pdm.layer is None and model.pdm.weight == 0.05  # the layer: SDXL's by the rule


def test_resolution_defaults_to_the_models_native_size(tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path) -> None:
    import json as json_module

    from pdm_lightning.tiny_sdxl import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG

    # The real SDXL's configs (no weights are read): 128 latents x 8 = 1024 px.
    folder = tmp_path / "sdxl-configs"
    shutil.copytree(tiny_sdxl_model_dir, folder)
    (folder / "unet" / "config.json").write_text(json_module.dumps({"_class_name": "UNet2DConditionModel", **SDXL_UNET_CONFIG}))
    (folder / "vae" / "config.json").write_text(json_module.dumps({"_class_name": "AutoencoderKL", **SDXL_VAE_CONFIG}))
    for model, expected in ((tiny_sdxl_model_dir, 64), (folder, 1024)):
        cli = build_cli(tmp_path / "run", model, instance_dir, "--data.resolution", "null")
        assert cli.datamodule.resolution == expected and cli.datamodule.inputs.resolution == expected


def test_compiled_blocks_train_sdxl_with_the_pdm_hook(
    tmp_path: Path, tiny_sdxl_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regional compilation on SDXL's blocks (Dynamo with the eager backend: its tracing and guards without
    inductor's code generation); the block holding SDXL's PDM layer stays eager, so the hook sees the student."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compile_module(self, *a, **{**k, "backend": "eager"}))
    cli = fit(tmp_path / "run", tiny_sdxl_model_dir, instance_dir, *LORA, *PDM, "--model.compile", "true",
              "--trainer.max_steps", "1")
    from test_compile import compiled_blocks
    from pdm_lightning.training.compilation import transformer_blocks

    unet = cli.model.unet
    assert cli.model.query_capture.layer == SDXL_PDM_LAYER
    assert len(compiled_blocks(unet)) == len(transformer_blocks(unet)) - 1
    assert SDXL_PDM_LAYER.rsplit(".attn1.", 1)[0] not in compiled_blocks(unet)
    assert 0.0 < float(cli.trainer.callback_metrics["train/loss_pdm"]) < float("inf")
