"""The tiny random pipeline (SD1.5 topology, offline tokenizer, loads through from_pretrained) and the preset registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pdm_lightning.tiny import (
    PRESETS,
    SD15_PARAMETER_COUNTS,
    SD21_PARAMETER_COUNTS,
    TINY_PARAMETER_COUNTS,
    PresetSizeError,
    PresetSpec,
    build_bpe_files,
    check_parameter_counts,
    main,
    meta_parameter_counts,
    save_preset_pipeline,
    save_tiny_pipeline,
)


def test_loads_with_sd15_topology(tiny_model_dir: Path) -> None:
    """4 UNet levels, 2 layers per block, cross-attention where SD1.5 has it, the PDM layer present."""
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    unet = pipeline.unet
    assert list(unet.config.down_block_types) == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert list(unet.config.up_block_types) == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert unet.config.layers_per_block == 2
    assert len(unet.up_blocks[3].attentions) == 3
    to_q = unet.up_blocks[3].attentions[2].transformer_blocks[0].attn1.to_q
    assert isinstance(to_q, torch.nn.Linear)
    assert pipeline.vae_scale_factor == 8
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.scheduler.config.prediction_type == "epsilon"


def test_tokenizer_splits_prompt_into_words(tiny_model_dir: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    tokens = pipeline.tokenizer.convert_ids_to_tokens(pipeline.tokenizer("a photo of sks dog").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>", "<|endoftext|>"]
    assert pipeline.tokenizer.model_max_length == 77


def test_bpe_files_cover_all_bytes() -> None:
    vocab, merges = build_bpe_files(("dog", "do"))
    assert len(set(vocab.values())) == len(vocab)
    assert "dog</w>" in vocab and "do</w>" in vocab
    assert merges[0] == "d o"  # the longer word's merges come first


def test_generates_an_image(tiny_model_dir: Path) -> None:
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a photo of dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_same_seed_same_weights_and_existing_model_kept(tmp_path: Path) -> None:
    first = save_tiny_pipeline(tmp_path / "a", seed=3)
    second = save_tiny_pipeline(tmp_path / "b", seed=3)
    name = "unet/diffusion_pytorch_model.safetensors"
    assert (first / name).read_bytes() == (second / name).read_bytes()
    before = (first / name).stat().st_mtime_ns
    save_tiny_pipeline(first, seed=4)  # an existing model is kept
    assert (first / name).stat().st_mtime_ns == before


def test_refuses_a_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a pipeline folder"):
        main([str(tmp_path / "photos")])
    assert (tmp_path / "photos" / "keep.txt").read_text() == "mine"


# --- the preset registry -----------------------------------------------------------------------------


def test_tiny_is_the_default_preset_and_unchanged(tmp_path: Path, tiny_model_dir: Path) -> None:
    rebuilt = save_preset_pipeline(tmp_path / "tiny")  # preset="tiny", seed 0, as the fixture's save_tiny_pipeline
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"):
        assert (rebuilt / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    assert meta_parameter_counts(PRESETS["tiny"]) == TINY_PARAMETER_COUNTS


@pytest.mark.parametrize("preset", ["sd15", "sd21"])
def test_real_shape_presets_have_the_published_parameter_counts(preset: str) -> None:
    """Built on the meta device (no memory, no init): each component's count is the published one."""
    spec = PRESETS[preset]
    assert meta_parameter_counts(spec) == dict(spec.parameter_counts)
    assert spec.parameter_counts == {"sd15": SD15_PARAMETER_COUNTS, "sd21": SD21_PARAMETER_COUNTS}[preset]


def test_real_shape_presets_assemble_like_the_published_pipelines(clip_tokenizer) -> None:
    from diffusers import DDIMScheduler, PNDMScheduler

    def assembled(preset: str):
        spec = PRESETS[preset]
        with torch.device("meta"):
            models = {name: build() for name, build in spec.models.items()}
        return spec.pipeline(models, spec.prediction_type)

    sd15 = assembled("sd15")
    assert isinstance(sd15.scheduler, PNDMScheduler) and sd15.scheduler.config.prediction_type == "epsilon"
    assert sd15.scheduler.config.beta_schedule == "scaled_linear" and sd15.scheduler.config.beta_end == 0.012
    assert sd15.unet.config.cross_attention_dim == 768 and sd15.unet.config.attention_head_dim == 8
    assert sd15.text_encoder.config.hidden_act == "quick_gelu" and sd15.text_encoder.config.projection_dim == 768
    assert sd15.vae.config.scaling_factor == 0.18215 and sd15.vae.config.sample_size == 512
    assert sd15.tokenizer("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert sd15.tokenizer.pad_token == "<|endoftext|>" and sd15.vae_scale_factor == 8

    sd21 = assembled("sd21")
    assert isinstance(sd21.scheduler, DDIMScheduler) and sd21.scheduler.config.prediction_type == "v_prediction"
    assert list(sd21.unet.config.attention_head_dim) == [5, 10, 20, 20] and sd21.unet.config.use_linear_projection
    assert sd21.unet.config.cross_attention_dim == 1024 and sd21.unet.config.sample_size == 96
    assert sd21.text_encoder.config.num_hidden_layers == 23 and sd21.text_encoder.config.hidden_act == "gelu"
    assert sd21.tokenizer.pad_token == "!" and sd21.tokenizer.pad_token_id == 0
    assert PRESETS["sd21"].resolution == 768 and PRESETS["sd15"].resolution == 512


def test_wrong_sizes_fail_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = PRESETS["tiny"]
    wrong = PresetSpec(description="tiny, expecting other sizes", models=tiny.models, pipeline=tiny.pipeline,
                       parameter_counts={**TINY_PARAMETER_COUNTS, "unet": 859_520_964})
    monkeypatch.setitem(PRESETS, "wrong", wrong)
    with pytest.raises(PresetSizeError, match=r"'wrong'.*unet 3,222,692 \(expected 859,520,964\)"):
        save_preset_pipeline(tmp_path / "wrong", preset="wrong")
    assert not (tmp_path / "wrong").exists()
    with pytest.raises(PresetSizeError, match=r"vae 0 \(expected 5\)"):
        check_parameter_counts("x", {"unet": 1}, {"unet": 1, "vae": 5})


def test_command_line_presets_and_dtype(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["--preset", "tiny", "--dtype", "float16", "--prediction_type", "v_prediction", str(tmp_path / "half")])
    assert f"Tiny Stable-Diffusion-shaped pipeline in {tmp_path / 'half'}" in capsys.readouterr().out
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "half")
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    from safetensors import safe_open

    with safe_open(tmp_path / "half" / "unet" / "diffusion_pytorch_model.safetensors", "pt") as weights:
        assert weights.get_tensor("conv_in.weight").dtype == torch.float16
    with pytest.raises(SystemExit):
        main(["--preset", "sd3", str(tmp_path / "x")])
    assert "invalid choice: 'sd3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    assert all(f"  {name}" in help_text for name in PRESETS)
