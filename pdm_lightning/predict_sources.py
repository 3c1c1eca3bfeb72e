"""Building a sampling pipeline from what a run leaves behind: an exported pipeline, a LoRA, or a checkpoint."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors import SafetensorError, safe_open

from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import check_model_source, load_pipeline
from pdm_lightning.export.lora_diffusers import LORA_WEIGHT_NAME
from pdm_lightning.generation.sampling import inference_pipeline
from pdm_lightning.training.checkpoint_io import (
    DamagedCheckpointError,
    RefusedCheckpointError,
    load_checkpoint_file,
    refused_global,
)
from pdm_lightning.training.module import DreamBoothModule


def _existing(path: str | Path, role: str, fix: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise InputDataError(f"{role} {path} does not exist: {fix}")
    return path


def pipeline_from_folder(pipeline_dir: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """An exported pipeline folder (``<run>/export/pipeline``) or any diffusers SD or SDXL folder."""
    path = _existing(pipeline_dir, "--pipeline", "point it at <run>/export/pipeline or a diffusers folder.")
    check_model_source(str(path))
    return load_pipeline(str(path), dtype=dtype)


def pipeline_with_lora(
    pretrained_model_name_or_path: str, lora: str | Path, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """The base model with LoRA weights: a diffusers LoRA folder (``pytorch_lora_weights.safetensors``)
    or a single ``.safetensors`` file (diffusers or kohya layout; diffusers converts kohya keys)."""
    weights = lora_weights_file(_existing(lora, "--lora", "give the exported LoRA folder or a .safetensors file."))
    pickled = None if weights.suffix == ".safetensors" else pickled_lora_weights(weights)
    if pickled is None:
        check_safetensors(weights)
    check_model_source(pretrained_model_name_or_path)
    pipeline = load_pipeline(pretrained_model_name_or_path, dtype=dtype)
    if pickled is None:
        # use_safetensors=True: diffusers would otherwise retry a file that fails as safetensors as a pickle.
        pipeline.load_lora_weights(str(weights.parent), weight_name=weights.name, use_safetensors=True)
    else:
        pipeline.load_lora_weights(pickled)
    return pipeline


def check_safetensors(weights: Path) -> None:
    """Refuses a ``.safetensors`` LoRA that is not one (a renamed pickle, a cut-short download)."""
    try:
        with safe_open(str(weights), framework="pt"):
            pass
    except (SafetensorError, OSError) as error:
        raise InputDataError(f"--lora {weights} is not a valid .safetensors file ({error}): re-export the LoRA "
                             "(<run>/export/lora) or download it again.") from error


def pickled_lora_weights(weights: Path) -> dict[str, torch.Tensor]:
    """A pickled (``.bin``) LoRA read with ``weights_only=True``: tensors only, nothing in it is run."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - unpickling errors of every kind mean the same here
        refused = refused_global(error)
        reason = f"it holds {refused}, which is not a tensor: loading it could run code" if refused else type(error).__name__
        raise InputDataError(f"--lora {weights} was refused ({reason}): give LoRA weights as .safetensors "
                             "(the export's lora folder) or a .bin of tensors only.") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise InputDataError(f"--lora {weights} is not a LoRA state dict (name -> tensor): give the export's lora folder.")
    return state


def lora_weights_file(lora: Path) -> Path:
    """The weights file itself, or the one LoRA weights file of a folder (the export's name preferred)."""
    if lora.is_file():
        return lora
    if (lora / LORA_WEIGHT_NAME).is_file():
        return lora / LORA_WEIGHT_NAME
    weights = sorted(lora.glob("*.safetensors")) + sorted(lora.glob("*.bin"))
    if len(weights) != 1:
        found = f"several ({', '.join(w.name for w in weights)})" if weights else "no .safetensors/.bin LoRA weights"
        raise InputDataError(f"--lora {lora} holds {found}: give the LoRA folder written by the export "
                             f"({LORA_WEIGHT_NAME}) or the weights file itself.")
    return weights[0]


def module_from_checkpoint(
    checkpoint: str | Path, pretrained_model_name_or_path: str | None = None
) -> DreamBoothModule:
    """The DreamBoothModule a training checkpoint was saved from, with its trained weights loaded.

    Lightning rebuilds it from the saved hyper-parameters (through the CLI's instantiator, so nested
    settings such as ``lora`` come back as their classes), calls ``configure_model`` and loads the
    weights. Checkpoints hold only the trainable weights: the frozen ones come from the base model
    recorded in the checkpoint, or from ``pretrained_model_name_or_path`` when it has moved.
    """
    path = _existing(checkpoint, "--checkpoint", "give a .ckpt from <run>/checkpoints (e.g. last.ckpt).")
    hparams = checkpoint_hyperparameters(path)
    if pretrained_model_name_or_path:
        base = pretrained_model_name_or_path
        check_model_source(base, hparams.get("revision"))
    else:
        base = recorded_base_model(str(hparams["pretrained_model_name_or_path"]), path)
        check_recorded_base_model(base, hparams.get("revision"), path)
    with warnings.catch_warnings():
        # Every frozen weight is "missing" from the checkpoint by design (they come from the base model).
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the")
        module = DreamBoothModule.load_from_checkpoint(
            path, map_location="cpu", weights_only=True, pretrained_model_name_or_path=base
        )
    return module.eval()


