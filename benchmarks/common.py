"""What the PDM benchmarks share: the base model (the tiny random one unless given) and the CPU thread count."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch


def add_model_and_threads_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pretrained_model_name_or_path", default=None, help="default: the tiny random model, built in a temp folder"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")


@contextmanager
def benchmark_workspace(args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    """Applies ``--threads`` and yields (base model, a temporary folder removed afterwards)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.pretrained_model_name_or_path
        if model is None:
            from pdm_lightning.tiny import save_tiny_pipeline

            model = str(save_tiny_pipeline(Path(tmp) / "tiny-sd"))
        yield model, Path(tmp)
