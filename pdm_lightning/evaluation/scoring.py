"""Scoring generated images against the subject's photos: embeddings, the DreamBench metrics, the reports.

``SubjectScorer`` embeds the real photos once and every generated image as it comes;
``score_subject`` computes the metrics of docs/method.md (overall and per prompt);
``evaluation_report`` / ``write_reports`` assemble and write what ``train.py test`` leaves behind;
``quality_scores`` is the light version scored while training. The callbacks only feed images in
and log what comes out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pdm_lightning.core.images import list_image_files, load_rgb_image
from pdm_lightning.evaluation.embedders import (
    ClipEmbedder,
    DinoEmbedder,
    load_lpips,
    lpips_tensor,
)
from pdm_lightning.evaluation.metrics import (
    all_pairs_distance_mean,
    all_pairs_mean,
    matched_pairs_mean,
    subject_metrics,
    within_group_distance_mean,
)
from pdm_lightning.evaluation.report import (
    METRIC_NAMES,
    present_metrics,
    save_png,
    write_csv_report,
    write_json_report,
)
from pdm_lightning.evaluation.settings import EvaluationPlan
from pdm_lightning.generation.files import (
    grid_name,
    image_file_name,
    make_grid,
    open_rgb,
    save_png_with_metadata,
)
from pdm_lightning.generation.jobs import CLASS, SUBJECT, ImageJob
from pdm_lightning.generation.settings import GenerationSettings

# Why a metric can be None although its models loaded.
UNDEFINED_REASONS = {
    "dino_d": "needs 2 or more images per prompt", "clip_d": "needs 2 or more images per prompt",
    "lpips_d": "needs 2 or more images per prompt", "pres": "pres_num_images is 0",
}


def undefined_metric_reasons(metrics: Mapping[str, float | None], left_out: Mapping[str, str]) -> dict[str, str]:
    """The reason for each metric that came out None and is not in ``left_out`` yet (every absent metric is explained)."""
    return {name: reason for name, reason in UNDEFINED_REASONS.items() if metrics.get(name) is None and name not in left_out}


@dataclass
class ScoredImage:
    """One generated image: its job, its DINO and CLIP embeddings, and the PNG it was written to."""

    job: ImageJob
    dino: torch.Tensor
    clip: torch.Tensor
    path: str


@dataclass
class SubjectScores:
    """One subject's metrics: overall (a left-out metric is absent), per prompt, and why any is absent."""

    metrics: dict[str, float]
    per_prompt: list[dict[str, Any]]
    left_out: dict[str, str]
    subject: list[ScoredImage]
    cls: list[ScoredImage]


class SubjectScorer:
    """The embedding models, and the subject's real photos (``instance_data_dir``) embedded once."""

    def __init__(
        self, instance_data_dir: str | Path, dino_model: str, clip_model: str, device: torch.device, batch_size: int = 32
    ) -> None:
        self.dino = DinoEmbedder(dino_model, device, batch_size)
        self.clip = ClipEmbedder(clip_model, device, batch_size)
        self.real_paths = list_image_files(instance_data_dir, role="instance_data_dir")
        real = [load_rgb_image(path) for path in self.real_paths]
        self.real_dino, self.real_clip = self.dino.images(real), self.clip.images(real)

    def embed_and_save(
        self, jobs: Sequence[ImageJob], images: Sequence[Image.Image], settings: GenerationSettings, folder: Path
    ) -> list[ScoredImage]:
        """Each image written to ``folder`` (prompt, seed and sampler in its metadata) and embedded."""
        dino, clip = self.dino.images(images), self.clip.images(images)
        scored = []
        for i, (job, image) in enumerate(zip(jobs, images)):
            path = folder / image_file_name(job)
            metadata = {"prompt": job.prompt, "seed": str(job.seed), "steps": str(settings.num_inference_steps),
                        "guidance_scale": str(settings.guidance_scale)}
            if settings.negative_prompt:
                metadata["negative_prompt"] = settings.negative_prompt
            save_png_with_metadata(image, path, metadata)
            scored.append(ScoredImage(job, dino[i], clip[i], str(path)))
        return scored

    def quality_scores(
        self, images: Sequence[Image.Image], jobs: Sequence[ImageJob], prompts: Sequence[str],
        dino_weight: float, clip_t_weight: float,
    ) -> dict[str, float]:
        """The light evaluation: DINO-I, CLIP-T and ``score = dino_weight * DINO-I + clip_t_weight * CLIP-T``."""
        prompt_clip = self.clip.texts(prompts)[[job.prompt_index for job in jobs]]
        dino_i = all_pairs_mean(self.dino.images(images), self.real_dino)
        clip_t = matched_pairs_mean(self.clip.images(images), prompt_clip)
        return {"dino_i": dino_i, "clip_t": clip_t, "score": dino_weight * dino_i + clip_t_weight * clip_t}


