"""Loading every export back the way users load it, and failing loudly on any difference.

The most common complaint about exported weights is a LoRA another tool silently ignores: a key
nobody reads, or a layer left at its base weight. Each check here compares key sets exactly and
tensors value for value (a NaN equals a NaN in the same place, and is reported as NaN), and
raises ExportVerificationError naming what is missing, unexpected or different. Non-finite weights
are refused before anything is written (``require_finite``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from pdm_lightning.core.loading import TEXT_ENCODER_NAMES, family_of_pipeline, model_family, pipeline_class, pipeline_options

from pdm_lightning.export.lora_layers import LoraWeights, lora_layers
from pdm_lightning.export.single_file import fused_tensor_count
from pdm_lightning.training.nonfinite import first_nonfinite

SHOWN_PER_LIST = 8  # keys listed per category in an error message; the count is always complete


class ExportVerificationError(RuntimeError):
    """An exported file or folder does not load back as exactly what was written."""


class NonFiniteExportError(ValueError):
    """The weights to export hold NaN or infinite values; nothing was written."""


def require_finite(named: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Refuses (NonFiniteExportError naming the first bad tensor) to export NaN or infinite weights."""
    bad = first_nonfinite(named)
    if bad is not None:
        raise NonFiniteExportError(
            f"Refusing to export {what}: {bad}. Nothing was written. The run's weights diverged (lower the "
            "learning rate and resume from the last checkpoint), or a float16 export overflowed "
            "(--export.dtype bfloat16 or float32)."
        )


def same_values(want: torch.Tensor, got: torch.Tensor) -> bool:
    """Equal values, where a NaN equals a NaN in the same place (``torch.equal`` says NaN != NaN)."""
    if torch.equal(want, got):
        return True
    if not want.is_floating_point():
        return False
    nan = torch.isnan(want)
    return bool(nan.any()) and torch.equal(nan, torch.isnan(got)) and torch.equal(want.masked_fill(nan, 0), got.masked_fill(nan, 0))


def _nan_note(want: torch.Tensor, got: torch.Tensor) -> str:
    """`` (NaN: 3 written, 0 loaded)`` when either side holds NaN, so a NaN is reported as a NaN."""
    counts = [int(torch.isnan(t).sum()) if t.is_floating_point() else 0 for t in (want, got)]
    return f" (NaN: {counts[0]} written, {counts[1]} loaded)" if any(counts) else ""


@dataclass
class StateDictDifferences:
    missing: list[str] = field(default_factory=list)  # expected, absent (or not loaded) in the actual dict
    unexpected: list[str] = field(default_factory=list)  # present, not expected
    mismatched: list[str] = field(default_factory=list)  # present in both, with another shape, dtype or value

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mismatched)

    def describe(self) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mismatching", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:SHOWN_PER_LIST]) + (", ..." if len(keys) > SHOWN_PER_LIST else "")
                parts.append(f"{len(keys)} {label} ({shown})")
        return "; ".join(parts)


def state_dict_differences(
    expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], compare_dtype: bool = True
) -> StateDictDifferences:
    """Key-set and bitwise tensor comparison; a tensor still on the meta device counts as missing."""
    differences = StateDictDifferences()
    for key in sorted(expected.keys() - actual.keys()):
        differences.missing.append(key)
    for key in sorted(actual.keys() - expected.keys()):
        differences.unexpected.append(key)
    for key in sorted(expected.keys() & actual.keys()):
        want, got = expected[key], actual[key]
        if got.device.type == "meta":
            differences.missing.append(f"{key} (not loaded)")
        elif want.shape != got.shape or (compare_dtype and want.dtype != got.dtype):
            differences.mismatched.append(f"{key} ({tuple(want.shape)} {want.dtype} vs {tuple(got.shape)} {got.dtype})")
        elif not same_values(want.cpu().to(got.dtype), got.cpu()):
            differences.mismatched.append(key + _nan_note(want, got))
    return differences


def check_state_dict(expected: Mapping[str, torch.Tensor], actual: Mapping[str, torch.Tensor], what: str, compare_dtype: bool = True) -> None:
    """Raises ExportVerificationError when ``actual`` is not exactly ``expected``."""
    differences = state_dict_differences(expected, actual, compare_dtype)
    if differences:
        raise ExportVerificationError(f"{what} does not load back as written: {differences.describe()}.")


def check_file(path: Path, expected: Mapping[str, torch.Tensor]) -> None:
    """The safetensors file holds exactly the expected keys, dtypes and values."""
    check_state_dict(expected, load_file(path), f"{path}")


