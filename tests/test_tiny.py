"""The tiny random pipeline: SD1.5 topology, offline tokenizer, loads through from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pdm_lightning.tiny import build_bpe_files, main, save_tiny_pipeline


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
