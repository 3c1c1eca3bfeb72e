"""Random Stable-Diffusion-shaped pipelines: the tiny ones for the quickstart and the tests, and SD1.5 /
SD2.1 / SDXL at their real shapes.

    python -m pdm_lightning.tiny runs/tiny-sd                     # tiny (default)
    python -m pdm_lightning.tiny --preset sd15 runs/sd15-shapes   # 1.07B parameters, 4.3 GB float32
    python -m pdm_lightning.tiny --preset sd21 runs/sd21-shapes --dtype float16

The tiny model has SD1.5's topology (4 UNet levels, 2 layers per block, cross-attention in the first
three down and last three up blocks, so the PDM layer ``up_blocks[3].attentions[2]`` exists), SD1.5's
noise schedule, a VAE with the same 8x downsampling and 4 latent channels, and a CLIP tokenizer
built offline from a small vocabulary. ``sd15`` and ``sd21`` have the published configs of those
models, parameter counts checked against the published ones, and CLIP's real tokenizer
(pdm_lightning/clip_vocab.py). Weights are random: they exercise every code path (shapes, memory,
speed, export formats) but generate noise. Each is saved with ``save_pretrained`` and loaded through
the same ``from_pretrained`` path as a real model. ``PRESETS`` maps each name to its ``PresetSpec``.
"""

from __future__ import annotations

import sys

from pdm_lightning.core import console

if __name__ == "__main__":  # quiet third-party notices before the imports below print them
    console.install(sys.argv)

import argparse  # noqa: E402
import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pdm_lightning.clip_vocab import BOS, EOS, ClipVocabularyError, add_vocabulary_files, bytes_to_unicode, load_clip_tokenizer
from pdm_lightning.core.atomic import staged_directory
from pdm_lightning.core.dtypes import DTYPES

# Whole-word tokens, so that prompts tokenize into words as with the real CLIP vocabulary.
VOCAB_WORDS = (
    "a an the of in on with and at by for to photo picture sks xjy dog cat backpack bear plushie bowl can "
    "candle clock sneaker boot glasses teapot toy vase cartoon monster robot duck person man woman beach "
    "snow jungle city street forest mountain table floor grass water red blue green purple shiny wet cube "
    "top background front view style painting wearing hat santa chef police outfit rainbow scarf"
).split()
DEFAULT_RESOLUTION = 64


def build_bpe_files(words: tuple[str, ...] = VOCAB_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style vocabulary and merge list: all bytes, plus left-to-right merges spelling ``words``."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [f"{c}</w>" for c in alphabet]
    merges: list[str] = []
    known = set(tokens)
    # Longer words first: BPE applies the lowest-ranked merge first, so a short word's merges
    # (e.g. "t o</w>" of "to") must not split a longer one ("photo").
    for word in sorted(words, key=len, reverse=True):
        pieces = list(word[:-1]) + [f"{word[-1]}</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in known:
                merges.append(f"{current} {piece}")
                tokens.append(merged)
                known.add(merged)
            current = merged
    tokens += [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def build_tokenizer(folder: Path):  # noqa: ANN201 - transformers CLIPTokenizer
    """Writes vocab.json + merges.txt into ``folder`` and loads them as a CLIPTokenizer (77 tokens)."""
    from transformers import CLIPTokenizer

    vocab, merges = build_bpe_files()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)



# ---------------------------------------------------------------------------------------------------
# Presets: a name -> how to build its models, the pipeline around them, and the sizes to expect.


@dataclass(frozen=True)
class PresetSpec:
    """One buildable model shape.

    Attributes:
        description: one line for ``--help`` and the docs.
        models: component name -> constructor of that component with random weights; called in
            this order after seeding, each with no arguments (so they also build on the meta device).
        pipeline: (built models, prediction type) -> the pipeline with its tokenizer(s) and scheduler.
        prediction_type: the scheduler's default (``epsilon`` or ``v_prediction``).
        resolution: the image size the model was made for, in pixels.
        parameter_counts: component name -> number of parameters it must have (the published
            count for a real model's shapes); a build with any other count fails.
        finish: called on the saved folder before it is switched into place (extra files).
    """

    description: str
    models: Mapping[str, Callable[[], torch.nn.Module]]
    pipeline: Callable[[Mapping[str, torch.nn.Module], str], Any]
    prediction_type: str = "epsilon"
    resolution: int = DEFAULT_RESOLUTION
    parameter_counts: Mapping[str, int] = field(default_factory=dict)
    finish: Callable[[Path], None] | None = None


class PresetSizeError(RuntimeError):
    """A preset built components whose parameter counts differ from the expected ones."""


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def meta_parameter_counts(spec: PresetSpec) -> dict[str, int]:
    """Each model component's parameter count, built on the meta device (no memory, no init: well under a second)."""
    with torch.device("meta"):
        return {name: parameter_count(build()) for name, build in spec.models.items()}


def check_parameter_counts(preset: str, counts: Mapping[str, int], expected: Mapping[str, int]) -> None:
    """Raises PresetSizeError naming every component whose count is not the expected one."""
    wrong = [f"{name} {counts.get(name, 0):,} (expected {want:,})" for name, want in expected.items() if counts.get(name) != want]
    if wrong:
        raise PresetSizeError(f"Preset {preset!r} does not have its expected shapes: {'; '.join(wrong)}.")


# --- tiny: SD1.5's topology at toy width --------------------------------------------------------------


def _tiny_unet() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=DEFAULT_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(32, 64, 64, 64),
        layers_per_block=2,
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    )


def _tiny_vae() -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=DEFAULT_RESOLUTION,
        scaling_factor=0.18215,
    )


