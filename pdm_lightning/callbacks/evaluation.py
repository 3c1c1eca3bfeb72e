"""The DreamBench evaluation as a callback.

``DreamBenchEvaluation`` turns ``train.py test`` / ``validate`` into the full protocol: it embeds the
images the module's ``test_step`` generates, computes the metrics of docs/method.md, logs them as ``eval/*``
and writes the reports. Its light version at checkpoint time is ``callbacks/quality_checkpoint.py``.
"""

from __future__ import annotations

import dataclasses
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from tqdm.auto import tqdm

from pdm_lightning.atomic import replace_directory
from pdm_lightning.data.images import list_image_files, load_rgb_image
from pdm_lightning.evaluation.embedders import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINO_MODEL,
    ClipEmbedder,
    DinoEmbedder,
    load_lpips,
    lpips_tensor,
)
from pdm_lightning.evaluation.metrics import (
    all_pairs_distance_mean,
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
from pdm_lightning.evaluation.settings import CLASS, SUBJECT, EvaluationPlan, request_key
from pdm_lightning.generate import make_grid, save_png_with_metadata, slugify


# The data module gives fit no validation batches on purpose (the full evaluation is for validate/test).
warnings.filterwarnings("ignore", message=r"Total length of `list` across ranks is zero", category=UserWarning)


def load_instance_images(folder: str | Path) -> list[Image.Image]:
    """The subject's real photos (EXIF-oriented RGB), as the data module reads them."""
    return [load_rgb_image(path) for path in list_image_files(folder, role="instance_data_dir")]


def evaluation_data(trainer: L.Trainer) -> Any:
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "evaluation_plan"):
        raise TypeError("The evaluation needs the DreamBoothDataModule (its evaluation settings and instance photos).")
    return datamodule


