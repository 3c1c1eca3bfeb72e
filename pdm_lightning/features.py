"""Extracts the PDM teacher features (the query bank) ahead of training.

    python -m pdm_lightning.features --pretrained_model_name_or_path M --instance_data_dir DIR \\
        --class_prompt "a photo of dog" --resolution 512 --out OUT

writes one ``<image stem>.safetensors`` per instance image into OUT (named after the photos' stems,
for the user; the training cache names its files by the photos' content instead) with ``queries``
[timesteps, tokens, dim] (row t = timestep t in the default faithful mode), ``timesteps``, a crc32 of
every row (``<name>_crc32``), and the settings in the file's metadata. Finished files are reused after
every row passes its checksum, so an interrupted run resumes per image; a damaged or mismatching
file in OUT is an error naming it (OUT is never rewritten: delete the file to rebuild it).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.images import validate_image_folder
from pdm_lightning.core.dtypes import DTYPES
from pdm_lightning.pdm.bank import MODES, STORAGE_DTYPES, BankSettings, QueryBank, build_bank
from pdm_lightning.pdm.capture import default_pdm_layer_for_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pdm_lightning.features", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="base model: local diffusers folder or hub id")
    parser.add_argument("--revision", default=None, help="hub revision of the base model")
    parser.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    parser.add_argument(
        "--vae_name_or_path", default=None,
        help="a VAE replacing the base model's (as --model.vae_name_or_path), e.g. madebyollin/sdxl-vae-fp16-fix",
    )
    parser.add_argument("--instance_data_dir", required=True, help="folder of the subject's photos (read only)")
    parser.add_argument("--class_prompt", required=True, help='the prompt the inversion is conditioned on, e.g. "a photo of dog"')
    parser.add_argument("--resolution", type=int, required=True, help="training resolution (each image's center crop)")
    parser.add_argument("--out", required=True, help="output folder (created; finished files in it are reused)")
    parser.add_argument("--dtype", choices=tuple(STORAGE_DTYPES), default="float16", help="storage dtype of the queries")
    parser.add_argument(
        "--inversion_steps", type=int, default=None,
        help="DDIM inversion steps (default: the faithful 999, a row for every t = 0..999)",
    )
    parser.add_argument(
        "--mode", choices=MODES, default="bank",
        help="bank: queries; latents: reconstruction latents only (on-the-fly targets); both",
    )
    parser.add_argument(
        "--layer", default=None,
        help="module path of the captured query projection (default: the model's own by the rule of docs/pdm.md: "
        "SD1.5's up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q, SDXL's up_blocks.1.attentions.2...)",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="images inverted together (one UNet call per step)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--compute_dtype", choices=tuple(DTYPES), default="float32", help="dtype the models run in")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser


def check_out_folder(out: Path, instance_dir: Path) -> None:
    """Refuses an output folder inside the instance folder: the photos' folder is only ever read."""
    if out.resolve().is_relative_to(instance_dir.resolve()):
        raise InputDataError(
            f"--out {out} lies inside --instance_data_dir {instance_dir}, which is never written to: choose an "
            "output folder elsewhere, e.g. runs/pdm-bank."
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pdm_lightning.core.loading import ModelSource

    try:
        images = validate_image_folder(args.instance_data_dir, "--instance_data_dir", args.resolution)
        check_out_folder(Path(args.out), Path(args.instance_data_dir))
        source = ModelSource(args.pretrained_model_name_or_path, args.revision, args.variant, args.vae_name_or_path)
        source.check()
        settings = BankSettings(
            pretrained_model_name_or_path=args.pretrained_model_name_or_path,
            class_prompt=args.class_prompt,
            resolution=args.resolution,
            revision=args.revision,
            variant=args.variant,
            layer=args.layer or default_pdm_layer_for_config(source.unet_config()),
            inversion_steps=args.inversion_steps,
            dtype=args.dtype,
            mode=args.mode,
            compute_dtype=args.compute_dtype,
            vae_name_or_path=args.vae_name_or_path,
        )
        start = time.perf_counter()
        report = build_bank(
            settings, images, args.out, batch_size=args.batch_size, device=args.device, progress=not args.no_progress
        )
    except (InputDataError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    seconds = time.perf_counter() - start
    bank = QueryBank(report.files)
    rows = len(bank.timesteps)
    contents = []
    if bank.has_queries:
        contents.append(f"queries [{rows}, {', '.join(map(str, bank.query_shape))}] {args.dtype}")
    if bank.has_latents:
        contents.append(f"latents [{rows}, {', '.join(map(str, bank.latent_shape))}] float32")
    shape = ", ".join(contents)
    print(
        f"{report.folder}: {report.computed} images extracted ({report.unet_calls} UNet calls, {seconds:.1f} s), "
        f"{report.reused} reused; {shape}; {bank.bytes_per_image() / 2**20:.2f} MB per image."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
