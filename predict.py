"""Generate images from an exported pipeline (``<run>/export/pipeline``).

    python predict.py --pipeline runs/quickstart/export/pipeline --prompt "a photo of sks dog on the beach"
"""

from __future__ import annotations

import argparse

from pdm_lightning.generate import generate_images
from pdm_lightning.model.loading import DTYPES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="exported pipeline folder (or any diffusers SD folder)")
    parser.add_argument("--prompt", action="append", required=True, help="prompt; repeat for several")
    parser.add_argument("--out", default="outputs", help="folder for the PNGs")
    parser.add_argument("--num_images", type=int, default=4, help="images per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=30, help="sampler steps")
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args(argv)
    paths = generate_images(
        args.pipeline,
        args.prompt,
        args.out,
        num_images=args.num_images,
        seed=args.seed,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        device=args.device,
        dtype=DTYPES[args.dtype],
    )
    print(f"Wrote {len(paths)} images to {args.out}")


if __name__ == "__main__":
    main()
