"""The PDM loss: the student's appearance queries pulled towards the pretrained model's (pure tensor math)."""

from __future__ import annotations

import torch

from pdm_lightning.losses.diffusion import per_sample_mse


def pdm_loss(
    student_queries: torch.Tensor, teacher_queries: torch.Tensor, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over the batch of each element's MSE between its student and teacher queries.

    Args:
        student_queries: [B, tokens, dim], the hooked ``to_q`` output on the PDM chunk (LoRA delta included).
        teacher_queries: [B, tokens, dim], the pretrained model's queries for the same image and timestep.
        token_mask: optional [B, tokens] subject mask (1 = subject); each element's mean is then over its
            subject tokens only, so a small subject weighs as much as a large one.

    Every element is compared with its own image's teacher entry, timestep and mask (the reference
    implementation used element 0's for the whole batch).
    """
    if student_queries.shape != teacher_queries.shape:
        raise ValueError(
            f"Student queries {tuple(student_queries.shape)} and teacher queries {tuple(teacher_queries.shape)} differ: "
            "the feature bank was built for another layer or resolution."
        )
    mask = None if token_mask is None else token_mask.unsqueeze(-1)
    return per_sample_mse(student_queries, teacher_queries, mask).mean()
