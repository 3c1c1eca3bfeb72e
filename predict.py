"""Generate images from a trained subject: an exported pipeline, a LoRA on its base model, or a checkpoint.

    python predict.py --pipeline runs/quickstart/export/pipeline --prompt "a photo of sks dog on the beach"
    python predict.py --pretrained_model_name_or_path runs/tiny-sd --lora runs/lora/export/lora \\
        --prompts_file prompts.txt --identifier sks --class_noun dog
    python predict.py --checkpoint runs/quickstart/checkpoints/last.ckpt --prompt "a {identifier} {class_noun}" \\
        --identifier sks --class_noun dog

Writes --num_images PNGs per prompt (prompt, seed and sampler in their metadata) and a grid per prompt
(in grids/) to --out (default: outputs/ in the current directory). Image k of every prompt uses the seed
derived from (--seed, k): the same seed gives the same images, whatever the batch size.
"""

from __future__ import annotations

import argparse
import sys

from pdm_lightning.core import console

if __name__ == "__main__":  # before the imports below: transformers prints its notices while diffusers imports
    console.install(sys.argv)  # --verbose (taken off the command line) keeps them

import torch  # this import and the ones below: after console.install

from pdm_lightning.core.dtypes import DTYPES
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.generation.jobs import chunked, plan_jobs
from pdm_lightning.generation.prompts import collect_prompts
from pdm_lightning.generation.sampling import generate_images
from pdm_lightning.generation.schedulers import SCHEDULERS
from pdm_lightning.generation.settings import GenerationSettings
from pdm_lightning.predict_sources import build_pipeline

DEFAULTS = GenerationSettings()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_argument_group("model (exactly one of --pipeline, --lora, --checkpoint)")
    source.add_argument("--pipeline", help="exported pipeline folder (<run>/export/pipeline) or a diffusers SD / SDXL folder")
    source.add_argument("--lora", help="LoRA folder or .safetensors file (diffusers or kohya), on the base model; "
                        "a .bin is read weights-only (tensors, never code)")
    source.add_argument("--checkpoint", help="training checkpoint (<run>/checkpoints/*.ckpt)")
    source.add_argument("--pretrained_model_name_or_path",
                        help="base model: required with --lora; with --checkpoint it replaces the recorded one")
    prompts = parser.add_argument_group("prompts ({identifier}/{0} and {class_noun}/{1} are filled in)")
    prompts.add_argument("--prompt", action="append", default=[], help="prompt; repeat for several")
    prompts.add_argument("--prompts_file", help="text file, one prompt per line (# comments and blank lines skipped)")
    prompts.add_argument("--identifier", help="value of {identifier}, e.g. sks")
    prompts.add_argument("--class_noun", help="value of {class_noun}, e.g. dog")
    parser.add_argument("--out", default="outputs",
                        help="folder for the PNGs, created if missing (default: outputs/ in the current directory); "
                        "a grid per prompt in OUT/grids")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULTS.num_inference_steps, help="sampler steps")
    parser.add_argument("--guidance_scale", type=float, default=DEFAULTS.guidance_scale)
    parser.add_argument("--negative_prompt", default=DEFAULTS.negative_prompt)
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), default=DEFAULTS.scheduler, help="sampler")
    parser.add_argument("--height", type=int, default=DEFAULTS.height, help="default: the model's native size")
    parser.add_argument("--width", type=int, default=DEFAULTS.width, help="default: the model's native size")
    parser.add_argument("--batch_size", type=int, default=4, help="images per sampling batch")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    return parser


def main(argv: list[str] | None = None) -> list:
    args = build_parser().parse_args(argv)
    try:
        # Prompts and settings are checked before any weights are read.
        prompts = collect_prompts(args.prompt, args.prompts_file, args.identifier, args.class_noun)
        settings = GenerationSettings(
            args.steps, args.guidance_scale, args.negative_prompt, args.scheduler, args.height, args.width
        )
        chunked(plan_jobs(prompts, args.num_images, args.seed), args.batch_size)
        pipeline, model = build_pipeline(
            args.pipeline, args.pretrained_model_name_or_path, args.lora, args.checkpoint, DTYPES[args.dtype]
        )
    except InputDataError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    paths = generate_images(
        pipeline.to(device), prompts, args.out, num_images=args.num_images, seed=args.seed, settings=settings,
        batch_size=args.batch_size, model=model,
    )
    print(summary(len(paths), len(prompts), args.out))
    return paths


def counted(count: int, noun: str) -> str:
    """``1 grid``, ``3 grids``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def summary(num_images: int, num_grids: int, out: str) -> str:
    """The last line printed: what was written, and where (the folder named even when it is the default)."""
    folder = str(out) if str(out).endswith("/") else f"{out}/"
    return f"Wrote {counted(num_images, 'image')} and {counted(num_grids, 'grid')} to {folder} (grids in {folder}grids/)"


if __name__ == "__main__":
    main()
