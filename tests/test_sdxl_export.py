"""SDXL exports: the diffusers LoRA folder, the kohya file (lora_unet_ in the original UNet layout,
lora_te1_, lora_te2_) and the pipeline folder, each loaded back by diffusers' StableDiffusionXLPipeline.

The trained module is stood in for by its parts: the tiny SDXL model with peft adapters (random, so
that they change every output) on the UNet and both text encoders, as the training module holds them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from lightning.fabric.utilities.data import AttributeDict
from safetensors.torch import load_file, save_file

from pdm_lightning.core.conditioning import encode_prompts, sdxl_time_ids, tokenize, unet_conditioning
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME
from pdm_lightning.export.lora_layers import lora_layers
from pdm_lightning.export.verify import ExportVerificationError, verify_lora_loads
from pdm_lightning.export.weights import ExportOptions, adapted_layers, check_export_possible, export_weights
from pdm_lightning.generation.sampling import inference_pipeline
from pdm_lightning.generation.schedulers import make_scheduler
from pdm_lightning.training.lora import LoraSettings, add_lora_adapters

PROMPT = "a photo of sks dog"
KOHYA_FILE = "pdm_lightning_lora.safetensors"


class SDXLModule(torch.nn.Module):
    """What an export reads of the training module: the parts, ``hparams`` and ``source``."""

    def __init__(self, model_dir: Path, lora: LoraSettings | None, train_text_encoder: bool) -> None:
        super().__init__()
        self.source = ModelSource(str(model_dir))
        parts = self.source.components()
        self.unet, self.vae, self.noise_scheduler = parts.unet, parts.vae, parts.noise_scheduler
        self.text_encoder, self.text_encoder_2 = parts.text_encoder, parts.text_encoder_2
        self.tokenizer, self.tokenizer_2 = parts.tokenizer, parts.tokenizer_2
        self.hparams = AttributeDict(pretrained_model_name_or_path=str(model_dir), revision=None, variant=None,
                                     train_text_encoder=train_text_encoder)
        torch.manual_seed(11)
        if lora is not None:
            add_lora_adapters(self.unet, lora, lora.unet_target_modules)
            if train_text_encoder:
                for encoder in (self.text_encoder, self.text_encoder_2):
                    add_lora_adapters(encoder, lora, lora.text_encoder_target_modules)
        else:  # a full fine-tune: every trained weight moved
            trained = [self.unet, self.text_encoder, self.text_encoder_2] if train_text_encoder else [self.unet]
            with torch.no_grad():
                for part in trained:
                    for param in part.parameters():
                        param.add_(torch.randn_like(param) * 0.01)
        self.eval()


@pytest.fixture(scope="module")
def lora_module(tiny_sdxl_model_dir: Path) -> SDXLModule:
    # init_lora_weights False: random up matrices, so that every adapter changes its layer from the start.
    settings = LoraSettings(rank=4, alpha=8, init_lora_weights=False,
                            unet_target_modules=["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"])
    return SDXLModule(tiny_sdxl_model_dir, settings, train_text_encoder=True)


@pytest.fixture(scope="module")
def lora_export(lora_module: SDXLModule, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl-export") / "export"
    # Every file loaded back and compared inside (verify), the merged pipeline included.
    export_weights(lora_module, folder, ExportOptions(pipeline=True, single_file=False))
    return folder


def fresh_pipeline(model_dir: Path) -> StableDiffusionXLPipeline:
    pipeline = StableDiffusionXLPipeline.from_pretrained(model_dir, add_watermarker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def outputs(pipeline: StableDiffusionXLPipeline) -> dict[str, torch.Tensor]:
    """Both encoders' conditioning, one UNet prediction, and the latents of a 2-step DDIM generation, all seeded."""
    pipeline.scheduler = make_scheduler("ddim", pipeline.scheduler.config)
    ids = tokenize((pipeline.tokenizer, pipeline.tokenizer_2), [PROMPT])
    embeddings = encode_prompts((pipeline.text_encoder, pipeline.text_encoder_2), ids)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    time_ids = sdxl_time_ids((64, 64), (0, 0), (64, 64))
    return {
        "text_encoder": embeddings.encoder_hidden_states[..., : pipeline.text_encoder.config.hidden_size],
        "text_encoder_2": embeddings.pooled,
        "unet": pipeline.unet(latents, torch.tensor([500]), **unet_conditioning(embeddings, time_ids)).sample,
        "generation": pipeline(PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent", generator=generator).images,
    }


def module_outputs(module: SDXLModule) -> dict[str, torch.Tensor]:
    pipeline = inference_pipeline(module)
    pipeline.set_progress_bar_config(disable=True)
    return outputs(pipeline)


def test_lora_export_writes_the_folder_the_kohya_file_and_the_merged_pipeline(lora_export: Path) -> None:
    assert sorted(p.name for p in lora_export.iterdir()) == ["lora", "manifest.json", "pdm_lightning_lora.safetensors", "pipeline"]
    keys = load_file(lora_export / "lora" / LORA_WEIGHT_NAME).keys()
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}


