"""Extraction figures of the PDM teacher bank: seconds and disk MB per image, peak memory.

    python benchmarks/pdm_features.py                      # tiny random model, CPU, faithful 999 steps, 64 px
    python benchmarks/pdm_features.py --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --resolution 512 --device cuda --compute_dtype float16

Peak memory is the process's peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. The
reference implementation's figures (docs/method.md): about 2000 UNet calls, 120 s and 131 MB per image on
a tiny CPU model; a float32 bank of 5.2 GB per image at 512 px, all on the GPU.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import add_model_and_threads_arguments, benchmark_workspace  # noqa: E402
from pdm_lightning.core.images import list_image_files
from pdm_lightning.core.loading import load_components
from pdm_lightning.pdm.bank import BankSettings, QueryBank, build_bank  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_threads_arguments(parser)
    parser.add_argument("--instance_data_dir", default=str(REPO_ROOT / "examples" / "dog"))
    parser.add_argument("--num_images", type=int, default=1)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--inversion_steps", type=int, default=None, help="default: faithful (999)")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--mode", choices=("bank", "latents", "both"), default="bank")
    parser.add_argument("--compute_dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    with benchmark_workspace(args) as (model, tmp):
        images = list_image_files(args.instance_data_dir, "--instance_data_dir")[: args.num_images]
        settings = BankSettings(
            model, "a photo of dog", args.resolution, inversion_steps=args.inversion_steps, dtype=args.dtype,
            mode=args.mode, compute_dtype=args.compute_dtype,
        )
        components = load_components(model)  # loading time is not extraction time
        device = torch.device(args.device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        report = build_bank(settings, images, tmp / "bank", batch_size=args.batch_size, device=device,
                            components=components)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        bank = QueryBank(report.files)
        shape = bank.query_shape or bank.latent_shape
        peak = (
            f"peak GPU memory allocated {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"
            if device.type == "cuda"
            else f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
        )
        print(
            f"{len(images)} image(s), {args.resolution} px, {len(bank.timesteps)} rows of {list(shape)}, mode {args.mode}, "
            f"{args.dtype}, batch {args.batch_size}, {device}, compute {args.compute_dtype}: "
            f"{report.unet_calls} UNet calls, {seconds / len(images):.2f} s per image, "
            f"{bank.bytes_per_image() / 2**20:.2f} MB per image on disk, {peak}"
        )
        shutil.rmtree(tmp / "bank")


if __name__ == "__main__":
    main()
