"""LightningDataModule pairing the subject's photos with class images for prior preservation."""

from __future__ import annotations

import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from pdm_lightning.data.class_images import (
    MANIFEST_NAME,
    ClassImageGeneration,
    generate_class_images,
    list_class_images,
    resolve_generation_dtype,
)
from pdm_lightning.data.dataset import DreamBoothDataset, collate_examples
from pdm_lightning.data.images import InputDataError, validate_image_folder
from pdm_lightning.data.sampler import ResumableDataLoader, ResumableSampler
from pdm_lightning.model.loading import check_model_source, load_pipeline


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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.class_generation = class_generation or ClassImageGeneration()
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
        if self.hparams.resolution < 8 or self.hparams.resolution % 8:
            raise InputDataError(f"resolution {self.hparams.resolution} must be a positive multiple of 8 (the VAE's factor).")

    def _validate_instance_images(self) -> list[Path]:
        return validate_image_folder(
            self.hparams.instance_data_dir, role="instance_data_dir", resolution=self.hparams.resolution
        )

    def prepare_data(self) -> None:
        # Runs once per node before any model is loaded: bad inputs stop the run here.
        self._validate_instance_images()
        check_model_source(self.hparams.pretrained_model_name_or_path, self.hparams.revision)
        if not self.hparams.with_prior_preservation:
            return
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
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the generation pipeline's cached blocks back before training

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
        class_images = class_input_ids = None
        if self.hparams.with_prior_preservation:
            # prepare_data decoded and counted them already: listing is enough here (700 images at 512 px).
            class_images = list_class_images(self.hparams.class_data_dir)
            if not class_images:
                raise InputDataError(f"class_data_dir {self.hparams.class_data_dir} holds no images: prepare_data() generates them (the Trainer calls it first); call it before setup().")
            class_images = class_images[: self.hparams.num_class_images]
            class_input_ids = self._tokenize(tokenizer, self.hparams.class_prompt)
        self.train_dataset = DreamBoothDataset(
            instance_images=instance_images,
            instance_input_ids=self._tokenize(tokenizer, self.hparams.instance_prompt),
            resolution=self.hparams.resolution,
            center_crop=self.hparams.center_crop,
            class_images=class_images,
            class_input_ids=class_input_ids,
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