def test_diffusers_folder_loads_into_sdxl_and_matches_the_module(lora_export: Path, lora_module: SDXLModule,
                                                                 tiny_sdxl_model_dir: Path) -> None:
    pipeline = fresh_pipeline(tiny_sdxl_model_dir)
    base = outputs(pipeline)
    pipeline.load_lora_weights(str(lora_export / "lora"))
    loaded, trained = outputs(pipeline), module_outputs(lora_module)
    for name in ("text_encoder", "text_encoder_2", "unet", "generation"):
        assert (loaded[name] - base[name]).abs().max() > 1e-4, f"the LoRA does not change the {name} output"
        torch.testing.assert_close(loaded[name], trained[name], rtol=1e-5, atol=1e-6, msg=name)


def test_kohya_file_uses_the_original_unet_layout_and_te1_te2(lora_export: Path, lora_module: SDXLModule) -> None:
    state = load_file(lora_export / KOHYA_FILE)
    layers = adapted_layers(lora_module)
    assert {name: len(component) for name, component in layers.items()} == {
        # 4 projections x 2 attentions x 11 transformer blocks (4 down, 1 mid, 6 up) + 17 resnets (6, 2, 9): time_emb_proj
        "unet": 4 * 2 * 11 + 17, "text_encoder": 4 * 2, "text_encoder_2": 4 * 3,
    }
    names = {key.split(".")[0] for key in state}
    assert len(names) == sum(len(component) for component in layers.values()) and len(state) == 3 * len(names)
    assert {name.split("_")[1] for name in names} == {"unet", "te1", "te2"}
    # diffusers down_blocks.1.attentions.0 / mid_block.attentions.0 / up_blocks.1.attentions.2 in the sgm numbering
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
                 "lora_unet_input_blocks_1_0_emb_layers_1",  # down_blocks.0.resnets.0.time_emb_proj
                 "lora_unet_output_blocks_8_0_emb_layers_1",  # up_blocks.2.resnets.2.time_emb_proj
                 "lora_te1_text_model_encoder_layers_1_self_attn_v_proj",
                 "lora_te2_text_model_encoder_layers_2_self_attn_out_proj"):
        assert name in names, name
    assert not any("down_blocks" in name or "up_blocks" in name for name in names)
    assert {float(state[name + ".alpha"]) for name in names} == {8.0}
    path = "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0"
    assert torch.equal(state["lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0.lora_up.weight"], layers["unet"][path].up)


