"""Loading the Stable Diffusion components from a local folder or a hub id."""

from __future__ import annotations

from dataclasses import dataclass

import diffusers.utils.deprecation_utils
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` in 2026 (the old name warns); the
# helper that resolves the two names exists exactly in the releases that accept `dtype`.
_DTYPE_KEYWORD = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


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
