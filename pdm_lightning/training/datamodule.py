"""LightningDataModule: the subject's photos (and class images, and the PDM chunk) as training batches.

It turns files into batches and does nothing else: ``prepare_data`` hands the preparation (input
checks, subject masks, class images, the PDM bank) to ``pdm_lightning.prepare``; ``setup`` only
looks up what was prepared; the batch format is ``data.batch.Batch``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import CLIPTokenizer

from pdm_lightning.core.conditioning import tokenize
from pdm_lightning.core.errors import InputDataError
from pdm_lightning.core.loading import ModelSource
from pdm_lightning.data.batch import collate_examples
from pdm_lightning.prepare.class_images import ClassImageGeneration
from pdm_lightning.data.dataset import DreamBoothDataset
from pdm_lightning.data.masks import MaskSettings, resolve_class_masks, resolve_instance_masks
from pdm_lightning.data.sampler import ResumableDataLoader, ResumableSampler
from pdm_lightning.evaluation.settings import EvaluationPlan, EvaluationSettings, build_plan
from pdm_lightning.generation.jobs import job_loader, predict_jobs
from pdm_lightning.generation.settings import PredictSettings
from pdm_lightning.identifier import infer_identifier, warn_about_identifier
from pdm_lightning.pdm.settings import PDMSettings
from pdm_lightning.pdm.teacher import PDMTeacher
from pdm_lightning.prepare import RunInputs, check_inputs, prepare_inputs_distributed


class DreamBoothDataModule(L.LightningDataModule):
    """Instance photos + instance prompt, optionally class images + class prompt.

    Args:
        instance_data_dir: folder with the 3-5 photos of the subject (read only, never modified).
        instance_prompt: prompt with the identifier, e.g. "a photo of sks dog".
        base_model: the base model (train.py links it from ``--model.pretrained_model_name_or_path``,
            ``revision``, ``variant`` and ``vae_name_or_path``): its tokenizers (SDXL: two), and the model
            that generates class images and builds the PDM bank.
        with_prior_preservation: add the class chunk and the prior-preservation loss.
        class_data_dir: folder of class images; missing ones are generated into it.
        class_prompt: prompt of the class, e.g. "a photo of dog".
        num_class_images: how many class images the folder should hold.
        class_generation: settings for generating missing class images.
        resolution: training resolution (square crops); None: the base model's native size (SD1.5 512, SD2.1 768,
            SDXL 1024), read from its configs.
        center_crop: center-crop the instance images instead of random crops.
        train_batch_size: instance images per batch (each adds one class image with prior preservation).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the random crops.
        pdm: the PDM settings (train.py links them from ``--model.pdm``): with them each example also
            holds the PDM chunk (centre crop, trajectory timestep, teacher entries).
        masks: subject masks (user folder or automatic) and which losses they restrict.
        predict: what ``train.py predict`` generates (prompts, identifier, images per prompt, seed, sampler)
            into ``<run>/predictions``; its identifier (or the one read off the prompts) is checked before fit.
        evaluation: what ``validate`` / ``test`` generate for the DreamBench evaluation (prompts, images per
            prompt, sampler, seeds, PRES images); see docs/evaluation.md.
    """

    def __init__(
        self,
        instance_data_dir: str,
        instance_prompt: str,
        base_model: ModelSource | None = None,
        with_prior_preservation: bool = False,
        class_data_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 100,
        class_generation: ClassImageGeneration | None = None,
        resolution: int | None = None,
        center_crop: bool = False,
        train_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        pdm: PDMSettings | None = None,
        masks: MaskSettings = MaskSettings(),  # noqa: B008 - a frozen-in-practice settings record; the CLI links its switches
        predict: PredictSettings | None = None,
        evaluation: EvaluationSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if base_model is None:  # Optional only so that the CLI can link it in (a required record would be an option group)
            raise InputDataError("The data module needs base_model (ModelSource): train.py links it from --model.pretrained_model_name_or_path.")
        self.base_model = ModelSource(**base_model) if isinstance(base_model, dict) else base_model
        self.pdm = PDMSettings(**pdm) if isinstance(pdm, dict) else pdm
        self.resolution = resolution if resolution is not None else self._native_resolution()
        self.inputs = RunInputs(
            instance_data_dir=instance_data_dir,
            resolution=self.resolution,
            with_prior_preservation=with_prior_preservation,
            class_data_dir=class_data_dir,
            class_prompt=class_prompt,
            num_class_images=num_class_images,
            class_generation=class_generation or ClassImageGeneration(),
            masks=masks,
        )
        self.masks = masks
        self.instance_mask_files: dict[Path, Path] | None = None
        self.predict_settings = predict or PredictSettings()
        self.evaluation = evaluation or EvaluationSettings()
        self.train_dataset: DreamBoothDataset | None = None
        self._check_arguments()

    def _check_arguments(self) -> None:
        if not self.hparams.instance_prompt.strip():
            raise InputDataError("instance_prompt is empty: give a prompt with the identifier, e.g. 'a photo of sks dog'.")
        if self.hparams.with_prior_preservation:
            missing = [name for name in ("class_data_dir", "class_prompt") if not self.hparams[name]]
            if missing:
                raise InputDataError(
                    f"with_prior_preservation needs {' and '.join(missing)}: set them (e.g. --data.class_prompt "
                    "'a photo of dog' --data.class_data_dir class_images/dog) or turn prior preservation off."
                )
            if self.hparams.num_class_images < 1:
                raise InputDataError("num_class_images must be at least 1 with prior preservation.")
        if self.pdm is not None and not self.hparams.class_prompt:
            raise InputDataError(
                "The PDM loss needs class_prompt (the teacher bank inverts each photo conditioned on it): set "
                "--data.class_prompt, e.g. 'a photo of dog'."
            )
        if self.resolution < 8 or self.resolution % 8:
            raise InputDataError(f"resolution {self.resolution} must be a positive multiple of 8 (the VAE's factor).")

    def _native_resolution(self) -> int:
        """The base model's own image size (``--data.resolution`` unset): its UNet's sample_size x the VAE's factor."""
        try:
            self.base_model.check()
            return self.base_model.native_resolution()
        except (OSError, ValueError) as error:  # InputDataError is a ValueError
            raise InputDataError(
                f"--data.resolution is unset, so it is the base model's native size, which could not be read from "
                f"{self.base_model.pretrained_model_name_or_path} ({error}): set --data.resolution (e.g. 512 for SD1.5, "
                "1024 for SDXL) or fix the model path."
            ) from error

    @property
    def teacher(self) -> PDMTeacher | None:
        return PDMTeacher(self.pdm, self.base_model) if self.pdm is not None else None

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare_data(self) -> None:
        # Runs once per node before any model is loaded: bad inputs stop the run here.
        if self.trainer is not None and self.trainer.state.fn != "fit":
            # Evaluating or generating from a trained model needs no class images, masks or bank.
            self.inputs.instance_images()
            self.base_model.check()
            return
        prompts = {"instance_prompt": self.hparams.instance_prompt, "class_prompt": self.hparams.class_prompt}
        # Class images and the bank are built in setup, split across the ranks (pdm_lightning.prepare).
        check_inputs(self.inputs, self.base_model, self._device(), prompts)

    def _tokenize(self, tokenizers: Sequence[CLIPTokenizer], prompt: str) -> tuple[torch.Tensor, ...]:
        """The prompt's ids ([77]) for each tokenizer (SD: one; SDXL: two, each padded its own way)."""
        tokenizer = tokenizers[0]  # SDXL's two tokenizers share CLIP's BPE: the same length
        length = len(tokenizer(prompt).input_ids)
        if length > tokenizer.model_max_length:
            warnings.warn(
                f"The prompt {prompt!r} has {length} tokens; the text encoder reads only the first "
                f"{tokenizer.model_max_length}, so its end is ignored. Shorten it.",
                stacklevel=2,
            )
        return tuple(ids[0] for ids in tokenize(tokenizers, [prompt]))

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.train_dataset is not None:
            return
        # Every rank generates its share of the class images and builds its share of the bank, then waits for all.
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        prepare_inputs_distributed(self.inputs, self.base_model, self.teacher, self._device(), rank, world_size)
        instance_images = self.inputs.instance_images()
        tokenizers = self.base_model.tokenizers()
        tokenizer = tokenizers[0]
        identifier = self.predict_settings.identifier or infer_identifier(
            self.hparams.instance_prompt, self.hparams.class_prompt
        )[0]
        if identifier:
            warn_about_identifier(tokenizer, identifier)  # a split or common identifier binds the subject poorly
        class_images = None
        class_input_ids: tuple[torch.Tensor | None, ...] = (None, None)  # one per tokenizer
        if self.hparams.with_prior_preservation:
            # prepare_data decoded and counted them already: listing is enough here (700 images at 512 px).
            class_images = self.inputs.class_images()
            if not class_images:
                raise InputDataError(f"class_data_dir {self.hparams.class_data_dir} holds no images after preparation: set --data.num_class_images to at least 1 (the missing ones are generated), or turn prior preservation off.")
            class_input_ids = self._tokenize(tokenizers, self.hparams.class_prompt)
        # Masks and the bank were made above and in prepare_data: here they are only looked up (no model loads).
        device = self._device()
        if self.masks.needs_instance_masks:
            self.instance_mask_files = resolve_instance_masks(instance_images, self.masks, self.hparams.class_prompt, device)
        class_masks = None
        if self.masks.mask_prior_loss and class_images is not None:
            class_masks = resolve_class_masks(class_images, self.masks, self.hparams.class_prompt, device)
        teacher = self.teacher
        instance_input_ids = self._tokenize(tokenizers, self.hparams.instance_prompt)
        sdxl = len(tokenizers) == 2
        self.train_dataset = DreamBoothDataset(
            instance_images=instance_images,
            instance_input_ids=instance_input_ids[0],
            resolution=self.resolution,
            center_crop=self.hparams.center_crop,
            class_images=class_images,
            class_input_ids=class_input_ids[0],
            pdm_targets=teacher.entries(instance_images, self.hparams.class_prompt, self.resolution, tokenizers)
            if teacher is not None else None,
            instance_masks=self.instance_mask_files,
            class_masks=class_masks,
            instance_input_ids_2=instance_input_ids[1] if sdxl else None,
            class_input_ids_2=class_input_ids[1] if sdxl else None,
            with_time_ids=sdxl,  # SDXL conditions on each crop's size and position
        )

    def train_dataloader(self) -> ResumableDataLoader:
        assert self.train_dataset is not None, "setup('fit') builds the dataset"
        world_size, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
        sampler = ResumableSampler(self.train_dataset, num_replicas=world_size, rank=rank, seed=self.hparams.seed)
        return ResumableDataLoader(
            self.train_dataset,
            sampler=sampler,
            batch_size=self.hparams.train_batch_size,
            num_workers=self.hparams.num_workers,
            collate_fn=collate_examples,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def predict_dataloader(self) -> DataLoader:
        """One item per image to generate (``predict`` settings), in prompt order; see ``predict_step``."""
        settings = self.predict_settings
        # Placeholders the settings leave unset are read off the run's prompts.
        identifier, class_noun = infer_identifier(self.hparams.instance_prompt, self.hparams.class_prompt)
        jobs = predict_jobs(settings, self.hparams.instance_prompt, identifier, class_noun)
        return job_loader(jobs, settings, settings.batch_size, settings.seed)

    def evaluation_plan(self, **overrides: int | None) -> EvaluationPlan:
        """The evaluation's prompts and image jobs (``overrides``: see ``build_plan``)."""
        return build_plan(self.evaluation, self.hparams.instance_prompt, self.hparams.class_prompt, **overrides)

    def _evaluation_dataloader(self) -> DataLoader:
        plan = self.evaluation_plan()
        return job_loader(plan.jobs, plan.generation, self.evaluation.batch_size, self.evaluation.seed)

    def val_dataloader(self) -> DataLoader | list:
        # During fit the full evaluation would run every epoch: none there (QualityCheckpoint scores checkpoints).
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return self._evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader()
