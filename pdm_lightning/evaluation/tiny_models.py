"""Tiny random CLIP and DINO (ViT) models with their processors, for tests and the CPU quickstart.

    python -m pdm_lightning.evaluation.tiny_models runs/tiny-eval   # -> runs/tiny-eval/{clip,dino}

They are saved with ``save_pretrained`` and loaded back through the same ``from_pretrained`` code
as the real ``openai/clip-vit-base-patch32`` / ``facebook/dino-vits16``; their embeddings are
random, so the metrics they give exercise the code, not the model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.tiny import build_tokenizer

IMAGE_SIZE = 32
_MEAN, _STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def save_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """A 2-layer CLIP (text + vision, projection 16) with tokenizer and image processor in ``out_dir``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    text = {"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": IMAGE_SIZE, "patch_size": 8}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                   image_mean=_MEAN, image_std=_STD)
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        processor.save_pretrained(staging)
    return out_dir


def save_tiny_dino(out_dir: str | Path, seed: int = 0) -> Path:
    """A 2-layer ViT (hidden 24, patch 8) with a ViT image processor in ``out_dir``, shaped like DINO's."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = ViTModel(ViTConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                               image_size=IMAGE_SIZE, patch_size=8))
    processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=_MEAN, image_std=_STD)
    with staged_directory(out_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
    return out_dir


def save_tiny_evaluation_models(out_dir: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Both models under ``out_dir``: returns (clip folder, dino folder); existing ones are kept."""
    out_dir = Path(out_dir)
    clip, dino = out_dir / "clip", out_dir / "dino"
    if not (clip / "config.json").is_file():
        save_tiny_clip(clip, seed)
    if not (dino / "config.json").is_file():
        save_tiny_dino(dino, seed)
    return clip, dino


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write clip/ and dino/ to")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    clip, dino = save_tiny_evaluation_models(args.out_dir, args.seed)
    print(f"Tiny CLIP in {clip}, tiny DINO in {dino}")


if __name__ == "__main__":
    main()