def verify_pipeline_folder(folder: Path, expected: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """``from_pretrained(folder)`` of the folder's pipeline class (StableDiffusionPipeline or
    StableDiffusionXLPipeline) gives exactly ``expected`` (component -> state dict)."""
    try:
        family = model_family(str(folder))
        pipeline = pipeline_class(family).from_pretrained(folder, **pipeline_options(family))
    except Exception as error:  # noqa: BLE001 - any failure to load is the finding
        raise ExportVerificationError(f"diffusers cannot load the pipeline folder {folder}: {error}") from error
    for name, state in expected.items():
        check_state_dict(state, getattr(pipeline, name).state_dict(), f"{folder} ({name})", compare_dtype=False)


def verify_single_file(
    path: Path, config_folder: Path, expected_checkpoint: Mapping[str, torch.Tensor], expected: Mapping[str, Mapping[str, torch.Tensor]]
) -> None:
    """The file holds exactly ``expected_checkpoint``, and ``from_single_file`` rebuilds ``expected`` from it.

    ``config`` is a local diffusers folder (configs, tokenizer, scheduler), so nothing is fetched.
    Equal tensor counts on both sides mean no tensor in the file went unread.
    """
    check_file(path, expected_checkpoint)
    try:
        family = model_family(str(config_folder))
        pipeline = pipeline_class(family).from_single_file(
            str(path), config=str(config_folder), local_files_only=True, **pipeline_options(family)
        )
    except Exception as error:  # noqa: BLE001 - diffusers fails with a bare meta-tensor error on missing keys
        raise ExportVerificationError(f"diffusers' from_single_file cannot load {path}: {type(error).__name__}: {error}") from error
    for name, state in expected.items():
        check_state_dict(state, getattr(pipeline, name).state_dict(), f"{path} via from_single_file ({name})", compare_dtype=False)
    loaded = sum(len(state) for state in expected.values())
    if loaded != len(expected_checkpoint) + fused_tensor_count(expected_checkpoint):
        raise ExportVerificationError(
            f"{path} holds {len(expected_checkpoint)} tensors but the pipeline loaded from it has {loaded}: "
            "some keys are ignored by diffusers."
        )


def lora_differences(expected: Mapping[str, LoraWeights], loaded: Mapping[str, LoraWeights], dtype: torch.dtype) -> StateDictDifferences:
    """Per adapted layer: same down and up weights (as stored in ``dtype``) and the same scaling."""
    differences = StateDictDifferences(
        missing=sorted(expected.keys() - loaded.keys()), unexpected=sorted(loaded.keys() - expected.keys())
    )
    for path in sorted(expected.keys() & loaded.keys()):
        want, got = expected[path], loaded[path]
        same = (
            want.down.shape == got.down.shape
            and want.up.shape == got.up.shape
            and same_values(want.down.to(dtype).to(got.down.dtype).cpu(), got.down.cpu())
            and same_values(want.up.to(dtype).to(got.up.dtype).cpu(), got.up.cpu())
            and want.scaling == got.scaling
        )
        if not same:
            differences.mismatched.append(path + _nan_note(torch.cat([want.down.flatten(), want.up.flatten()]),
                                                           torch.cat([got.down.flatten(), got.up.flatten()])))
    return differences


def verify_lora_loads(
    pipeline: DiffusionPipeline,
    source: Path,
    expected: Mapping[str, Mapping[str, LoraWeights]],
    dtype: torch.dtype,
) -> None:
    """``pipeline.load_lora_weights(source)`` adapts exactly the expected layers with the expected weights.

    ``expected`` maps components (``unet``, ``text_encoder``, SDXL's ``text_encoder_2``) to their adapted
    layers; every LoRA-loadable component of ``pipeline`` that is not in it must stay without adapters.
    ``pipeline`` is a base-model pipeline without adapters; it is left without adapters again.
    """
    components = ("unet", *TEXT_ENCODER_NAMES[family_of_pipeline(pipeline)])
    unknown = set(expected) - set(components)
    if unknown:
        raise ValueError(f"{type(pipeline).__name__} has no LoRA-loadable {', '.join(sorted(unknown))}")
    adapter = "export_check"
    try:
        pipeline.load_lora_weights(str(source), adapter_name=adapter)
    except Exception as error:  # noqa: BLE001 - any failure to load is the finding
        raise ExportVerificationError(f"diffusers' load_lora_weights cannot load {source}: {type(error).__name__}: {error}") from error
    try:
        for name in components:
            differences = lora_differences(expected.get(name, {}), lora_layers(getattr(pipeline, name), adapter), dtype)
            if differences:
                raise ExportVerificationError(
                    f"{source} does not load back into the {name} as trained (layers): {differences.describe()}."
                )
    finally:
        pipeline.unload_lora_weights()
