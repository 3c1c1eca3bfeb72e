"""The DreamBench metrics (docs/method.md) as pure functions on embeddings (no model needed to test them).

Every similarity is the cosine of L2-normalised embeddings. Means over "all pairs" take every
(generated, real) combination; diversity means take the upper triangle (i < j) of the similarity
matrix among the images of ONE prompt, then average over prompts. A metric that cannot be
computed (e.g. diversity with one image per prompt) is None, never a made-up number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchmetrics.functional import pairwise_cosine_similarity


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[len(a), len(b)] cosine similarities between the rows of ``a`` and the rows of ``b``."""
    return pairwise_cosine_similarity(a.double(), b.double())


def all_pairs_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over every (row of a, row of b) pair (DINO-I, CLIP-I, PRES)."""
    return float(cosine_similarity_matrix(a, b).mean())


def matched_pairs_mean(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of row i of ``a`` with row i of ``b`` (CLIP-T: image i with its prompt)."""
    if a.shape != b.shape:
        raise ValueError(f"matched pairs need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def upper_triangle_mean(matrix: torch.Tensor) -> float | None:
    """Mean of the entries above the diagonal of a square matrix; None below 2 x 2."""
    n = matrix.shape[0]
    if n < 2:
        return None
    rows, cols = torch.triu_indices(n, n, offset=1)
    return float(matrix[rows, cols].double().mean())


def group_indices(groups: Sequence[int]) -> dict[int, list[int]]:
    """Row indices per group id (the prompt index of each generated image), in first-seen order."""
    by_group: dict[int, list[int]] = {}
    for row, group in enumerate(groups):
        by_group.setdefault(int(group), []).append(row)
    return by_group


def mean_or_none(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def diversity_per_group(embeddings: torch.Tensor, groups: Sequence[int]) -> dict[int, float | None]:
    """Per prompt: mean pairwise cosine similarity among its images (upper triangle). Lower = more diverse."""
    return {
        group: upper_triangle_mean(cosine_similarity_matrix(embeddings[rows], embeddings[rows]))
        for group, rows in group_indices(groups).items()
    }


def diversity(embeddings: torch.Tensor, groups: Sequence[int]) -> float | None:
    """DINO-D / CLIP-D: the per-prompt upper-triangle means, averaged over prompts."""
    return mean_or_none(list(diversity_per_group(embeddings, groups).values()))


PairDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Distances between paired images: two [n, 3, H, W] batches in -> [n] distances out (LPIPS)."""


def all_pairs_distance_mean(a: torch.Tensor, b: torch.Tensor, distance: PairDistance, chunk: int = 64) -> float:
    """Mean ``distance`` over every (image of a, image of b) pair (LPIPS-I)."""
    left = torch.arange(len(a)).repeat_interleave(len(b))
    right = torch.arange(len(b)).repeat(len(a))
    return _mean_distance(a, b, left, right, distance, chunk)


def within_group_distance_mean(images: torch.Tensor, groups: Sequence[int], distance: PairDistance, chunk: int = 64) -> float | None:
    """LPIPS-D: per prompt the mean ``distance`` over its image pairs i < j, averaged over prompts."""
    means = []
    for rows in group_indices(groups).values():
        if len(rows) < 2:
            continue
        upper_rows, upper_cols = torch.triu_indices(len(rows), len(rows), offset=1)
        index = torch.tensor(rows)
        means.append(_mean_distance(images, images, index[upper_rows], index[upper_cols], distance, chunk))
    return mean_or_none(means)


def _mean_distance(a: torch.Tensor, b: torch.Tensor, left: torch.Tensor, right: torch.Tensor, distance: PairDistance, chunk: int) -> float:
    total = 0.0
    for start in range(0, len(left), chunk):
        total += float(distance(a[left[start : start + chunk]], b[right[start : start + chunk]]).double().sum())
    return total / len(left)


def subject_metrics(
    generated_dino: torch.Tensor,
    generated_clip: torch.Tensor,
    prompt_clip: torch.Tensor,
    prompt_index: Sequence[int],
    real_dino: torch.Tensor,
    real_clip: torch.Tensor,
    class_dino: torch.Tensor | None = None,
) -> dict[str, float | None]:
    """DINO-I, CLIP-I, CLIP-T, DINO-D, CLIP-D and PRES for one subject.

    Args:
        generated_dino / generated_clip: embeddings of the generated images (one row per image).
        prompt_clip: CLIP text embedding of each generated image's prompt (same rows).
        prompt_index: the prompt of each generated image (groups for the diversity means).
        real_dino / real_clip: embeddings of the real instance photos.
        class_dino: DINO embeddings of images generated from the class prompt alone (PRES); None skips PRES.
    """
    return {
        "dino_i": all_pairs_mean(generated_dino, real_dino),
        "clip_i": all_pairs_mean(generated_clip, real_clip),
        "clip_t": matched_pairs_mean(generated_clip, prompt_clip),
        "dino_d": diversity(generated_dino, prompt_index),
        "clip_d": diversity(generated_clip, prompt_index),
        "pres": all_pairs_mean(class_dino, real_dino) if class_dino is not None and len(class_dino) else None,
    }
