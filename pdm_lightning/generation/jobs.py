"""Which images to generate: one job per image, its seed, and the batches they are sampled in.

Image k of every prompt is drawn from its own generator seeded with ``derive_seed(seed, k)``, so an
image depends only on (prompt, seed, k): not on the batch size, the number of prompts or the order
they are generated in. Batches for ``predict_step`` / ``test_step`` carry the jobs as plain dicts,
which Lightning's batch transfer leaves alone (``job_loader``, ``job_batch`` / ``unpack_job_batch``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from torch.utils.data import DataLoader

from pdm_lightning.core.seeding import derive_seed
from pdm_lightning.generation.prompts import collect_prompts
from pdm_lightning.generation.settings import (
    GenerationSettings,
    PredictSettings,
    require_positive,
)

# A job's kind: a prompt about the subject, or (the evaluation's PRES images) the class prompt alone.
SUBJECT, CLASS = "subject", "class"


@dataclass(frozen=True)
class ImageJob:
    """One image to generate: image ``image_index`` of prompt ``prompt_index``, from a generator seeded ``seed``."""

    prompt_index: int
    prompt: str
    image_index: int
    seed: int
    kind: str = SUBJECT

    @property
    def key(self) -> tuple[str, int, int]:
        """Identifies the image among a plan's (distributed samplers may repeat jobs to even out ranks)."""
        return self.kind, self.prompt_index, self.image_index


def plan_jobs(prompts: Sequence[str], num_images: int, seed: int, kind: str = SUBJECT) -> list[ImageJob]:
    """Every image to generate, prompt by prompt; image k of every prompt is seeded with derive_seed(seed, k)."""
    require_positive("The number of images per prompt", num_images)
    return [
        ImageJob(prompt_index, prompt, k, derive_seed(seed, k), kind)
        for prompt_index, prompt in enumerate(prompts)
        for k in range(num_images)
    ]


def predict_jobs(
    settings: PredictSettings, instance_prompt: str, identifier: str | None, class_noun: str | None
) -> list[ImageJob]:
    """The images ``train.py predict`` generates.

    ``identifier`` / ``class_noun`` fill the placeholders where the settings set none (the caller
    reads them off the run's prompts); without prompts or a prompts file the instance prompt is used.
    """
    inline = settings.prompts or ([] if settings.prompts_file else [instance_prompt])
    prompts = collect_prompts(
        inline, settings.prompts_file, settings.identifier or identifier, settings.class_noun or class_noun
    )
    return plan_jobs(prompts, settings.num_images_per_prompt, settings.seed)


def chunked(jobs: Sequence[ImageJob], batch_size: int) -> list[list[ImageJob]]:
    """The sampling batches; a list (not a generator) so that a bad batch_size fails at the call."""
    require_positive("batch_size", batch_size)
    return [list(jobs[start : start + batch_size]) for start in range(0, len(jobs), batch_size)]


def job_batch(items: Sequence[dict[str, Any]], generation: GenerationSettings, run_seed: int) -> dict[str, Any]:
    """A DataLoader batch of jobs (the ``collate_fn``): the jobs, how to sample them and the run's seed."""
    return {"jobs": list(items), "generation": asdict(generation.generation()), "run_seed": run_seed}


def unpack_job_batch(batch: Mapping[str, Any]) -> tuple[list[ImageJob], GenerationSettings]:
    """The jobs and sampler settings of a ``job_batch``."""
    return [ImageJob(**job) for job in batch["jobs"]], GenerationSettings(**batch["generation"])


def job_loader(jobs: Sequence[ImageJob], generation: GenerationSettings, batch_size: int, run_seed: int) -> DataLoader:
    """The jobs in batches of ``batch_size`` for ``predict_step`` / ``test_step``, each a ``job_batch``."""
    return DataLoader(
        [asdict(job) for job in jobs],
        batch_size=batch_size,
        collate_fn=partial(job_batch, generation=generation, run_seed=run_seed),
    )
