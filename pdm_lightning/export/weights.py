"""Everything one export writes for a trained module, as one set, each file checked by loading it back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info

from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME, write_lora_folder
from pdm_lightning.export.lora_kohya import write_kohya_file
from pdm_lightning.export.export_set import check_export_set, staged_set, write_manifest
from pdm_lightning.export.lora_layers import LoraWeights, has_lora, lora_layers
from pdm_lightning.export.parts import base_source, module_family, text_encoders
from pdm_lightning.export.pipeline import (
    fine_tuned_pipeline,
    merged_lora_pipeline,
    pipeline_state_dicts,
    single_file_checkpoint,
    write_pipeline_folder,
    write_single_file,
)
from pdm_lightning.export.single_file import check_single_file_support
from pdm_lightning.export.verify import (
    check_file,
    require_finite,
    verify_lora_loads,
    verify_pipeline_folder,
    verify_single_file,
)
from pdm_lightning.core.dtypes import DTYPES


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


def adapted_layers(module) -> dict[str, dict[str, LoraWeights]]:  # noqa: ANN001 - DreamBoothModule
    """Component (``unet``, ``text_encoder``, SDXL's ``text_encoder_2``) -> its LoRA layers, for the adapted ones."""
    layers = {"unet": lora_layers(module.unet)}
    layers.update({name: lora_layers(encoder) for name, encoder in text_encoders(module).items() if has_lora(encoder)})
    return layers


def export_weights(
    module, destination: Path, options: ExportOptions, step: int | None = None, settings_hash: str = ""  # noqa: ANN001 - DreamBoothModule
) -> list[Path]:
    """Writes the export set of ``module`` at ``destination``; returns the paths written (under ``destination``).

    LoRA runs: the diffusers LoRA folder and the kohya file (and, when ``options.pipeline``, the
    base model with the LoRA fused in). Full fine-tunes: the pipeline folder. A pipeline comes
    with its single original-layout file when ``options.single_file``. Everything is written into
    one staging folder with ``manifest.json`` (``step``, ``settings_hash``, each file's size and
    sha256) and replaces ``destination`` whole, with one rename, once complete: a previous set there is
    kept until then. Non-finite weights are refused before anything is written. With ``options.verify``
    every output is loaded back and compared with what was meant to be written, and the set with its
    manifest, before the switch.
    """
    dtype = DTYPES[options.dtype]
    with staged_set(destination) as staging:
        written = _write_set(module, staging, options, dtype)
        write_manifest(staging, step, settings_hash)
        if options.verify:
            check_export_set(staging)
    paths = [destination / path.relative_to(staging) for path in written]
    rank_zero_info(
        f"Exported {', '.join(str(path) for path in paths)}" + (" (each loaded back and checked)" if options.verify else "")
    )
    return paths


def _write_set(module, folder: Path, options: ExportOptions, dtype: torch.dtype) -> list[Path]:  # noqa: ANN001
    written: list[Path] = []
    if is_lora_module(module):
        pipeline = _export_lora(module, folder, options, dtype, written)
    else:
        pipeline = fine_tuned_pipeline(module, dtype) if options.wants_pipeline(is_lora=False) else None
    if pipeline is not None:
        _export_pipeline(pipeline, folder, options, written)
    return written


def _lora_tensors(layers: dict[str, LoraWeights], prefix: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter weights as they will be stored (in ``dtype``, where float16 can overflow to inf)."""
    for path, layer in layers.items():
        yield f"{prefix}{path}.lora_down", layer.down.to(dtype)
        yield f"{prefix}{path}.lora_up", layer.up.to(dtype)


def _export_lora(module, destination: Path, options: ExportOptions, dtype: torch.dtype, written: list[Path]):  # noqa: ANN001, ANN202
    """The LoRA files; returns the merged pipeline when one is asked for, else None."""
    layers = adapted_layers(module)
    family = module_family(module)
    require_finite(
        chain.from_iterable(_lora_tensors(component, f"{name}.", dtype) for name, component in layers.items()),
        "the LoRA adapters",
    )
    merge = options.wants_pipeline(is_lora=True)
    base = None  # the base model without adapters, float32: what the LoRA files are loaded into
    if options.verify or merge:
        base = base_source(module).pipeline(torch.float32)
        base.set_progress_bar_config(disable=True)
    lora_folder = destination / options.lora_dirname
    if options.lora_folder or merge:  # the merged pipeline is fused from the folder
        tensors = write_lora_folder(lora_folder, module.unet, text_encoders(module), dtype, family)
        if options.verify:
            check_file(lora_folder / LORA_WEIGHT_NAME, tensors)
            verify_lora_loads(base, lora_folder, layers, dtype)
        written.append(lora_folder)
    if options.lora_kohya:
        kohya_file = destination / options.kohya_file_name()
        base_model = str(module.hparams.pretrained_model_name_or_path)
        tensors = write_kohya_file(kohya_file, layers, dtype, base_model, family, module.unet.config)
        if options.verify:
            check_file(kohya_file, tensors)
            verify_lora_loads(base, kohya_file, layers, dtype)
        written.append(kohya_file)
    return merged_lora_pipeline(base, lora_folder, dtype) if merge else None


def _export_pipeline(pipeline, destination: Path, options: ExportOptions, written: list[Path]) -> None:  # noqa: ANN001
    """The pipeline folder, then the single file, whose load-back uses that folder as its config."""
    expected = pipeline_state_dicts(pipeline)
    require_finite(
        ((f"{part}.{key}", value) for part, state in expected.items() for key, value in state.items()), "the pipeline"
    )
    folder = destination / options.pipeline_dirname
    write_pipeline_folder(pipeline, folder)
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
