"""Loading the Stable Diffusion components from a local folder or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import diffusers.utils.deprecation_utils
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import hf_hub_download
from transformers import CLIPTextModel, CLIPTokenizer

from pdm_lightning.core.errors import InputDataError

PIPELINE_SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` in 2026 (the old name warns); the
# helper that resolves the two names exists exactly in the releases that accept `dtype`.
_DTYPE_KEYWORD = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a local diffusers folder or a hub id, with revision and variant.

    The model's three options (``--model.pretrained_model_name_or_path``, ``revision``, ``variant``)
    as one record, for the code that loads base weights besides the module (class images, bank, tokenizer).
    """

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None

    def check(self) -> None:
        """Fails early, with the fix, when the source cannot be a Stable Diffusion pipeline."""
        check_model_source(self.pretrained_model_name_or_path, self.revision)

    def components(self) -> StableDiffusionComponents:
        return load_components(self.pretrained_model_name_or_path, self.revision, self.variant)

    def pipeline(self, dtype: torch.dtype = torch.float32, **components: torch.nn.Module) -> StableDiffusionPipeline:
        return load_pipeline(self.pretrained_model_name_or_path, self.revision, self.variant, dtype, **components)

    def tokenizer(self) -> CLIPTokenizer:
        return CLIPTokenizer.from_pretrained(self.pretrained_model_name_or_path, subfolder="tokenizer", revision=self.revision)

    def text_encoder(self) -> CLIPTextModel:
        return CLIPTextModel.from_pretrained(
            self.pretrained_model_name_or_path, subfolder="text_encoder", revision=self.revision, variant=self.variant
        )


@dataclass
class StableDiffusionComponents:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def load_components(
    pretrained_model_name_or_path: str, revision: str | None = None, variant: str | None = None
) -> StableDiffusionComponents:
    """The pieces training needs, the way the diffusers DreamBooth example loads them.

    Training always uses a DDPM scheduler (whatever sampler the pipeline ships) for noising;
    its prediction type comes from the pipeline's scheduler config.
    """
    common = dict(revision=revision)
    return StableDiffusionComponents(
        tokenizer=CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(
            pretrained_model_name_or_path, subfolder="text_encoder", variant=variant, **common
        ),
        vae=AutoencoderKL.from_pretrained(pretrained_model_name_or_path, subfolder="vae", variant=variant, **common),
        unet=UNet2DConditionModel.from_pretrained(
            pretrained_model_name_or_path, subfolder="unet", variant=variant, **common
        ),
        noise_scheduler=DDPMScheduler.from_pretrained(pretrained_model_name_or_path, subfolder="scheduler", **common),
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    **components: torch.nn.Module,
) -> StableDiffusionPipeline:
    """The base model as a StableDiffusionPipeline in ``dtype``, with ``components`` replacing its own.

    No safety checker: generated images are training data or previews, not served to anyone.
    """
    return StableDiffusionPipeline.from_pretrained(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        safety_checker=None,
        requires_safety_checker=False,
        **{_DTYPE_KEYWORD: dtype},
        **components,
    )


def check_model_source(pretrained_model_name_or_path: str, revision: str | None = None) -> None:
    """Fails early, with the fix, when the base model cannot be a Stable Diffusion pipeline.

    A local folder must hold the diffusers layout; a hub id must resolve ``model_index.json`` (from
    the cache when offline). Without this check a wrong path surfaces much later, and transformers
    even builds an empty tokenizer from a missing folder without complaint.
    """

    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_file():
        raise InputDataError(
            f"pretrained_model_name_or_path {path} is a single file; a diffusers folder is needed. Convert it once: "
            "`StableDiffusionPipeline.from_single_file(FILE).save_pretrained(FOLDER)`, then point at FOLDER."
        )
    if path.is_dir():
        missing = [name for name in PIPELINE_SUBFOLDERS if not (path / name).is_dir()]
        if missing:
            raise InputDataError(
                f"pretrained_model_name_or_path {path} lacks {', '.join(missing)}/: point it at a diffusers Stable "
                f"Diffusion folder (model_index.json with {', '.join(PIPELINE_SUBFOLDERS)} subfolders)."
            )
        return
    if _looks_like_local_path(pretrained_model_name_or_path):
        raise InputDataError(
            f"pretrained_model_name_or_path {pretrained_model_name_or_path} does not exist: fix the path, or give a "
            "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    try:
        hf_hub_download(pretrained_model_name_or_path, "model_index.json", revision=revision)
    except Exception as error:  # noqa: BLE001 - every hub failure gets the same advice
        raise InputDataError(
            f"pretrained_model_name_or_path {pretrained_model_name_or_path!r} is not a local folder and its "
            f"model_index.json could not be fetched from the hub ({type(error).__name__}). Check the id and revision, "
            "the network (or the hub cache when HF_HUB_OFFLINE=1), HF_TOKEN for gated models, or give a local folder."
        ) from error


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only be meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith((".safetensors", ".ckpt"))
