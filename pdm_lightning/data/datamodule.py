"""LightningDataModule pairing the subject's photos with class images for prior preservation."""

from __future__ import annotations

import warnings
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from diffusers import StableDiffusionPipeline
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import CLIPTextModel, CLIPTokenizer

from pdm_lightning.data.class_images import (
    MANIFEST_NAME,
    ClassImageGeneration,
    generate_class_images,
    list_class_images,
    resolve_generation_dtype,
)
from pdm_lightning.data.dataset import DreamBoothDataset, collate_examples
from pdm_lightning.data.images import InputDataError, validate_image_folder
from pdm_lightning.data.masks import MaskSettings, resolve_class_masks, resolve_instance_masks
from pdm_lightning.data.pdm_chunk import BankItems, PDMFeatures
from pdm_lightning.data.sampler import ResumableDataLoader, ResumableSampler
from pdm_lightning.evaluation.settings import EvaluationPlan, EvaluationSettings, build_plan, collate_requests
from pdm_lightning.generate import PredictSettings, collate_image_jobs, predict_jobs
from pdm_lightning.identifier import infer_identifier, warn_about_identifier
from pdm_lightning.model.loading import check_model_source, load_pipeline
from pdm_lightning.pdm.bank import (
    MODEL_HASHES_FILE,
    BankSettings,
    cached_bank_folder,
    class_condition,
    default_cache_root,
    ensure_cached_bank,
    open_bank,
)
from pdm_lightning.pdm.capture import DEFAULT_PDM_LAYER