def test_kohya_file_loads_back_with_the_same_weights(lora_export: Path, lora_module: SDXLModule, tiny_sdxl_model_dir: Path) -> None:
    pipeline = fresh_pipeline(tiny_sdxl_model_dir)
    pipeline.load_lora_weights(str(lora_export / KOHYA_FILE), adapter_name="kohya")
    for part, trained in adapted_layers(lora_module).items():
        loaded = lora_layers(getattr(pipeline, part), "kohya")
        assert loaded.keys() == trained.keys(), part
        for path, layer in trained.items():
            torch.testing.assert_close(loaded[path].delta(), layer.delta(), rtol=0, atol=0, msg=path)
    loaded_outputs, trained_outputs = outputs(pipeline), module_outputs(lora_module)
    for name in loaded_outputs:
        torch.testing.assert_close(loaded_outputs[name], trained_outputs[name], rtol=1e-5, atol=1e-6, msg=name)


def test_merged_pipeline_matches_the_module(lora_export: Path, lora_module: SDXLModule) -> None:
    merged = fresh_pipeline(lora_export / "pipeline")
    assert not any("lora" in key for key in merged.text_encoder_2.state_dict())
    merged_outputs, trained_outputs = outputs(merged), module_outputs(lora_module)
    for name in merged_outputs:  # fused weights: equal up to float rounding
        torch.testing.assert_close(merged_outputs[name], trained_outputs[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_second_encoder_layer_the_loader_misses_fails_verification(
    lora_export: Path, lora_module: SDXLModule, tiny_sdxl_model_dir: Path, tmp_path: Path
) -> None:
    state = load_file(lora_export / KOHYA_FILE)
    dropped = "lora_te2_text_model_encoder_layers_2_self_attn_q_proj"
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith(dropped + ".")}, broken)
    with pytest.raises(ExportVerificationError, match=r"text_encoder_2 as trained \(layers\): 1 missing \(text_model\.encoder\.layers\.2\.self_attn\.q_proj\)"):
        verify_lora_loads(fresh_pipeline(tiny_sdxl_model_dir), broken, adapted_layers(lora_module), torch.float32)


def test_full_fine_tune_exports_the_sdxl_pipeline_folder_and_single_file(tiny_sdxl_model_dir: Path, tmp_path: Path) -> None:
    module = SDXLModule(tiny_sdxl_model_dir, lora=None, train_text_encoder=True)
    options = ExportOptions()
    check_export_possible(module, options)
    # Verified inside: the folder loads back exactly, and from_single_file rebuilds every weight from the file.
    written = export_weights(module, tmp_path / "export", options)
    assert [path.name for path in written] == ["pipeline", "pdm_lightning.safetensors"]
    pipeline = fresh_pipeline(tmp_path / "export" / "pipeline")
    for part in ("unet", "text_encoder", "text_encoder_2"):
        expected = getattr(module, part).state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in getattr(pipeline, part).state_dict().items()), part
    single = StableDiffusionXLPipeline.from_single_file(
        str(tmp_path / "export" / "pdm_lightning.safetensors"), config=str(tmp_path / "export" / "pipeline"), local_files_only=True
    )
    expected = module.text_encoder_2.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in single.text_encoder_2.state_dict().items())


def test_sdxl_single_file_has_the_original_sgm_key_layout() -> None:
    """SDXL base's real shapes (meta tensors): the names of Stability's sd_xl_base_1.0.safetensors."""
    from pdm_lightning.export.single_file import fused_tensor_count, to_original_sdxl_layout
    from pdm_lightning.tiny_sdxl import SDXL_MODELS, meta_models

    models = meta_models(SDXL_MODELS)
    states = {name: model.state_dict() for name, model in models.items()}
    checkpoint = to_original_sdxl_layout(states["unet"], states["vae"], states["text_encoder"], states["text_encoder_2"],
                                         models["unet"].config, models["vae"].config)
    for key, shape in {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight": (640, 640),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "first_stage_model.decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),  # LDM: up.0 = full resolution
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.ln_final.bias": (1280,),
    }.items():
        assert tuple(checkpoint[key].shape) == shape, key
    assert len(checkpoint) + fused_tensor_count(checkpoint) == sum(len(state) for state in states.values())