def _tiny_text_encoder() -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, _ = build_bpe_files()
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],  # CLIPTokenizer pads with <|endoftext|>
        )
    )


def _ddpm_scheduler(prediction_type: str):  # noqa: ANN202 - diffusers DDPMScheduler
    from diffusers import DDPMScheduler

    # SD1.5's training schedule (scaled-linear betas 0.00085 -> 0.012 over 1000 steps).
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _stable_diffusion_pipeline(models: Mapping[str, torch.nn.Module], tokenizer: Any, scheduler: Any):  # noqa: ANN202
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=models["vae"],
        text_encoder=models["text_encoder"],
        tokenizer=tokenizer,
        unet=models["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_pipeline(models: Mapping[str, torch.nn.Module], prediction_type: str):  # noqa: ANN202
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp))
    return _stable_diffusion_pipeline(models, tokenizer, _ddpm_scheduler(prediction_type))


# --- sd15 / sd21: the published shapes, random weights ------------------------------------------------

# runwayml/stable-diffusion-v1-5 unet/config.json (and CompVis v1-4's: the same architecture).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
# stabilityai/stable-diffusion-2-1 unet/config.json: per-level heads of 64 channels, OpenCLIP-H's
# 1024-wide context, linear (not 1x1 conv) projections in the transformer blocks, 768 px.
SD21_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
}
# The text_encoder/config.json of each: CLIP ViT-L/14's text tower (SD1.5) and OpenCLIP ViT-H/14's
# without its last layer (SD2.x uses the penultimate layer, so 23 of 24 are shipped).
# bos/eos/pad ids 0/2/1 are what both published configs say (the encoder then pools at the highest id,
# <|endoftext|>, as CLIP does).
SD15_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SD21_TEXT_ENCODER_CONFIG: dict[str, Any] = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
# vae/config.json of both (the same KL-f8 autoencoder; sample_size is the model's image size).
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
# scheduler/scheduler_config.json: SD1.5 ships PNDM, SD2.1 DDIM, both on the same training schedule.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
# The tiny model's own counts: not published anywhere, kept so that it never changes by accident.
TINY_PARAMETER_COUNTS = {"unet": 3_222_692, "vae": 248_079, "text_encoder": 43_680}
SD15_PARAMETER_COUNTS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}
SD21_PARAMETER_COUNTS = {"unet": 865_910_724, "text_encoder": 340_387_840, "vae": 83_653_863}
# SD2.x's tokenizer pads with "!" (OpenCLIP's padding id 0), SD1.x's with <|endoftext|>.
SD21_PAD_TOKEN = "!"


