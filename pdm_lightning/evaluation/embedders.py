"""Image and text embeddings for the metrics: DINO CLS tokens, CLIP image and text embeddings, LPIPS.

Models load through transformers' ``from_pretrained`` (a hub id or a local folder); the image
processors fall back to their PIL implementations, so torchvision is not needed.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, CLIPModel
from transformers.utils import logging as transformers_logging

DEFAULT_DINO_MODEL = "facebook/dino-vits16"
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"


def _image_processor(model_name_or_path: str):  # noqa: ANN202 - a transformers image processor
    # Without torchvision transformers uses the PIL processors and says so once per class: expected here.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path)
    finally:
        transformers_logging.set_verbosity(verbosity)


def _features(output: torch.Tensor | object) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def embed_in_batches(items: Sequence, batch_size: int, embed, dim: int) -> torch.Tensor:  # noqa: ANN001
    """``embed`` (a chunk of items -> [n, dim] tensor) over ``items`` in chunks, as one float32 CPU tensor."""
    chunks = [embed(list(items[start : start + batch_size])).float().cpu() for start in range(0, len(items), batch_size)]
    return torch.cat(chunks) if chunks else torch.empty(0, dim)


class DinoEmbedder:
    """DINO ViT CLS-token embeddings (the protocol's: ViT-S/16)."""

    def __init__(self, model_name_or_path: str = DEFAULT_DINO_MODEL, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.processor = _image_processor(model_name_or_path)
        self.model = AutoModel.from_pretrained(model_name_or_path).eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        def embed(chunk: list[Image.Image]) -> torch.Tensor:
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values
            return self.model(pixel_values=pixels.to(self.device, self.model.dtype)).last_hidden_state[:, 0]

        return embed_in_batches(images, self.batch_size, embed, self.model.config.hidden_size)


class ClipEmbedder:
    """CLIP image and text embeddings in the shared projection space (the protocol's: ViT-B/32)."""

    def __init__(self, model_name_or_path: str = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu", batch_size: int = 32) -> None:
        self.processor = _image_processor(model_name_or_path)
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        self.model = CLIPModel.from_pretrained(model_name_or_path).eval().to(device)
        self.device, self.batch_size = torch.device(device), batch_size

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        def embed(chunk: list[Image.Image]) -> torch.Tensor:
            pixels = self.processor(images=chunk, return_tensors="pt").pixel_values
            return _features(self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype)))

        return embed_in_batches(images, self.batch_size, embed, self.model.config.projection_dim)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        def embed(chunk: list[str]) -> torch.Tensor:
            tokens = self.tokenizer(
                chunk, padding=True, truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt",
            ).to(self.device)
            return _features(self.model.get_text_features(**tokens))

        return embed_in_batches(texts, self.batch_size, embed, self.model.config.projection_dim)


LPIPS_SIZE = 256


def lpips_tensor(images: Sequence[Image.Image], size: int = LPIPS_SIZE) -> torch.Tensor:
    """Center-cropped squares resized to ``size``, as [n, 3, size, size] in [-1, 1] (LPIPS's input range)."""
    tensors = []
    for image in images:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        square = image.convert("RGB").crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        tensors.append(torch.from_numpy(np.asarray(square, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(tensors) if tensors else torch.empty(0, 3, size, size)


class LpipsDistance:
    """Per-pair LPIPS distances with torchmetrics' network; build it with :func:`load_lpips`."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        self.network, self.device = network.eval().to(device), device

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.network(a.to(self.device), b.to(self.device)).flatten().float().cpu()


def load_lpips(net_type: str = "alex", device: str | torch.device = "cpu") -> tuple[LpipsDistance | None, str | None]:
    """LPIPS if its backbone can be loaded, else (None, one line saying what is missing)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type)
    except ModuleNotFoundError:
        return None, (
            f"LPIPS-I / LPIPS-D left out: torchmetrics' LPIPS ({net_type}) needs torchvision, which is not installed; "
            "install the torchvision build matching your torch to report them."
        )
    except (OSError, RuntimeError, ValueError) as error:
        return None, (
            f"LPIPS-I / LPIPS-D left out: the LPIPS {net_type} backbone could not be loaded "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); it is downloaded on first use, "
            "so run once with network access or pre-fill the torch hub cache."
        )
    return LpipsDistance(metric.net, torch.device(device)), None