OVERRIDE_OPTION = "--pretrained_model_name_or_path"


def recorded_base_model(recorded: str, checkpoint: Path) -> str:
    """The base model a checkpoint records, as a folder this process can open, or a hub id.

    Checkpoints record a local base model as an absolute path; one missing here fails at once (never
    sent to the hub) with the override. Older checkpoints recorded the path as typed (``runs/tiny-sd``,
    relative to the training's working directory, and shaped like a hub id): it is looked for relative
    to the folders above the checkpoint, and refused when its first folder exists there but the model
    does not (it was a path), else taken for a hub id.
    """
    if Path(recorded).expanduser().exists():
        return recorded
    if _recorded_as_path(recorded):
        raise InputDataError(_moved_message(recorded, checkpoint))
    above = checkpoint.resolve().parents
    found = [folder / recorded for folder in above if (folder / recorded).is_dir()]
    if found:
        warnings.warn(f"--checkpoint {checkpoint} records its base model as {recorded}, relative to the directory it "
                      f"was trained in: using {found[0]} ({OVERRIDE_OPTION} DIR sets another).", stacklevel=2)
        return str(found[0])
    first = Path(recorded).parts[0]
    if Path(first).is_dir() or any((folder / first).is_dir() for folder in above):
        raise InputDataError(_moved_message(recorded, checkpoint))
    return recorded


def _recorded_as_path(value: str) -> bool:
    # Absolute, "./x", "~/x", "a/b/c" or a Windows path: never a hub id ("name" or "owner/name").
    return Path(value).expanduser().is_absolute() or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value


def _moved_message(recorded: str, checkpoint: Path) -> str:
    return (f"--checkpoint {checkpoint} records its base model as {recorded}, which does not exist here (moved, "
            f"or the checkpoint comes from another machine or directory): give the base model's folder with "
            f"{OVERRIDE_OPTION} DIR.")


def check_recorded_base_model(base: str, revision: str | None, checkpoint: Path) -> None:
    """``check_model_source`` for the checkpoint's own base model, its error naming the override."""
    try:
        check_model_source(base, revision)
    except InputDataError as error:
        raise InputDataError(f"The base model recorded in --checkpoint {checkpoint} cannot be used: {error} "
                             f"To use another, give {OVERRIDE_OPTION} DIR.") from error


def checkpoint_hyperparameters(path: Path) -> dict:
    """The module's saved hyper-parameters, read without loading the weights and optimizer states.

    Memory-mapped: a full fine-tune's checkpoint (weights + AdamW states) is several times the model's
    size, and Lightning reads all of it again to build the module. Read with ``weights_only=True``
    (as Lightning's second read): a crafted file is refused, never run.
    """
    not_a_checkpoint = (f"--checkpoint {path} is not a pdm_lightning training checkpoint (no hyper_parameters / "
                        "state_dict): give a .ckpt from <run>/checkpoints.")
    try:
        state = load_checkpoint_file(path, map_location="cpu", mmap=True)
    except RefusedCheckpointError as error:  # nothing in it was run
        raise InputDataError(f"--checkpoint {error}") from error
    except DamagedCheckpointError as error:
        raise InputDataError(f"--checkpoint {error} It is not a pdm_lightning training checkpoint: give a .ckpt "
                             "from <run>/checkpoints.") from error
    hparams = state.get("hyper_parameters") if isinstance(state, dict) and "state_dict" in state else None
    if not isinstance(hparams, dict) or "pretrained_model_name_or_path" not in hparams:
        raise InputDataError(not_a_checkpoint)
    return dict(hparams)


def drop_training_parts(module: DreamBoothModule) -> DreamBoothModule:
    """Removes what only training uses: the PDM query hook and the on-the-fly teacher's UNet copy."""
    module.release_pdm_teacher()
    return module


def pipeline_from_checkpoint(
    checkpoint: str | Path,
    pretrained_model_name_or_path: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """A pipeline over the checkpoint's module (LoRA adapters active, if it trained LoRA)."""
    module = drop_training_parts(module_from_checkpoint(checkpoint, pretrained_model_name_or_path))
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return inference_pipeline(module)


def build_pipeline(
    pipeline_dir: str | Path | None = None,
    pretrained_model_name_or_path: str | None = None,
    lora: str | Path | None = None,
    checkpoint: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[DiffusionPipeline, str]:
    """The pipeline for exactly one source, and a description of it for the images' metadata."""
    chosen = [name for name, value in (("--pipeline", pipeline_dir), ("--lora", lora), ("--checkpoint", checkpoint))
              if value]
    if len(chosen) != 1:
        raise InputDataError(
            "Give exactly one model source: --pipeline FOLDER, or --pretrained_model_name_or_path BASE --lora "
            f"LORA, or --checkpoint CKPT (got {', '.join(chosen) or 'none'})."
        )
    if pipeline_dir:
        return pipeline_from_folder(pipeline_dir, dtype), str(pipeline_dir)
    if lora:
        if not pretrained_model_name_or_path:
            raise InputDataError("--lora needs --pretrained_model_name_or_path: the base model the LoRA was trained on")
        description = f"{pretrained_model_name_or_path} + {lora}"
        return pipeline_with_lora(pretrained_model_name_or_path, lora, dtype), description
    return pipeline_from_checkpoint(checkpoint, pretrained_model_name_or_path, dtype), str(checkpoint)