def _unet(config: Mapping[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    return build


def _vae(sample_size: int) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL(**{**SD_VAE_CONFIG, "sample_size": sample_size})

    return build


def _clip_text_encoder(config: Mapping[str, Any]) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from transformers import CLIPTextConfig, CLIPTextModel

        return CLIPTextModel(CLIPTextConfig(**config))

    return build


def _sd15_pipeline(models: Mapping[str, torch.nn.Module], prediction_type: str):  # noqa: ANN202
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler(**SD_SCHEDULER_CONFIG, skip_prk_steps=True, prediction_type=prediction_type)
    return _stable_diffusion_pipeline(models, load_clip_tokenizer(), scheduler)


def _sd21_pipeline(models: Mapping[str, torch.nn.Module], prediction_type: str):  # noqa: ANN202
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG, clip_sample=False, prediction_type=prediction_type)
    return _stable_diffusion_pipeline(models, load_clip_tokenizer(pad_token=SD21_PAD_TOKEN), scheduler)


def add_clip_vocabulary_files(pipeline_dir: Path) -> None:
    """vocab.json + merges.txt in each ``tokenizer*`` folder (transformers 5 saves only tokenizer.json)."""
    for folder in sorted(pipeline_dir.glob("tokenizer*")):
        add_vocabulary_files(folder)


PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(
        description="SD1.5's topology at toy width (3.5M parameters), a small word-level vocabulary, epsilon, 64 px: "
        "seconds on a CPU (the quickstart's and the tests' model)",
        models={"unet": _tiny_unet, "vae": _tiny_vae, "text_encoder": _tiny_text_encoder},
        pipeline=_tiny_pipeline,
        parameter_counts=TINY_PARAMETER_COUNTS,
    ),
    "sd15": PresetSpec(
        description="Stable Diffusion 1.5's exact shapes (UNet 860M, CLIP ViT-L/14 text encoder 123M, VAE 84M), "
        "CLIP's tokenizer, PNDM scheduler, epsilon, 512 px",
        models={"unet": _unet(SD15_UNET_CONFIG), "text_encoder": _clip_text_encoder(SD15_TEXT_ENCODER_CONFIG), "vae": _vae(512)},
        pipeline=_sd15_pipeline,
        resolution=512,
        parameter_counts=SD15_PARAMETER_COUNTS,
        finish=add_clip_vocabulary_files,
    ),
    "sd21": PresetSpec(
        description="Stable Diffusion 2.1's exact shapes (UNet 866M, OpenCLIP ViT-H/14 text encoder 340M, VAE 84M), "
        "CLIP's tokenizer padding with '!', DDIM scheduler, v_prediction, 768 px",
        models={"unet": _unet(SD21_UNET_CONFIG), "text_encoder": _clip_text_encoder(SD21_TEXT_ENCODER_CONFIG), "vae": _vae(768)},
        pipeline=_sd21_pipeline,
        prediction_type="v_prediction",
        resolution=768,
        parameter_counts=SD21_PARAMETER_COUNTS,
        finish=add_clip_vocabulary_files,
    ),
}

# SDXL's presets live in their own module (it imports this one lazily, so no cycle).
from pdm_lightning.tiny_sdxl import (  # noqa: E402
    SDXL_DESCRIPTION,
    SDXL_MODELS,
    SDXL_PUBLISHED_COUNTS,
    SDXL_RESOLUTION,
    TINY_SDXL_DESCRIPTION,
    TINY_SDXL_MODELS,
    TINY_SDXL_PARAMETER_COUNTS,
    TINY_SDXL_RESOLUTION,
    sdxl_pipeline,
)

PRESETS["tiny-sdxl"] = PresetSpec(
    description=TINY_SDXL_DESCRIPTION, models=TINY_SDXL_MODELS, pipeline=sdxl_pipeline,
    resolution=TINY_SDXL_RESOLUTION, parameter_counts=TINY_SDXL_PARAMETER_COUNTS,
)
PRESETS["sdxl"] = PresetSpec(
    description=SDXL_DESCRIPTION, models=SDXL_MODELS, pipeline=sdxl_pipeline,
    resolution=SDXL_RESOLUTION, parameter_counts=SDXL_PUBLISHED_COUNTS, finish=add_clip_vocabulary_files,
)