def score_subject(
    scorer: SubjectScorer, records: Sequence[ScoredImage], prompts: Sequence[str], lpips_net: str, device: torch.device
) -> SubjectScores:
    """The DreamBench metrics of one subject's generated images (``records``: one per job of the plan).

    LPIPS is left out (with the reason in ``left_out``) when ``lpips_net`` is ``none`` or cannot load.
    """
    subject = sorted((r for r in records if r.job.kind == SUBJECT), key=lambda r: r.job.key[1:])
    cls = [r for r in records if r.job.kind == CLASS]
    if not subject:
        raise RuntimeError("The evaluation generated no images: check --data.evaluation (prompts, num_images_per_prompt).")
    groups = [r.job.prompt_index for r in subject]
    prompt_clip = scorer.clip.texts(prompts)
    gen_dino = torch.stack([r.dino for r in subject])
    gen_clip = torch.stack([r.clip for r in subject])
    class_dino = torch.stack([r.dino for r in cls]) if cls else None
    metrics: dict[str, float | None] = subject_metrics(
        gen_dino, gen_clip, prompt_clip[groups], groups, scorer.real_dino, scorer.real_clip, class_dino
    )
    left_out: dict[str, str] = {}
    lpips_distance, lpips_message = (None, "lpips_net is 'none'") if lpips_net == "none" else load_lpips(lpips_net, device)
    generated_pixels = real_pixels = None
    if lpips_distance is not None:
        generated_pixels = lpips_tensor([open_rgb(r.path) for r in subject])
        real_pixels = lpips_tensor([load_rgb_image(p) for p in scorer.real_paths])
        metrics["lpips_i"] = all_pairs_distance_mean(generated_pixels, real_pixels, lpips_distance)
        metrics["lpips_d"] = within_group_distance_mean(generated_pixels, groups, lpips_distance)
    else:
        left_out["lpips_i"] = left_out["lpips_d"] = lpips_message
    left_out.update(undefined_metric_reasons(metrics, left_out))

    per_prompt = []
    for p, prompt in enumerate(prompts):
        rows = [i for i, g in enumerate(groups) if g == p]
        if not rows:
            continue
        row_metrics = subject_metrics(gen_dino[rows], gen_clip[rows], prompt_clip[[p] * len(rows)], [p] * len(rows),
                                      scorer.real_dino, scorer.real_clip)
        row_metrics.pop("pres")
        if lpips_distance is not None:
            row_metrics["lpips_i"] = all_pairs_distance_mean(generated_pixels[rows], real_pixels, lpips_distance)
            row_metrics["lpips_d"] = within_group_distance_mean(generated_pixels[rows], [p] * len(rows), lpips_distance)
        per_prompt.append({"prompt": prompt, **present_metrics(row_metrics)})
    return SubjectScores(present_metrics(metrics), per_prompt, left_out, subject, cls)


def evaluation_report(
    scores: SubjectScores,
    plan: EvaluationPlan,
    instance_data_dir: str | Path,
    num_real_images: int,
    model: Mapping[str, Any],
    embedders: Mapping[str, str],
    settings: Mapping[str, Any],
) -> dict[str, Any]:
    """``metrics.json``'s contents: metrics, what was left out and why, subject, model, settings, per prompt."""
    return {
        "metrics": scores.metrics,
        "metric_names": {k: METRIC_NAMES[k] for k in scores.metrics},
        "left_out": scores.left_out,
        "subject": {"instance_data_dir": str(instance_data_dir), "identifier": plan.identifier,
                    "class_noun": plan.class_noun, "num_real_images": num_real_images},
        "model": dict(model),
        "embedders": dict(embedders),
        "settings": dict(settings),
        "num_generated": len(scores.subject),
        "num_class_prompt_images": len(scores.cls),
        "class_prompt": plan.pres_prompt,
        "per_prompt": scores.per_prompt,
    }


def write_reports(out: Path, report: Mapping[str, Any], scores: SubjectScores, prompts: Sequence[str]) -> list[tuple[str, Image.Image]]:
    """``metrics.json``, ``metrics.csv`` and ``grids/`` in ``out``; returns the grids by name (for TensorBoard).

    A prompt's grid holds its images side by side; ``class_prompt`` holds the PRES images.
    """
    write_json_report(out / "metrics.json", report)
    write_csv_report(out / "metrics.csv", scores.per_prompt, scores.metrics)
    columns = max(1, max(r.job.image_index for r in scores.subject) + 1)
    grids: list[tuple[str, Image.Image]] = []
    for p, prompt in enumerate(prompts):
        images = [open_rgb(r.path) for r in scores.subject if r.job.prompt_index == p]
        if images:
            grids.append((grid_name(p, prompt), make_grid(images, columns)))
    if scores.cls:
        grids.append(("class_prompt", make_grid([open_rgb(r.path) for r in scores.cls], len(scores.cls))))
    for name, grid in grids:
        save_png(grid, out / "grids" / f"{name}.png")
    return grids