class DreamBenchEvaluation(L.Callback):
    """Metrics and reports of ``train.py test`` / ``validate`` (``--evaluation.*``).

    Outputs under ``<run>/<dirname>/<stage>/``: ``metrics.json`` (metrics, per-prompt metrics,
    settings, what was left out and why), ``metrics.csv`` (one row per prompt plus ``all``),
    ``grids/NN_<prompt>.png`` (a prompt's images side by side; ``grids/class_prompt.png`` for PRES)
    and ``images/`` (every generated image, prompt and seed in its PNG metadata). TensorBoard gets
    ``eval/<metric>`` scalars and the grids.

    Args:
        dino_model: DINO model id or folder (the protocol's: facebook/dino-vits16).
        clip_model: CLIP model id or folder (the protocol's: openai/clip-vit-base-patch32).
        lpips_net: LPIPS backbone; ``none`` leaves LPIPS out. Needs torchvision: without it LPIPS is
            left out with a message, never reported as 0.
        dirname: output folder under the run directory.
        embed_batch_size: images per embedding forward pass.
    """

    def __init__(
        self,
        dino_model: str = DEFAULT_DINO_MODEL,
        clip_model: str = DEFAULT_CLIP_MODEL,
        lpips_net: Literal["alex", "vgg", "squeeze", "none"] = "alex",
        dirname: str = "eval",
        embed_batch_size: int = 32,
    ) -> None:
        self.dino_model, self.clip_model, self.lpips_net = dino_model, clip_model, lpips_net
        self.dirname, self.embed_batch_size = dirname, embed_batch_size
        self.results: dict[str, Any] | None = None
        self._reset()

    def _reset(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._plan: EvaluationPlan | None = None
        self._out_dir: Path | None = None

    def _active(self, trainer: L.Trainer) -> bool:
        return trainer.state.fn in ("validate", "test") and not trainer.sanity_checking

    def output_dir(self, trainer: L.Trainer, stage: str) -> Path:
        return Path(trainer.log_dir or trainer.default_root_dir) / self.dirname / stage

    # -- hooks --------------------------------------------------------------------------------

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._start(trainer, pl_module, "validate")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module, "test")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._active(trainer):
            self._collect(outputs)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._active(trainer):
            self._finish(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module)

    # -- work ---------------------------------------------------------------------------------

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._reset()
        datamodule = evaluation_data(trainer)
        self._plan = datamodule.evaluation_plan()
        # Everything is written to a staging folder that replaces the previous results in one rename at
        # the end, so an interrupted evaluation never leaves a mix of old and new files.
        self._out_dir = self.output_dir(trainer, stage)
        self._staging = self._out_dir.with_name(f".{self._out_dir.name}.partial")
        if trainer.is_global_zero:
            if self._staging.exists():
                shutil.rmtree(self._staging)
            (self._staging / "images").mkdir(parents=True)
        trainer.strategy.barrier()
        device = pl_module.device
        self._dino = DinoEmbedder(self.dino_model, device, self.embed_batch_size)
        self._clip = ClipEmbedder(self.clip_model, device, self.embed_batch_size)
        self._real_paths = list_image_files(datamodule.hparams.instance_data_dir, role="instance_data_dir")
        real = [load_rgb_image(p) for p in self._real_paths]
        self._real_dino, self._real_clip = self._dino.images(real), self._clip.images(real)
        self._progress = tqdm(total=len(self._plan.requests), desc="Evaluating", unit="img", disable=trainer.global_rank != 0)

    def _collect(self, outputs: dict[str, Any]) -> None:
        requests, images = outputs["requests"], outputs["images"]
        dino, clip = self._dino.images(images), self._clip.images(images)
        for i, (request, image) in enumerate(zip(requests, images)):
            path = self._staging / "images" / image_file_name(request)
            save_png_with_metadata(image, path, {"prompt": request["prompt"], "seed": str(request["seed"]),
                                                 "steps": str(request["num_inference_steps"]),
                                                 "guidance_scale": str(request["guidance_scale"])})
            self._records.append({"key": request_key(request), "request": request, "dino": dino[i], "clip": clip[i], "path": str(path)})
        self._progress.update(len(requests))

    def _gathered_records(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        records = self._records
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            everyone: list[list[dict[str, Any]] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(everyone, records)
            records = [r for part in everyone for r in part]
        # Distributed samplers repeat a few requests to even out the ranks: keep one of each.
        unique = {r["key"]: r for r in records}
        return [unique[k] for k in sorted(unique)]

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._progress.close()
        records = self._gathered_records(trainer)
        plan = self._plan
        subject = sorted((r for r in records if r["request"]["kind"] == SUBJECT), key=lambda r: r["key"][1:])
        cls = [r for r in records if r["request"]["kind"] == CLASS]
        if not subject:
            raise RuntimeError("The evaluation generated no images: check --data.evaluation (prompts, num_images_per_prompt).")
        groups = [r["request"]["prompt_index"] for r in subject]
        prompt_clip = self._clip.texts(plan.prompts)
        gen_dino = torch.stack([r["dino"] for r in subject])
        gen_clip = torch.stack([r["clip"] for r in subject])
        class_dino = torch.stack([r["dino"] for r in cls]) if cls else None
        metrics: dict[str, float | None] = subject_metrics(
            gen_dino, gen_clip, prompt_clip[groups], groups, self._real_dino, self._real_clip, class_dino
        )
        left_out: dict[str, str] = {}
        lpips_distance, lpips_message = (None, "lpips_net is 'none'") if self.lpips_net == "none" else load_lpips(self.lpips_net, pl_module.device)
        generated_pixels = real_pixels = None
        if lpips_distance is not None:
            generated_pixels = lpips_tensor([_open(r["path"]) for r in subject])
            real_pixels = lpips_tensor([load_rgb_image(p) for p in self._real_paths])
            metrics["lpips_i"] = all_pairs_distance_mean(generated_pixels, real_pixels, lpips_distance)
            metrics["lpips_d"] = within_group_distance_mean(generated_pixels, groups, lpips_distance)
        else:
            left_out["lpips_i"] = left_out["lpips_d"] = lpips_message
            rank_zero_warn(lpips_message)
        left_out.update(undefined_metric_reasons(metrics, left_out))

        per_prompt = []
        for p, prompt in enumerate(plan.prompts):
            rows = [i for i, g in enumerate(groups) if g == p]
            if not rows:
                continue
            row_metrics = subject_metrics(gen_dino[rows], gen_clip[rows], prompt_clip[[p] * len(rows)], [p] * len(rows),
                                          self._real_dino, self._real_clip)
            row_metrics.pop("pres")
            if lpips_distance is not None:
                row_metrics["lpips_i"] = all_pairs_distance_mean(generated_pixels[rows], real_pixels, lpips_distance)
                row_metrics["lpips_d"] = within_group_distance_mean(generated_pixels[rows], [p] * len(rows), lpips_distance)
            per_prompt.append({"prompt": prompt, **present_metrics(row_metrics)})

        reported = present_metrics(metrics)
        pl_module.log_dict({f"eval/{name}": value for name, value in reported.items()}, rank_zero_only=False, sync_dist=False)
        datamodule = evaluation_data(trainer)
        self.results = {
            "metrics": reported,
            "metric_names": {k: METRIC_NAMES[k] for k in reported},
            "left_out": left_out,
            "subject": {"instance_data_dir": str(datamodule.hparams.instance_data_dir), "identifier": plan.identifier,
                        "class_noun": plan.class_noun, "num_real_images": len(self._real_paths)},
            "model": {"pretrained_model_name_or_path": str(pl_module.hparams.get("pretrained_model_name_or_path")),
                      "ckpt_path": str(trainer.ckpt_path) if trainer.ckpt_path else None, "global_step": trainer.global_step},
            "embedders": {"dino": self.dino_model, "clip": self.clip_model, "lpips": self.lpips_net},
            "settings": dataclasses.asdict(datamodule.evaluation),
            "num_generated": len(subject),
            "num_class_prompt_images": len(cls),
            "class_prompt": plan.pres_prompt,
            "per_prompt": per_prompt,
        }
        if trainer.is_global_zero:
            self._write_reports(trainer, subject, cls, per_prompt, reported)
        rank_zero_info("Evaluation: " + ", ".join(f"{METRIC_NAMES[k]} {v:.4f}" for k, v in reported.items())
                       + f" -> {self._out_dir}")

    def _write_reports(self, trainer: L.Trainer, subject: list[dict], cls: list[dict], per_prompt: list[dict], reported: dict) -> None:
        out = self._staging
        write_json_report(out / "metrics.json", self.results)
        write_csv_report(out / "metrics.csv", per_prompt, reported)
        columns = max(1, max(r["request"]["image_index"] for r in subject) + 1)
        grids: list[tuple[str, Image.Image]] = []
        for p, prompt in enumerate(self._plan.prompts):
            images = [_open(r["path"]) for r in subject if r["request"]["prompt_index"] == p]
            if images:
                grids.append((f"{p:02d}_{slugify(prompt)}", make_grid(images, columns)))
        if cls:
            grids.append(("class_prompt", make_grid([_open(r["path"]) for r in cls], len(cls))))
        for name, grid in grids:
            save_png(grid, out / "grids" / f"{name}.png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for name, grid in grids:
                    logger.experiment.add_image(f"eval/{name}", np.asarray(grid), trainer.global_step, dataformats="HWC")
        replace_directory(self._staging, self._out_dir)


# Why a metric can be None although its models loaded.
UNDEFINED_REASONS = {
    "dino_d": "needs 2 or more images per prompt", "clip_d": "needs 2 or more images per prompt",
    "lpips_d": "needs 2 or more images per prompt", "pres": "pres_num_images is 0",
}


def undefined_metric_reasons(metrics: dict[str, float | None], left_out: dict[str, str]) -> dict[str, str]:
    """The reason for each metric that came out None and is not in ``left_out`` yet (every absent metric is explained)."""
    return {name: reason for name, reason in UNDEFINED_REASONS.items() if metrics.get(name) is None and name not in left_out}


def image_file_name(request: dict[str, Any]) -> str:
    if request["kind"] == CLASS:
        return f"class_{request['image_index']:02d}.png"
    return f"{request['prompt_index']:02d}_{slugify(request['prompt'])}_{request['image_index']:02d}.png"


def _open(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")