class DreamBoothDataModule(L.LightningDataModule):
    """Instance photos + instance prompt, optionally class images + class prompt.

    Args:
        instance_data_dir: folder with the 3-5 photos of the subject (read only, never modified).
        instance_prompt: prompt with the identifier, e.g. "a photo of sks dog".
        pretrained_model_name_or_path: base model (set once: linked from the model's argument).
        revision: base model revision (linked from the model).
        variant: base model weight variant, e.g. "fp16" (linked from the model).
        with_prior_preservation: add the class chunk and the prior-preservation loss.
        class_data_dir: folder of class images; missing ones are generated into it.
        class_prompt: prompt of the class, e.g. "a photo of dog".
        num_class_images: how many class images the folder should hold.
        class_generation: settings for generating missing class images.
        resolution: training resolution (square crops).
        center_crop: center-crop the instance images instead of random crops.
        train_batch_size: instance images per batch (each adds one class image with prior preservation).
        num_workers: DataLoader worker processes.
        seed: seed of the shuffling and of the random crops.
        use_pdm_loss: add the PDM chunk (linked from the model's switch).
        pdm_layer: the UNet layer whose queries the bank holds (linked from the model).
        pdm_teacher: ``bank`` stores the teacher's queries, ``on_the_fly`` its latents (linked from the model).
        pdm_features: where the teacher bank comes from and how it is built.
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
        pretrained_model_name_or_path: str = "",
        revision: str | None = None,
        variant: str | None = None,
        with_prior_preservation: bool = False,
        class_data_dir: str | None = None,
        class_prompt: str | None = None,
        num_class_images: int = 100,
        class_generation: ClassImageGeneration | None = None,
        resolution: int = 512,
        center_crop: bool = False,
        train_batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        use_pdm_loss: bool = False,
        pdm_layer: str = DEFAULT_PDM_LAYER,
        pdm_teacher: Literal["bank", "on_the_fly"] = "bank",
        pdm_features: PDMFeatures | None = None,
        masks: MaskSettings = MaskSettings(),  # noqa: B008 - a frozen-in-practice settings record; the CLI links its switches
        predict: PredictSettings | None = None,
        evaluation: EvaluationSettings | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.class_generation = class_generation or ClassImageGeneration()
        self.pdm_features = pdm_features or PDMFeatures()
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
        if self.hparams.use_pdm_loss and not self.hparams.class_prompt:
            raise InputDataError(
                "use_pdm_loss needs class_prompt (the teacher bank inverts each photo conditioned on it): set "
                "--data.class_prompt, e.g. 'a photo of dog'."
            )
        if self.hparams.resolution < 8 or self.hparams.resolution % 8:
            raise InputDataError(f"resolution {self.hparams.resolution} must be a positive multiple of 8 (the VAE's factor).")

    def _validate_instance_images(self) -> list[Path]:
        return validate_image_folder(
            self.hparams.instance_data_dir, role="instance_data_dir", resolution=self.hparams.resolution
        )

    def prepare_data(self) -> None:
        # Runs once per node before any model is loaded: bad inputs stop the run here.
        instance_images = self._validate_instance_images()
        check_model_source(self.hparams.pretrained_model_name_or_path, self.hparams.revision)
        if self.trainer is not None and self.trainer.state.fn != "fit":
            return  # evaluating or generating from a trained model needs no class images, masks or bank
        if self.masks.needs_instance_masks:  # user masks are checked, automatic ones computed and cached
            resolve_instance_masks(instance_images, self.masks, self.hparams.class_prompt, self._generation_device())
        if self.hparams.with_prior_preservation:
            self._prepare_class_images()
        if self.hparams.use_pdm_loss and self.pdm_features.features_dir is None:
            report = ensure_cached_bank(
                self._bank_settings(),
                instance_images,
                self._bank_cache_root(),
                batch_size=self.pdm_features.batch_size,
                device=self._generation_device(),
            )
            rank_zero_info(f"PDM teacher bank: {report.computed} image(s) built, {report.reused} reused, in {report.folder}")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the generation models' cached blocks back before training

    def _prepare_class_images(self) -> None:
        if Path(self.hparams.class_data_dir).exists():  # a missing one is created for the generated images
            validate_image_folder(
                self.hparams.class_data_dir,
                role="class_data_dir",
                resolution=self.hparams.resolution,
                allow_empty=True,
                ignore=(MANIFEST_NAME,),
            )
        generate_class_images(
            self.hparams.class_data_dir,
            class_prompt=self.hparams.class_prompt,
            num_class_images=self.hparams.num_class_images,
            load_pipeline=self._load_generation_pipeline,
            settings=self.class_generation,
            resolution=self.hparams.resolution,
            base_model=self.hparams.pretrained_model_name_or_path,
            revision=self.hparams.revision,
        )
        if self.masks.mask_prior_loss:
            resolve_class_masks(self._class_images(), self.masks, self.hparams.class_prompt, self._generation_device())

    def _class_images(self) -> list[Path]:
        return list_class_images(self.hparams.class_data_dir)[: self.hparams.num_class_images]

    def _bank_settings(self) -> BankSettings:
        features = self.pdm_features
        return BankSettings(
            pretrained_model_name_or_path=self.hparams.pretrained_model_name_or_path,
            class_prompt=self.hparams.class_prompt,
            resolution=self.hparams.resolution,
            revision=self.hparams.revision,
            variant=self.hparams.variant,
            layer=self.hparams.pdm_layer,
            inversion_steps=features.inversion_steps,
            dtype=features.dtype,
            mode="latents" if self.hparams.pdm_teacher == "on_the_fly" else "bank",
            compute_dtype=features.compute_dtype,
        )

    def _bank_cache_root(self) -> Path:
        return Path(self.pdm_features.cache_dir) if self.pdm_features.cache_dir else default_cache_root()

    def _bank_folder(self) -> Path:
        """The user's precomputed folder, or the cache folder named after everything that determines the bank."""
        if self.pdm_features.features_dir is not None:
            return Path(self.pdm_features.features_dir)
        return cached_bank_folder(self._bank_settings(), self._bank_cache_root())

    def _pdm_targets(self, instance_images: list[Path], tokenizer: CLIPTokenizer) -> BankItems:
        settings = self._bank_settings()
        # The model's weights are hashed once and remembered in the cache root (not again on every rank).
        bank = open_bank(self._bank_folder(), instance_images, settings, self._bank_cache_root() / MODEL_HASHES_FILE)
        condition = None
        if self.hparams.pdm_teacher == "on_the_fly":
            # The pretrained text encoder's class condition (the trained one may drift from it).
            text_encoder = CLIPTextModel.from_pretrained(
                settings.pretrained_model_name_or_path, subfolder="text_encoder",
                revision=settings.revision, variant=settings.variant,
            )
            condition = class_condition(tokenizer, text_encoder, settings.class_prompt)
        return BankItems(bank, self.hparams.pdm_teacher == "on_the_fly", condition)

    def _generation_device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _load_generation_pipeline(self) -> StableDiffusionPipeline:
        device = self._generation_device()
        pipeline = load_pipeline(
            self.hparams.pretrained_model_name_or_path,
            self.hparams.revision,
            self.hparams.variant,
            dtype=resolve_generation_dtype(self.class_generation.precision, device),
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline.to(device)

    def _tokenize(self, tokenizer: CLIPTokenizer, prompt: str) -> torch.Tensor:
        length = len(tokenizer(prompt).input_ids)
        if length > tokenizer.model_max_length:
            warnings.warn(
                f"The prompt {prompt!r} has {length} tokens; the text encoder reads only the first "
                f"{tokenizer.model_max_length}, so its end is ignored. Shorten it.",
                stacklevel=2,
            )
        return tokenizer(
            prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids[0]

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.train_dataset is not None:
            return
        instance_images = self._validate_instance_images()
        tokenizer = CLIPTokenizer.from_pretrained(
            self.hparams.pretrained_model_name_or_path, subfolder="tokenizer", revision=self.hparams.revision
        )
        identifier = self.predict_settings.identifier or infer_identifier(
            self.hparams.instance_prompt, self.hparams.class_prompt
        )[0]
        if identifier:
            warn_about_identifier(tokenizer, identifier)  # a split or common identifier binds the subject poorly
        class_images = class_input_ids = None
        if self.hparams.with_prior_preservation:
            # prepare_data decoded and counted them already: listing is enough here (700 images at 512 px).
            class_images = self._class_images()
            if not class_images:
                raise InputDataError(f"class_data_dir {self.hparams.class_data_dir} holds no images: prepare_data() generates them (the Trainer calls it first); call it before setup().")
            class_input_ids = self._tokenize(tokenizer, self.hparams.class_prompt)
        # Masks and the bank were made in prepare_data: here they are only looked up (no model loads).
        device = self._generation_device()
        if self.masks.needs_instance_masks:
            self.instance_mask_files = resolve_instance_masks(instance_images, self.masks, self.hparams.class_prompt, device)
        class_masks = None
        if self.masks.mask_prior_loss and class_images is not None:
            class_masks = resolve_class_masks(class_images, self.masks, self.hparams.class_prompt, device)
        self.train_dataset = DreamBoothDataset(
            instance_images=instance_images,
            instance_input_ids=self._tokenize(tokenizer, self.hparams.instance_prompt),
            resolution=self.hparams.resolution,
            center_crop=self.hparams.center_crop,
            class_images=class_images,
            class_input_ids=class_input_ids,
            pdm_targets=self._pdm_targets(instance_images, tokenizer) if self.hparams.use_pdm_loss else None,
            instance_masks=self.instance_mask_files,
            class_masks=class_masks,
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
            collate_fn=partial(collate_examples, with_prior_preservation=self.hparams.with_prior_preservation),
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def predict_dataloader(self) -> DataLoader:
        """One item per image to generate (``predict`` settings), in prompt order; see ``predict_step``."""
        settings = self.predict_settings
        jobs = predict_jobs(settings, self.hparams.instance_prompt, self.hparams.class_prompt)
        return DataLoader(
            [asdict(job) for job in jobs],
            batch_size=settings.batch_size,
            collate_fn=partial(collate_image_jobs, generation=settings.generation(), run_seed=settings.seed),
        )

    def evaluation_plan(self, **overrides: int | None) -> EvaluationPlan:
        """The evaluation's prompts and generation requests (``overrides``: see ``build_plan``)."""
        return build_plan(self.evaluation, self.hparams.instance_prompt, self.hparams.class_prompt, **overrides)

    def _evaluation_dataloader(self) -> DataLoader:
        requests = self.evaluation_plan().requests
        return DataLoader(requests, batch_size=self.evaluation.batch_size, collate_fn=collate_requests)

    def val_dataloader(self) -> DataLoader | list:
        # During fit the full evaluation would run every epoch: none there (QualityCheckpoint scores checkpoints).
        if self.trainer is not None and self.trainer.state.fn == "fit":
            return []
        return self._evaluation_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_dataloader()
