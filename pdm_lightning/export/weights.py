"""Everything one export writes for a trained module, each file checked by loading it back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME, write_lora_folder
from pdm_lightning.export.lora_kohya import write_kohya_file
from pdm_lightning.export.lora_layers import has_lora, lora_layers
from pdm_lightning.export.pipeline import (
    fine_tuned_pipeline,
    merged_lora_pipeline,
    pipeline_state_dicts,
    single_file_checkpoint,
    write_pipeline_folder,
    write_single_file,
)
from pdm_lightning.export.single_file import check_single_file_support
from pdm_lightning.export.verify import check_file, verify_lora_loads, verify_pipeline_folder, verify_single_file
from pdm_lightning.core.dtypes import DTYPES
from pdm_lightning.core.loading import load_pipeline


@dataclass
class ExportOptions:
    """What to write under the export folder (see ExportWeights for the meaning of each field)."""

    pipeline: bool | None = None
    single_file: bool = True
    lora_folder: bool = True
    lora_kohya: bool = True
    name: str = "pdm_lightning"
    pipeline_dirname: str = "pipeline"
    lora_dirname: str = "lora"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    verify: bool = True

    def wants_pipeline(self, is_lora: bool) -> bool:
        """None means: the pipeline for a full fine-tune, not for LoRA (whose files are the export)."""
        return (not is_lora) if self.pipeline is None else self.pipeline

    def single_file_name(self) -> str:
        return f"{self.name}.safetensors"

    def kohya_file_name(self) -> str:
        return f"{self.name}_lora.safetensors"


def is_lora_module(module) -> bool:  # noqa: ANN001 - DreamBoothModule
    return has_lora(module.unet)


def check_export_possible(module, options: ExportOptions) -> None:  # noqa: ANN001 - DreamBoothModule
    """Fails before training when a requested export cannot be written for this model."""
    if options.single_file and options.wants_pipeline(is_lora_module(module)):
        check_single_file_support(module.unet.config, module.vae.config, module.text_encoder.config)


def export_weights(module, destination: Path, options: ExportOptions) -> list[Path]:  # noqa: ANN001 - DreamBoothModule
    """Writes the exports of ``module`` under ``destination``; returns the paths written.

    LoRA runs: the diffusers LoRA folder and the kohya file (and, when ``options.pipeline``, the
    base model with the LoRA fused in). Full fine-tunes: the pipeline folder. A pipeline comes
    with its single original-layout file when ``options.single_file``. With ``options.verify``
    every output is loaded back and compared with what was meant to be written.
    """
    dtype = DTYPES[options.dtype]
    written: list[Path] = []
    if is_lora_module(module):
        pipeline = _export_lora(module, destination, options, dtype, written)
    else:
        pipeline = fine_tuned_pipeline(module, dtype) if options.wants_pipeline(is_lora=False) else None
    if pipeline is not None:
        _export_pipeline(pipeline, destination, options, written)
    rank_zero_info(
        f"Exported {', '.join(str(path) for path in written)}" + (" (each loaded back and checked)" if options.verify else "")
    )
    return written


def _export_lora(module, destination: Path, options: ExportOptions, dtype: torch.dtype, written: list[Path]):  # noqa: ANN001, ANN202
    """The LoRA files; returns the merged pipeline when one is asked for, else None."""
    unet_layers = lora_layers(module.unet)
    text_encoder_layers = lora_layers(module.text_encoder) if has_lora(module.text_encoder) else {}
    merge = options.wants_pipeline(is_lora=True)
    base = None  # the base model without adapters, float32: what the LoRA files are loaded into
    if options.verify or merge:
        hparams = module.hparams
        base = load_pipeline(hparams.pretrained_model_name_or_path, hparams.revision, hparams.variant, torch.float32)
        base.set_progress_bar_config(disable=True)
    lora_folder = destination / options.lora_dirname
    if options.lora_folder or merge:  # the merged pipeline is fused from the folder
        tensors = write_lora_folder(lora_folder, module.unet, module.text_encoder, dtype)
        if options.verify:
            check_file(lora_folder / LORA_WEIGHT_NAME, tensors)
            verify_lora_loads(base, lora_folder, unet_layers, text_encoder_layers, dtype)
        written.append(lora_folder)
    if options.lora_kohya:
        kohya_file = destination / options.kohya_file_name()
        base_model = str(module.hparams.pretrained_model_name_or_path)
        tensors = write_kohya_file(kohya_file, unet_layers, text_encoder_layers, dtype, base_model)
        if options.verify:
            check_file(kohya_file, tensors)
            verify_lora_loads(base, kohya_file, unet_layers, text_encoder_layers, dtype)
        written.append(kohya_file)
    return merged_lora_pipeline(base, lora_folder, dtype) if merge else None


def _export_pipeline(pipeline, destination: Path, options: ExportOptions, written: list[Path]) -> None:  # noqa: ANN001
    """The pipeline folder, then the single file, whose load-back uses that folder as its config."""
    folder = destination / options.pipeline_dirname
    write_pipeline_folder(pipeline, folder)
    expected = pipeline_state_dicts(pipeline)
    if options.verify:
        verify_pipeline_folder(folder, expected)
    written.append(folder)
    if options.single_file:
        single_file = destination / options.single_file_name()
        checkpoint = single_file_checkpoint(pipeline)
        write_single_file(checkpoint, single_file)
        if options.verify:
            verify_single_file(single_file, folder, checkpoint, expected)
        written.append(single_file)