def _report(message: str, verbose: bool) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


def build_preset_pipeline(
    preset: str = "tiny", seed: int = 0, prediction_type: str | None = None, verbose: bool = False
):  # noqa: ANN201 - a diffusers pipeline
    """The preset's pipeline in memory with random weights (deterministic for a given seed), sizes checked."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    spec = PRESETS[preset]
    torch.manual_seed(seed)
    models, counts = {}, {}
    for name, build in spec.models.items():
        start = time.perf_counter()
        with torch.no_grad():  # plain initialisation: nothing to record for autograd
            models[name] = build()
        counts[name] = parameter_count(models[name])
        _report(f"{name}: {counts[name]:,} parameters, built in {time.perf_counter() - start:.1f} s", verbose)
    check_parameter_counts(preset, counts, spec.parameter_counts)
    return spec.pipeline(models, prediction_type or spec.prediction_type)


def save_preset_pipeline(
    out_dir: str | Path,
    preset: str = "tiny",
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction"] | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
    verbose: bool = False,
) -> Path:
    """Saves the preset's pipeline to ``out_dir`` (atomically); an existing pipeline is kept unless ``overwrite``.

    ``prediction_type`` None takes the preset's own; ``dtype`` is the saved weights' precision.
    """
    out_dir = Path(out_dir)
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset {preset!r}: choose one of {', '.join(PRESETS)}.")
    if dtype not in DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if (out_dir / "model_index.json").is_file() and not overwrite:
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "model_index.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a pipeline folder: choose an empty or new folder.")
    pipeline = build_preset_pipeline(preset, seed, prediction_type, verbose)
    if dtype != "float32":
        pipeline.to(DTYPES[dtype])
    start = time.perf_counter()
    _report(f"Saving {', '.join(PRESETS[preset].models)} ({dtype}) to {out_dir}", verbose)
    with staged_directory(out_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
        if PRESETS[preset].finish is not None:
            PRESETS[preset].finish(staging)
    _report(f"Saved in {time.perf_counter() - start:.1f} s", verbose)
    return out_dir


def build_tiny_pipeline(
    seed: int = 0, prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
):  # noqa: ANN201 - diffusers StableDiffusionPipeline
    """The tiny random pipeline in memory (deterministic for a given seed)."""
    return build_preset_pipeline("tiny", seed, prediction_type)


def save_tiny_pipeline(
    out_dir: str | Path,
    seed: int = 0,
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
    overwrite: bool = False,
) -> Path:
    """Saves the tiny pipeline to ``out_dir`` (atomically); an existing tiny model is kept unless ``overwrite``."""
    return save_preset_pipeline(out_dir, "tiny", seed, prediction_type, overwrite)


def main(argv: list[str] | None = None) -> None:
    presets = "\n".join(f"  {name:9} {spec.description}" for name, spec in PRESETS.items())
    parser = argparse.ArgumentParser(description=f"{__doc__}\npresets:\n{presets}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write the pipeline to")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="tiny", help="which shapes to build (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--prediction_type", choices=("epsilon", "v_prediction"), default=None,
                        help="the scheduler's prediction type (default: the preset's: v_prediction for sd21, else epsilon)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="precision of the saved weights")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if out_dir already holds a pipeline")
    args = parser.parse_args(argv)
    try:
        path = save_preset_pipeline(args.out_dir, args.preset, args.seed, args.prediction_type, args.overwrite, args.dtype,
                                    verbose=not args.preset.startswith("tiny"))
    except ClipVocabularyError as error:
        raise SystemExit(f"error: {error}") from None
    label = "Tiny Stable-Diffusion-shaped" if args.preset == "tiny" else f"Random {args.preset}-shaped"
    print(f"{label} pipeline in {path}")


if __name__ == "__main__":
    main()
