"""LoRA exports of a real (tiny) LoRA fit: the diffusers folder and the kohya file load back as trained."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from conftest import EXAMPLE_SUBJECT, build_cli, folder_snapshot
from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME
from pdm_lightning.export.lora_layers import lora_layers
from pdm_lightning.export.verify import ExportVerificationError, check_file, verify_lora_loads
from pdm_lightning.export.weights import ExportOptions, export_weights
from pdm_lightning.generation.sampling import inference_pipeline
from pdm_lightning.generation.schedulers import make_scheduler

PROMPT = "a photo of sks dog"
KOHYA_FILE = "pdm_lightning_lora.safetensors"


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("lora")
    instance_dir = Path(shutil.copytree(EXAMPLE_SUBJECT, root / "instance"))
    base_before = folder_snapshot(tiny_model_dir)
    cli = build_cli(
        root / "run", tiny_model_dir, instance_dir,
        "--trainer.max_steps", "2", "--model.learning_rate", "1e-3",
        "--model.lora.rank", "4", "--model.lora.alpha", "8", "--model.train_text_encoder", "true",
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    module = cli.model.eval()
    return {"root": root, "export": root / "run" / "export", "module": module, "base_before": base_before}


def fresh_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def outputs(pipeline: StableDiffusionPipeline) -> dict[str, torch.Tensor]:
    """Text-encoder states, one UNet prediction, and the latents of a 2-step DDIM generation, all seeded."""
    pipeline.scheduler = make_scheduler("ddim", pipeline.scheduler.config)
    ids = pipeline.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    states = pipeline.text_encoder(ids)[0]
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    return {
        "text_encoder": states,
        "unet": pipeline.unet(latents, torch.tensor([500]), states).sample,
        "generation": pipeline(PROMPT, num_inference_steps=2, output_type="latent", generator=generator).images,
    }


def module_outputs(module) -> dict[str, torch.Tensor]:  # noqa: ANN001
    pipeline = inference_pipeline(module)
    pipeline.set_progress_bar_config(disable=True)
    return outputs(pipeline)


def test_lora_run_exports_the_lora_files_and_no_pipeline(lora_run: dict) -> None:
    assert sorted(p.name for p in lora_run["export"].iterdir()) == ["lora", "manifest.json", KOHYA_FILE]
    assert [p.name for p in (lora_run["export"] / "lora").iterdir()] == [LORA_WEIGHT_NAME]


def test_diffusers_folder_changes_the_base_model_and_matches_the_module(lora_run: dict, tiny_model_dir: Path) -> None:
    pipeline = fresh_pipeline(tiny_model_dir)
    base = outputs(pipeline)
    pipeline.load_lora_weights(str(lora_run["export"] / "lora"))
    loaded, trained = outputs(pipeline), module_outputs(lora_run["module"])
    for name in ("text_encoder", "unet", "generation"):
        assert (loaded[name] - base[name]).abs().max() > 1e-4, f"the LoRA does not change the {name} output"
        torch.testing.assert_close(loaded[name], trained[name], rtol=1e-5, atol=1e-6, msg=name)


def test_kohya_file_has_exactly_down_up_alpha_per_adapted_layer(lora_run: dict) -> None:
    module = lora_run["module"]
    unet_layers, text_layers = lora_layers(module.unet), lora_layers(module.text_encoder)
    # to_q/k/v/out of attn1 and attn2 in 16 transformer blocks (6 down, 1 mid, 9 up); q/k/v/out_proj x 2 layers
    assert len(unet_layers) == 4 * 2 * 16 and len(text_layers) == 4 * 2
    names = {"lora_unet_" + path.replace(".", "_") for path in unet_layers}
    names |= {"lora_te_text_model_" + path.replace(".", "_") for path in text_layers}
    state = load_file(lora_run["export"] / KOHYA_FILE)
    assert set(state) == {name + suffix for name in names for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha" in state
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_up.weight" in state
    assert {float(state[name + ".alpha"]) for name in names} == {8.0}
    for path, layer in unet_layers.items():
        name = "lora_unet_" + path.replace(".", "_")
        assert torch.equal(state[name + ".lora_down.weight"], layer.down) and torch.equal(state[name + ".lora_up.weight"], layer.up)


def test_kohya_file_loads_back_with_the_same_weights(lora_run: dict, tiny_model_dir: Path) -> None:
    module = lora_run["module"]
    pipeline = fresh_pipeline(tiny_model_dir)
    pipeline.load_lora_weights(str(lora_run["export"] / KOHYA_FILE), adapter_name="kohya")
    for part in ("unet", "text_encoder"):
        trained, loaded = lora_layers(getattr(module, part)), lora_layers(getattr(pipeline, part), "kohya")
        assert loaded.keys() == trained.keys()
        for path, layer in trained.items():
            assert torch.equal(loaded[path].delta(), layer.delta()), path  # same effective weight change
    loaded_outputs, trained_outputs = outputs(pipeline), module_outputs(module)
    for name in loaded_outputs:
        torch.testing.assert_close(loaded_outputs[name], trained_outputs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_base_weights_are_byte_identical_after_the_lora_run(lora_run: dict, tiny_model_dir: Path) -> None:
    module = lora_run["module"]
    files = {
        "unet": tiny_model_dir / "unet" / "diffusion_pytorch_model.safetensors",
        "text_encoder": tiny_model_dir / "text_encoder" / "model.safetensors",
        "vae": tiny_model_dir / "vae" / "diffusion_pytorch_model.safetensors",
    }
    for part, file in files.items():
        base = load_file(file)
        frozen = {
            key.replace(".base_layer.", "."): value
            for key, value in getattr(module, part).state_dict().items()
            if "lora_" not in key
        }
        assert frozen.keys() == base.keys(), part
        for key, value in frozen.items():
            assert value.dtype == base[key].dtype and value.numpy().tobytes() == base[key].numpy().tobytes(), key
    assert folder_snapshot(tiny_model_dir) == lora_run["base_before"]


def test_merged_pipeline_on_request_matches_the_module(lora_run: dict, tmp_path: Path) -> None:
    module = lora_run["module"]
    written = export_weights(module, tmp_path, ExportOptions(pipeline=True, lora_kohya=False))
    assert [p.name for p in written] == ["lora", "pipeline", "pdm_lightning.safetensors"]
    merged = fresh_pipeline(tmp_path / "pipeline")
    assert not any("lora" in key for key in merged.unet.state_dict())
    merged_outputs, trained_outputs = outputs(merged), module_outputs(module)
    for name in merged_outputs:  # fused weights: equal up to float rounding
        torch.testing.assert_close(merged_outputs[name], trained_outputs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_float16_export(lora_run: dict, tmp_path: Path) -> None:
    export_weights(lora_run["module"], tmp_path, ExportOptions(dtype="float16"))  # verified on load-back
    for file in (tmp_path / KOHYA_FILE, tmp_path / "lora" / LORA_WEIGHT_NAME):
        assert {tensor.dtype for tensor in load_file(file).values()} == {torch.float16}


def test_a_layer_the_loader_ignores_fails_verification(lora_run: dict, tmp_path: Path, tiny_model_dir: Path) -> None:
    module = lora_run["module"]
    state = load_file(lora_run["export"] / KOHYA_FILE)
    # A layer name that matches no module: tools skip such keys, often without a word.
    renamed = {key.replace("up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_q", "up_blocks_3_attentions_2_transformer_blocks_0_attn1_to_z"): value
               for key, value in state.items()}
    broken = tmp_path / "broken.safetensors"
    save_file(renamed, broken)
    with pytest.raises(ExportVerificationError, match=r"up_blocks\.3\.attentions\.2\.transformer_blocks\.0\.attn1\.to_q"):
        verify_lora_loads(fresh_pipeline(tiny_model_dir), broken,
                          {"unet": lora_layers(module.unet), "text_encoder": lora_layers(module.text_encoder)}, torch.float32)
    without_alpha = {k: v for k, v in state.items() if k != "lora_te_text_model_encoder_layers_1_self_attn_v_proj.alpha"}
    save_file(without_alpha, broken)
    with pytest.raises(ExportVerificationError, match=r"1 missing \(lora_te_text_model_encoder_layers_1_self_attn_v_proj\.alpha\)"):
        check_file(broken, state)


def test_layers_beyond_attention_load_back_from_the_diffusers_folder(tiny_model_dir: Path, tmp_path: Path) -> None:
    """diffusers' converter renames attention projections only and its loader reads the layout off the first
    key: with resnet or MLP targets too, half the adapters were dropped on load. One layout for all keys."""
    from pdm_lightning.export.lora_diffusers import write_lora_folder
    from pdm_lightning.training.lora import LoraSettings, add_lora_adapters

    trained = fresh_pipeline(tiny_model_dir)
    settings = LoraSettings(rank=2, init_lora_weights=False)
    add_lora_adapters(trained.unet, settings, ["time_emb_proj", "to_q", "proj_in", "ff.net.2"])
    add_lora_adapters(trained.text_encoder, settings, ["fc1", "q_proj"])
    expected = {"unet": lora_layers(trained.unet), "text_encoder": lora_layers(trained.text_encoder)}
    assert any("resnets" in path for path in expected["unet"]) and any("fc1" in path for path in expected["text_encoder"])
    write_lora_folder(tmp_path / "lora", trained.unet, {"text_encoder": trained.text_encoder})
    verify_lora_loads(fresh_pipeline(tiny_model_dir), tmp_path / "lora", expected, torch.float32)
