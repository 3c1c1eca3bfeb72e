"""Loading the base model's components from a local folder or a hub id: Stable Diffusion 1.x/2.x or SDXL.

The model family comes from the pipeline folder's ``model_index.json`` (its ``_class_name``):
``StableDiffusionPipeline`` is ``sd`` (one CLIP text encoder), ``StableDiffusionXLPipeline`` is ``sdxl``
(two text encoders, the second with a pooled projection, and size/crop conditioning). Every other
pipeline is refused with the file named. An optional separate VAE (``vae_name_or_path``: a folder or hub
id such as ``madebyollin/sdxl-vae-fp16-fix``) replaces the pipeline's own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import diffusers.utils.deprecation_utils
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from huggingface_hub import hf_hub_download
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pdm_lightning.core.errors import InputDataError

ModelFamily = Literal["sd", "sdxl"]
MODEL_INDEX = "model_index.json"
PIPELINE_CLASSES: dict[ModelFamily, type[DiffusionPipeline]] = {
    "sd": StableDiffusionPipeline,
    "sdxl": StableDiffusionXLPipeline,
}
# model_index.json's _class_name -> family.
PIPELINE_FAMILIES: dict[str, ModelFamily] = {pipeline.__name__: family for family, pipeline in PIPELINE_CLASSES.items()}
TOKENIZER_NAMES: dict[ModelFamily, tuple[str, ...]] = {"sd": ("tokenizer",), "sdxl": ("tokenizer", "tokenizer_2")}
TEXT_ENCODER_NAMES: dict[ModelFamily, tuple[str, ...]] = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
# The subfolders a family's diffusers folder must have.
FAMILY_SUBFOLDERS: dict[ModelFamily, tuple[str, ...]] = {
    family: (*TOKENIZER_NAMES[family], *TEXT_ENCODER_NAMES[family], "vae", "unet", "scheduler") for family in PIPELINE_CLASSES
}

# diffusers renamed from_pretrained's `torch_dtype` to `dtype` in 2026 (the old name warns); the
# helper that resolves the two names exists exactly in the releases that accept `dtype`.
_DTYPE_KEYWORD = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a local diffusers folder or a hub id, with revision and variant.

    The model's options (``--model.pretrained_model_name_or_path``, ``revision``, ``variant`` and the
    optional VAE replacing the pipeline's, ``vae_name_or_path``) as one record, for the code that loads
    base weights besides the module (class images, bank, tokenizer).
    """

    pretrained_model_name_or_path: str
    revision: str | None = None
    variant: str | None = None
    vae_name_or_path: str | None = None

    def check(self) -> None:
        """Fails early, with the fix, when the source cannot be a supported pipeline (or the VAE is missing)."""
        check_model_source(self.pretrained_model_name_or_path, self.revision)
        if self.vae_name_or_path is not None:
            check_vae_source(self.vae_name_or_path)

    def family(self) -> ModelFamily:
        """``sd`` or ``sdxl``, from the pipeline's model_index.json."""
        return model_family(self.pretrained_model_name_or_path, self.revision)

    def components(self) -> StableDiffusionComponents:
        return load_components(self.pretrained_model_name_or_path, self.revision, self.variant, self.vae_name_or_path)

    def pipeline(self, dtype: torch.dtype = torch.float32, **components: torch.nn.Module) -> DiffusionPipeline:
        """StableDiffusionPipeline or StableDiffusionXLPipeline (same interface), ``components`` replacing its own."""
        return load_pipeline(
            self.pretrained_model_name_or_path, self.revision, self.variant, dtype,
            vae_name_or_path=self.vae_name_or_path, **components,
        )

    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        """The family's tokenizers in order: (tokenizer,) for SD, (tokenizer, tokenizer_2) for SDXL."""
        return tuple(
            CLIPTokenizer.from_pretrained(self.pretrained_model_name_or_path, subfolder=name, revision=self.revision)
            for name in TOKENIZER_NAMES[self.family()]
        )

    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        """The family's text encoders in order: (text_encoder,) or (text_encoder, text_encoder_2)."""
        return tuple(
            TEXT_ENCODER_CLASSES[name].from_pretrained(
                self.pretrained_model_name_or_path, subfolder=name, revision=self.revision, variant=self.variant
            )
            for name in TEXT_ENCODER_NAMES[self.family()]
        )

    def vae(self, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
        """The VAE the model encodes with: ``vae_name_or_path`` when given, else the pipeline's own."""
        if self.vae_name_or_path is not None:
            return load_vae(self.vae_name_or_path, dtype)
        return AutoencoderKL.from_pretrained(
            self.pretrained_model_name_or_path, subfolder="vae", revision=self.revision, variant=self.variant,
            **{_DTYPE_KEYWORD: dtype},
        )

    def unet_config(self) -> dict[str, Any]:
        """The UNet's config.json (no weights read): what the PDM layer rule and the checks need."""
        return dict(UNet2DConditionModel.load_config(self.pretrained_model_name_or_path, subfolder="unet", revision=self.revision))

    def native_resolution(self) -> int:
        """The image size the model was trained at: the UNet's latent sample_size times the VAE's downsampling
        (SD1.5 512, SD2.1 768, SDXL 1024 px), from the configs alone."""
        vae = AutoencoderKL.load_config(self.pretrained_model_name_or_path, subfolder="vae", revision=self.revision)
        return int(self.unet_config()["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


TEXT_ENCODER_CLASSES: dict[str, type[torch.nn.Module]] = {
    "text_encoder": CLIPTextModel,
    "text_encoder_2": CLIPTextModelWithProjection,
}


@dataclass
class StableDiffusionComponents:
    """The parts training needs; ``tokenizer_2`` / ``text_encoder_2`` are SDXL's (None for SD)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    family: ModelFamily = "sd"

    @property
    def tokenizers(self) -> tuple[CLIPTokenizer, ...]:
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)

    @property
    def text_encoders(self) -> tuple[torch.nn.Module, ...]:
        return (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)


def pipeline_class(family: ModelFamily) -> type[DiffusionPipeline]:
    return PIPELINE_CLASSES[family]


def family_of_pipeline(pipeline: DiffusionPipeline) -> ModelFamily:
    """``sdxl`` for a pipeline with a second text encoder slot (StableDiffusionXLPipeline), else ``sd``."""
    return "sdxl" if isinstance(pipeline, StableDiffusionXLPipeline) else "sd"


def pipeline_options(family: ModelFamily) -> dict[str, Any]:
    """from_pretrained / constructor options besides the components: no safety checker (generated images are
    training data and previews), no invisible watermark (it alters the pixels of class images and scores)."""
    if family == "sdxl":
        return {"add_watermarker": False}
    return {"safety_checker": None, "requires_safety_checker": False}


def load_components(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    vae_name_or_path: str | None = None,
) -> StableDiffusionComponents:
    """The pieces training needs, the way the diffusers DreamBooth (SDXL) examples load them.

    Training always uses a DDPM scheduler (whatever sampler the pipeline ships) for noising;
    its prediction type comes from the pipeline's scheduler config. ``vae_name_or_path`` replaces the
    pipeline's VAE (SDXL's fp16-fix VAE).
    """
    family = model_family(pretrained_model_name_or_path, revision)
    common = dict(revision=revision)
    weights = dict(variant=variant, **common)
    name = pretrained_model_name_or_path
    vae = (
        load_vae(vae_name_or_path)
        if vae_name_or_path is not None
        else AutoencoderKL.from_pretrained(name, subfolder="vae", **weights)
    )
    sdxl = family == "sdxl"
    return StableDiffusionComponents(
        tokenizer=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer", **common),
        text_encoder=CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **weights),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(name, subfolder="unet", **weights),
        noise_scheduler=DDPMScheduler.from_pretrained(name, subfolder="scheduler", **common),
        tokenizer_2=CLIPTokenizer.from_pretrained(name, subfolder="tokenizer_2", **common) if sdxl else None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **weights) if sdxl else None,
        family=family,
    )


def load_pipeline(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    vae_name_or_path: str | None = None,
    **components: torch.nn.Module,
) -> DiffusionPipeline:
    """The base model as a StableDiffusionPipeline or StableDiffusionXLPipeline in ``dtype``, with
    ``components`` replacing its own and ``vae_name_or_path`` (when given) replacing its VAE.

    No safety checker and no invisible watermark (``pipeline_options``).
    """
    family = model_family(pretrained_model_name_or_path, revision)
    if vae_name_or_path is not None and "vae" not in components:
        components["vae"] = load_vae(vae_name_or_path, dtype)
    return pipeline_class(family).from_pretrained(
        pretrained_model_name_or_path,
        revision=revision,
        variant=variant,
        **pipeline_options(family),
        **{_DTYPE_KEYWORD: dtype},
        **components,
    )


def load_vae(vae_name_or_path: str, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A separate VAE: a folder with config.json (or a pipeline folder's ``vae/``), or a hub id of a VAE repository."""
    path = Path(vae_name_or_path).expanduser()
    subfolder = "vae" if path.is_dir() and not (path / "config.json").is_file() and (path / "vae").is_dir() else None
    return AutoencoderKL.from_pretrained(str(path) if path.is_dir() else vae_name_or_path, subfolder=subfolder, **{_DTYPE_KEYWORD: dtype})


def check_vae_source(vae_name_or_path: str) -> None:
    """Fails early when ``vae_name_or_path`` names a local path that holds no VAE (a hub id is checked on load)."""
    path = Path(vae_name_or_path).expanduser()
    if path.is_dir():
        if not ((path / "config.json").is_file() or (path / "vae" / "config.json").is_file()):
            raise InputDataError(
                f"vae_name_or_path {path} holds no VAE: give a folder with the VAE's config.json and weights "
                "(e.g. a download of madebyollin/sdxl-vae-fp16-fix), or a pipeline folder with a vae/ subfolder."
            )
    elif path.exists() or _looks_like_local_path(vae_name_or_path):
        raise InputDataError(
            f"vae_name_or_path {vae_name_or_path} is not a folder: give a diffusers VAE folder (config.json + "
            "weights) or a hub id such as madebyollin/sdxl-vae-fp16-fix."
        )


def model_index_file(pretrained_model_name_or_path: str, revision: str | None = None) -> Path:
    """The pipeline's model_index.json: in the local folder, or from the hub (its cache when offline)."""
    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_dir() or _looks_like_local_path(pretrained_model_name_or_path):
        index = path / MODEL_INDEX
        if not index.is_file():
            raise InputDataError(
                f"{index} does not exist: pretrained_model_name_or_path must be a diffusers pipeline folder "
                "(saved with save_pretrained: model_index.json and one subfolder per component)."
            )
        return index
    try:
        return Path(hf_hub_download(pretrained_model_name_or_path, MODEL_INDEX, revision=revision))
    except Exception as error:  # noqa: BLE001 - every hub failure gets the same advice
        raise InputDataError(
            f"pretrained_model_name_or_path {pretrained_model_name_or_path!r} is not a local folder and its "
            f"{MODEL_INDEX} could not be fetched from the hub ({type(error).__name__}). Check the id and revision, "
            "the network (or the hub cache when HF_HUB_OFFLINE=1), HF_TOKEN for gated models, or give a local folder."
        ) from error


def family_from_model_index(index_file: Path) -> ModelFamily:
    """The family named by a model_index.json; an InputDataError naming the file for any other pipeline."""
    try:
        class_name = json.loads(index_file.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise InputDataError(f"{index_file} is not a readable model_index.json: {error}") from error
    if class_name not in PIPELINE_FAMILIES:
        raise InputDataError(
            f"{index_file} describes a {class_name}: pdm_lightning trains StableDiffusionPipeline (SD 1.x/2.x) and "
            "StableDiffusionXLPipeline (SDXL base) models only; SD3, Flux, the SDXL refiner, inpainting and other "
            "pipelines are not supported."
        )
    return PIPELINE_FAMILIES[class_name]


def model_family(pretrained_model_name_or_path: str, revision: str | None = None) -> ModelFamily:
    """``sd`` or ``sdxl``, from the pipeline's model_index.json (InputDataError for anything else)."""
    return family_from_model_index(model_index_file(pretrained_model_name_or_path, revision))


def check_model_source(pretrained_model_name_or_path: str, revision: str | None = None) -> None:
    """Fails early, with the fix, when the base model cannot be a supported pipeline.

    A local folder must hold the diffusers layout of its family; a hub id must resolve
    ``model_index.json`` (from the cache when offline). Without this check a wrong path surfaces much
    later, and transformers even builds an empty tokenizer from a missing folder without complaint.
    """

    path = Path(pretrained_model_name_or_path).expanduser()
    if path.is_file():
        raise InputDataError(
            f"pretrained_model_name_or_path {path} is a single file; a diffusers folder is needed. Convert it once: "
            "`StableDiffusionPipeline.from_single_file(FILE).save_pretrained(FOLDER)` (StableDiffusionXLPipeline "
            "for SDXL), then point at FOLDER."
        )
    if path.is_dir():
        has_index = (path / MODEL_INDEX).is_file()
        family = family_from_model_index(path / MODEL_INDEX) if has_index else "sd"
        subfolders = FAMILY_SUBFOLDERS[family]
        missing = [f"{name}/" for name in subfolders if not (path / name).is_dir()]
        missing += [] if has_index else [MODEL_INDEX]
        if missing:
            raise InputDataError(
                f"pretrained_model_name_or_path {path} lacks {', '.join(missing)}: point it at a diffusers "
                f"{pipeline_class(family).__name__} folder ({MODEL_INDEX} with {', '.join(subfolders)} subfolders)."
            )
        return
    if _looks_like_local_path(pretrained_model_name_or_path):
        raise InputDataError(
            f"pretrained_model_name_or_path {pretrained_model_name_or_path} does not exist: fix the path, or give a "
            "hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    family_from_model_index(model_index_file(pretrained_model_name_or_path, revision))


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else can only be meant as a path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or name.endswith((".safetensors", ".ckpt"))


def vae_dtype(vae: torch.nn.Module, family: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the frozen VAE runs in: ``dtype``, except an SDXL VAE whose config asks for ``force_upcast`` stays
    float32 instead of float16 (SDXL's own VAE overflows to NaN in float16; diffusers' SDXL pipelines and
    scripts upcast it the same way; the fp16-fix VAE says ``force_upcast: false``). SD's VAE is unchanged."""
    if family == "sdxl" and dtype == torch.float16 and vae.config.get("force_upcast", False):
        return torch.float32
    return dtype
