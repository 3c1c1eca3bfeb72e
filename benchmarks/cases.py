"""The benchmark cases and what each one runs: a train.py recipe, the plain PyTorch loop, or a bank build.

Training cases go through the published recipes (``configs/sd15/base.yaml`` + a recipe) with the benchmark's base
model, photos, resolution and precision; subject masks are off (the plain loop has none, and they cost the step
next to nothing). The plain loop reads the same recipe files for its hyper-parameters, so both sides train the
same thing. A label "= recipe" marks the case that is that published recipe (masks aside). ``CASES`` is in run order: each of our cases next to its plain counterpart, most wanted first (a time
budget drops the tail).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from benchmarks.workspace import CLASS_PROMPT, INSTANCE_PROMPT, REPO_ROOT, Inputs

RECIPES = REPO_ROOT / "configs" / "sd15"


@dataclass(frozen=True)
class Case:
    """One row of the benchmark.

    ``extra`` holds the train.py options of a variant (options other helpers are still adding are listed
    anyway: a case whose option train.py refuses is reported "not available", never an error). ``needs``
    is a module the case cannot run without; ``required`` cases must give numbers on every machine.
    """

    name: str
    label: str
    kind: Literal["lightning", "plain", "bank"]
    recipe: str | None = None
    prior: bool = False
    pdm: Literal["bank", "on_the_fly"] | None = None
    extra: tuple[str, ...] = ()
    needs: str | None = None
    cuda_only: bool = False
    required: bool = True
    bank_photos: Literal["one", "all"] = "one"
    bank_batched: bool = True
    bank_compile: bool = False


CASES: tuple[Case, ...] = (
    Case("full_prior_pdm", "full, prior + PDM (bank) = pdmbooth", "lightning", "pdmbooth", prior=True, pdm="bank"),
    Case("plain_full_prior_pdm", "plain loop: full, prior + PDM (bank)", "plain", "pdmbooth", prior=True, pdm="bank"),
    Case("lora_prior_pdm", "LoRA, prior + PDM (bank)", "lightning", "pdmbooth_lora", prior=True, pdm="bank"),
    Case("plain_lora_prior_pdm", "plain loop: LoRA, prior + PDM (bank)", "plain", "pdmbooth_lora", prior=True, pdm="bank"),
    Case("lora_pdm", "LoRA, PDM (bank), no prior = pdmbooth_lora", "lightning", "pdmbooth_lora", pdm="bank"),
    Case("full_dreambooth", "full, DreamBooth (no prior)", "lightning", "dreambooth"),
    Case("plain_full_dreambooth", "plain loop: full, DreamBooth (no prior)", "plain", "dreambooth"),
    Case("lora_dreambooth", "LoRA, DreamBooth (no prior) = dreambooth_lora", "lightning", "dreambooth_lora"),
    Case("plain_lora_dreambooth", "plain loop: LoRA, DreamBooth (no prior)", "plain", "dreambooth_lora"),
    Case("full_prior", "full, prior = dreambooth", "lightning", "dreambooth", prior=True),
    Case("full_prior_pdm_otf", "full, prior + PDM (on-the-fly teacher)", "lightning", "pdmbooth", prior=True, pdm="on_the_fly"),
    Case("lora_prior", "LoRA, prior", "lightning", "dreambooth_lora", prior=True),
    Case("lora_prior_pdm_otf", "LoRA, prior + PDM (on-the-fly teacher)", "lightning", "pdmbooth_lora", prior=True, pdm="on_the_fly"),
    Case("bank_1photo", "bank build, 1 photo", "bank", bank_photos="one"),
    Case("bank_batched", "bank build, all photos in one batch", "bank", bank_photos="all", bank_batched=True),
    Case("bank_sequential", "bank build, all photos one at a time", "bank", bank_photos="all", bank_batched=False),
    Case("full_prior_pdm_channels_last", "full, prior + PDM, channels_last", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.channels_last", "true"), required=False),
    Case("full_prior_pdm_uncached", "full, prior + PDM, latents not cached", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.cache_latents", "false"), required=False),
    Case("full_prior_pdm_latent_crops", "full, prior + PDM, crops from cached latents", "lightning", "pdmbooth", prior=True,
         pdm="bank", extra=("--model.latent_crops", "true"), required=False),
    Case("full_prior_pdm_compiled", "full, prior + PDM, torch.compile (blocks)", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.compile", "true"), required=False),
    Case("full_prior_pdm_compiled_unet", "full, prior + PDM, torch.compile (whole UNet)", "lightning", "pdmbooth", prior=True,
         pdm="bank", extra=("--model.compile", "true", "--model.compile_scope", "unet"), required=False),
    Case("bank_1photo_compiled", "bank build, 1 photo, compiled UNet (compilation included)", "bank", bank_photos="one", bank_compile=True,
         required=False),
    Case("full_prior_pdm_unfused", "full, prior + PDM, AdamW not fused", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.optimizer.fused", "false"), required=False),
    Case("full_prior_pdm_xformers", "full, prior + PDM, xformers attention", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.attention_backend", "xformers"), needs="xformers", cuda_only=True, required=False),
    Case("full_prior_pdm_adamw8bit", "full, prior + PDM, 8-bit AdamW", "lightning", "pdmbooth", prior=True, pdm="bank",
         extra=("--model.optimizer.name", "adamw8bit"), needs="bitsandbytes", cuda_only=True, required=False),
)
CASES_BY_NAME = {case.name: case for case in CASES}

# (numerator, denominator, what the ratio says): step-time ratios reported next to the cases.
RATIOS: tuple[tuple[str, str, str], ...] = (
    ("full_prior_pdm", "plain_full_prior_pdm", "ours / plain loop, full prior + PDM"),
    ("lora_prior_pdm", "plain_lora_prior_pdm", "ours / plain loop, LoRA prior + PDM"),
    ("full_dreambooth", "plain_full_dreambooth", "ours / plain loop, full DreamBooth"),
    ("lora_dreambooth", "plain_lora_dreambooth", "ours / plain loop, LoRA DreamBooth"),
    ("full_prior_pdm", "full_prior_pdm_uncached", "cached latents / not cached, full prior + PDM"),
    ("full_prior_pdm_channels_last", "full_prior_pdm", "channels_last / default, full prior + PDM"),
    ("full_prior_pdm_latent_crops", "full_prior_pdm", "crops from cached latents / default, full prior + PDM"),
    ("full_prior_pdm_compiled", "full_prior_pdm", "compiled (blocks) / eager, full prior + PDM"),
    ("full_prior_pdm_compiled_unet", "full_prior_pdm", "compiled (whole UNet) / eager, full prior + PDM"),
    ("full_prior_pdm", "full_prior_pdm_unfused", "fused AdamW / not fused, full prior + PDM"),
    ("full_prior_pdm_unfused", "plain_full_prior_pdm", "ours with AdamW not fused / plain loop, full prior + PDM"),
    ("bank_1photo_compiled", "bank_1photo", "bank build, compiled / eager UNet, 1 photo"),
    ("bank_batched", "bank_sequential", "bank build, batched / one at a time, per photo"),
)


@dataclass
class RunSettings:
    """What every case of one benchmark run shares (the entry point's options)."""

    device: Literal["cpu", "cuda"] = "cpu"
    precision: str = "32"  # "32" or "bf16-mixed"
    resolution: int = 256
    batch_size: int = 1
    num_workers: int = 0
    threads: int = 1
    steps: int = 10
    warmup: int = 2
    inversion_steps: int = 50  # the training cases' bank (their step time does not depend on it)
    bank_inversion_steps: int | None = 50  # the bank-build cases' (None: faithful, 999)
    masks: bool = False  # real_shape: the recipes' subject masks (the bundled ones), as the recipes use them
    outputs: bool = False  # real_shape: keep the end-of-fit checkpoint and export, measure and load them back
    flops_in_timed_step: bool = False  # real_shape: count FLOPs on the last timed step instead of an extra one
    extra_args: list[str] = field(default_factory=list)

    @property
    def trainer_precision(self) -> str:
        return "32-true" if self.precision == "32" else self.precision

    @property
    def half_dtype(self) -> str:
        """The dtype the frozen bank model runs in: bf16 with bf16-mixed, float32 otherwise."""
        return "bfloat16" if self.precision.startswith("bf16") else "float32"


def recipe_files(recipe: str) -> list[Path]:
    return [RECIPES / "base.yaml", RECIPES / f"{recipe}.yaml"]


def merged_recipe(recipe: str) -> dict[str, Any]:
    """The recipe's config as train.py reads it (later file wins, nested keys merged)."""
    merged: dict[str, Any] = {}
    for path in recipe_files(recipe):
        merge_into(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def merge_into(target: dict[str, Any], source: dict[str, Any]) -> None:
    for key, value in source.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_into(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def pdm_options(case: Case, settings: RunSettings, inputs: Inputs) -> dict[str, str]:
    """The PDM settings a case's bank is built with (the same for our run and the plain loop: one cache entry)."""
    return {
        "teacher": case.pdm or "bank",
        "inversion_steps": str(settings.inversion_steps),
        "cache_dir": str(inputs.bank_cache),
        "compute_dtype": settings.half_dtype,
    }


def lightning_args(case: Case, settings: RunSettings, inputs: Inputs, run_dir: Path) -> list[str]:
    """train.py's options for ``case`` (without --trainer.max_steps, which the case runner sets)."""
    args: list[str] = []
    for path in recipe_files(case.recipe):
        args += ["--config", str(path)]
    args += [
        "--model.pretrained_model_name_or_path", str(inputs.model),
        "--data.instance_data_dir", str(inputs.photos),
        "--data.instance_prompt", INSTANCE_PROMPT,
        "--data.class_prompt", CLASS_PROMPT,
        "--data.with_prior_preservation", str(case.prior).lower(),
        "--data.class_data_dir", str(inputs.class_images),
        "--data.num_class_images", str(inputs.num_class_images),
        "--data.resolution", str(settings.resolution),
        "--data.train_batch_size", str(settings.batch_size),
        "--data.num_workers", str(settings.num_workers),
        "--data.masks.auto_mask_model", "null",
        "--trainer.accelerator", "gpu" if settings.device == "cuda" else "cpu",
        "--trainer.devices", "1",
        "--trainer.precision", settings.trainer_precision,
        "--trainer.logger.init_args.save_dir", str(run_dir),
    ]
    uses_masks = settings.masks and case.recipe.startswith("pdmbooth")
    if uses_masks:  # the recipe's masked losses, with the bundled masks instead of CLIPSeg's
        args += ["--data.masks.instance_mask_dir", str(inputs.masks)]
    else:
        args += ["--data.masks.mask_instance_loss", "false", "--data.masks.mask_pdm_loss", "false"]
    args += ["--checkpoint.every_n_train_steps", "1000000", "--samples.at_fit_end", "false"]
    if not settings.outputs:  # only the steps are timed: no end-of-fit checkpoint or export either
        args += ["--checkpoint.save_last", "false"]
    if case.pdm:
        for key, value in pdm_options(case, settings, inputs).items():
            args += [f"--model.pdm.{key}", value]
    return args + list(case.extra) + list(settings.extra_args)


def plain_spec(case: Case, settings: RunSettings, inputs: Inputs) -> dict[str, Any]:
    """The plain loop's settings, read off the same recipe files as our run of the case."""
    config = merged_recipe(case.recipe)
    model, trainer = config.get("model", {}), config.get("trainer", {})
    lora = model.get("lora")
    pdm = model.get("pdm") if case.pdm else None
    return {
        "model": str(inputs.model),
        "photos": str(inputs.photos),
        "class_images": str(inputs.class_images) if case.prior else None,
        "num_class_images": inputs.num_class_images,
        "instance_prompt": INSTANCE_PROMPT,
        "class_prompt": CLASS_PROMPT,
        "resolution": settings.resolution,
        "batch_size": settings.batch_size,
        "train_text_encoder": bool(model.get("train_text_encoder", False)),
        "learning_rate": float(model.get("learning_rate", 1e-6)),
        "prior_loss_weight": float(model.get("prior_loss_weight", 1.0)),
        "optimizer": {key: value for key, value in (model.get("optimizer") or {}).items() if key.startswith("adam_")},
        "gradient_clip_val": trainer.get("gradient_clip_val"),
        "lora": None if lora is None else {
            "rank": int(lora.get("rank", 4)),
            "alpha": lora.get("alpha"),
            "init_lora_weights": lora.get("init_lora_weights", "gaussian"),
        },
        "pdm": None if pdm is None else {
            "weight": pdm.get("weight") if pdm.get("weight") is not None else (0.05 if lora else 0.1),
            **pdm_options(case, settings, inputs),
        },
        "precision": settings.trainer_precision,
    }


def bank_spec(case: Case, settings: RunSettings, inputs: Inputs, photos: list[Path]) -> dict[str, Any]:
    chosen = photos[:1] if case.bank_photos == "one" else photos
    return {
        "model": str(inputs.model),
        "images": [str(p) for p in chosen],
        "class_prompt": CLASS_PROMPT,
        "resolution": settings.resolution,
        "inversion_steps": settings.bank_inversion_steps,
        "compute_dtype": settings.half_dtype,
        "batch_size": len(chosen) if case.bank_batched else 1,
        "compile_unet": case.bank_compile,
    }


def case_spec(case: Case, settings: RunSettings, inputs: Inputs, run_dir: Path, count_flops: bool) -> dict[str, Any]:
    """Everything ``python -m benchmarks.run_case`` needs to run ``case`` once, as JSON-ready values."""
    common = {
        "name": case.name,
        "kind": case.kind,
        "device": settings.device,
        "threads": settings.threads,
        "steps": settings.steps,
        "warmup": settings.warmup,
        "count_flops": count_flops,
        "run_dir": str(run_dir),
    }
    if case.kind == "lightning":
        return {**common, "args": lightning_args(case, settings, inputs, run_dir), "outputs": settings.outputs,
                "flops_in_timed_step": settings.flops_in_timed_step, "model": str(inputs.model)}
    if case.kind == "plain":
        return {**common, **plain_spec(case, settings, inputs)}
    photos = sorted(p for p in inputs.photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return {**common, **bank_spec(case, settings, inputs, photos)}
