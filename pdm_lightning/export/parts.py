"""Which parts of a trained module an export reads: the UNet and one (SD) or two (SDXL) text encoders."""

from __future__ import annotations

import torch

from pdm_lightning.core.loading import TEXT_ENCODER_NAMES, ModelFamily, ModelSource


def module_family(module) -> ModelFamily:  # noqa: ANN001 - DreamBoothModule (or anything with its parts)
    """``sdxl`` when the module holds a second text encoder, else ``sd``."""
    return "sdxl" if getattr(module, "text_encoder_2", None) is not None else "sd"


def text_encoders(module) -> dict[str, torch.nn.Module]:  # noqa: ANN001
    """Component name -> text encoder of the module, in the pipeline's order."""
    return {name: getattr(module, name) for name in TEXT_ENCODER_NAMES[module_family(module)]}


def base_source(module) -> ModelSource:  # noqa: ANN001
    """The base model the module was trained from (with its replacement VAE, where the module has one)."""
    source = getattr(module, "source", None)
    if isinstance(source, ModelSource):
        return source
    hparams = module.hparams
    return ModelSource(hparams.pretrained_model_name_or_path, hparams.get("revision"), hparams.get("variant"),
                       hparams.get("vae_name_or_path"))
