"""A tiny random Stable-Diffusion-shaped pipeline for the quickstart and the tests.

    python -m pdm_lightning.tiny runs/tiny-sd

It has SD1.5's topology (4 UNet levels, 2 layers per block, cross-attention in the first three
down and last three up blocks, so the PDM layer ``up_blocks[3].attentions[2]`` exists), SD1.5's
noise schedule, a VAE with the same 8x downsampling and 4 latent channels, and a CLIP tokenizer
built offline from a small vocabulary. Weights are random: it exercises every code path in seconds
on a CPU but generates noise. It is saved with ``save_pretrained`` and loaded through the same
``from_pretrained`` path as a real model.
"""

from __future__ import annotations

import sys

from pdm_lightning.core import console

if __name__ == "__main__":  # quiet third-party notices before the imports below print them
    console.install(sys.argv)

import argparse  # noqa: E402
import json
import tempfile
from pathlib import Path
from typing import Literal

import torch

from pdm_lightning.core.atomic import staged_directory

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Whole-word tokens, so that prompts tokenize into words as with the real CLIP vocabulary.
VOCAB_WORDS = (
    "a an the of in on with and at by for to photo picture sks xjy dog cat backpack bear plushie bowl can "
    "candle clock sneaker boot glasses teapot toy vase cartoon monster robot duck person man woman beach "
    "snow jungle city street forest mountain table floor grass water red blue green purple shiny wet cube "
    "top background front view style painting wearing hat santa chef police outfit rainbow scarf"
).split()
DEFAULT_RESOLUTION = 64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level BPE alphabet: every byte mapped to a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def build_bpe_files(words: tuple[str, ...] = VOCAB_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary and merge list: all bytes, plus left-to-right merges spelling ``words``."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [f"{c}</w>" for c in alphabet]
    merges: list[str] = []
    known = set(tokens)
    # Longer words first: BPE applies the lowest-ranked merge first, so a short word's merges
    # (e.g. "t o</w>" of "to") must not split a longer one ("photo").
    for word in sorted(words, key=len, reverse=True):
        pieces = list(word[:-1]) + [f"{word[-1]}</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in known:
                merges.append(f"{current} {piece}")
                tokens.append(merged)
                known.add(merged)
            current = merged
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(folder: Path):  # noqa: ANN201 - transformers CLIPTokenizer
    """Writes vocab.json + merges.txt into ``folder`` and loads them as a CLIPTokenizer (77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def build_tiny_pipeline(
    seed: int = 0, prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
):  # noqa: ANN201 - diffusers StableDiffusionPipeline
    """The tiny random pipeline in memory (deterministic for a given seed)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    unet = UNet2DConditionModel(
        sample_size=DEFAULT_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEFAULT_RESOLUTION,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    # SD1.5's training schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    overwrite: bool = False,
) -> Path:
    """Saves the tiny pipeline to ``out_dir`` (atomically); an existing tiny model is kept unless ``overwrite``."""
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file() and not overwrite:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a pipeline folder: choose an empty or new folder.")
    pipeline = build_tiny_pipeline(seed=seed, prediction_type=prediction_type)
    with staged_directory(out_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the pipeline to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if out_dir already holds a pipeline")
    args = parser.parse_args(argv)
    path = save_tiny_pipeline(args.out_dir, args.seed, args.prediction_type, args.overwrite)
    print(f"Tiny Stable-Diffusion-shaped pipeline in {path}")


if __name__ == "__main__":
    main()
