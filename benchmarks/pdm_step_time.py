"""Training step time with and without the PDM loss (bank and on-the-fly teachers), through the real CLI.

    python benchmarks/pdm_step_time.py                  # tiny random model, CPU, 64 px, batch 1
    python benchmarks/pdm_step_time.py --config configs/sd15/base.yaml --config configs/sd15/dreambooth.yaml --resolution 512 --accelerator gpu \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5

Each variant trains ``--steps`` steps after ``--warmup`` untimed ones (the teacher bank is built
beforehand and not timed: see benchmarks/pdm_features.py for extraction). Prints the mean step
time and peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on a GPU) per variant.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.common import add_model_and_threads_arguments, benchmark_workspace  # noqa: E402
from pdm_lightning.cli import cli_main  # noqa: E402

VARIANTS = {
    "DreamBooth (no PDM)": [],
    "PDM, bank teacher": ["--model.pdm", "{}"],
    "PDM, on-the-fly teacher": ["--model.pdm", "{}", "--model.pdm.teacher", "on_the_fly"],
}


class StepTimer(L.Callback):
    """Wall time of each training step (forward, backward, optimizer), synchronised on CUDA."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def _sync(self, trainer: L.Trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._sync(trainer)
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self._sync(trainer)
        self.seconds.append(time.perf_counter() - self.start)


def run_variant(common: list[str], extra: list[str], steps: int, warmup: int) -> tuple[float, str]:
    cli = cli_main([*common, *extra, "--trainer.max_steps", str(steps + warmup)], run=False)
    timer = StepTimer()
    cli.trainer.callbacks.append(timer)
    device = cli.trainer.strategy.root_device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cli.trainer.fit(cli.model, cli.datamodule)
    peak = (
        f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
        if device.type == "cuda"
        else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB RSS (process peak so far)"
    )
    return statistics.mean(timer.seconds[warmup:]), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "quickstart.yaml"))
    add_model_and_threads_arguments(parser)
    parser.add_argument("--instance_data_dir", default=str(REPO_ROOT / "examples" / "dog"))
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--inversion_steps", type=int, default=50, help="bank trajectory (step time does not depend on it)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default=None, help="default: the config's")
    parser.add_argument("--lora_rank", type=int, default=None, help="train LoRA adapters of this rank")
    args = parser.parse_args(argv)

    with benchmark_workspace(args) as (model, tmp):
        common = [
            "--config", args.config,
            "--model.pretrained_model_name_or_path", model,
            "--data.instance_data_dir", args.instance_data_dir,
            "--data.with_prior_preservation", "false",
            "--data.resolution", str(args.resolution),
            "--data.train_batch_size", str(args.batch_size),
            "--model.pdm.inversion_steps", str(args.inversion_steps),
            "--model.pdm.cache_dir", str(tmp / "bank-cache"),
            "--trainer.accelerator", args.accelerator,
            "--trainer.logger.init_args.save_dir", str(tmp / "run"),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--checkpoint.every_n_train_steps", "100000", "--checkpoint.save_last", "false",
            "--samples.at_fit_end", "false",
        ]
        if args.precision:
            common += ["--trainer.precision", args.precision]
        if args.lora_rank:
            common += ["--model.lora.rank", str(args.lora_rank)]
        for name, extra in VARIANTS.items():
            seconds, peak = run_variant(common, extra, args.steps, args.warmup)
            print(f"{name:26s} {seconds * 1000:8.1f} ms/step   {peak}", flush=True)


if __name__ == "__main__":
    main()
