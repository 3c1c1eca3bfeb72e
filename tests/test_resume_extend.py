"""A finished run extended with a larger max_steps and ckpt_path="last" ends where one uninterrupted run does.

The ``last.ckpt`` of a finished run is the one a user extends from (``--trainer.max_steps 2N
--ckpt_path last``). It must hold the training loop's state as it stood at the end of the final
step: a checkpoint taken after the loop has ended records the epoch the run stopped in as closed,
and the extended run then trains on the next epoch's data order (or skips an epoch).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT, build_cli
from test_resume import VARIANTS, trained_weights


def optimizer_state(trainer: L.Trainer) -> dict[str, object]:
    """Every optimizer and lr-scheduler state entry, keyed by a flat name, to compare two runs exactly."""
    flat: dict[str, object] = {}
    optimizer = trainer.optimizers[0].state_dict()
    for index, state in optimizer["state"].items():
        flat.update({f"state.{index}.{name}": value for name, value in state.items()})
    for index, group in enumerate(optimizer["param_groups"]):
        flat.update({f"group.{index}.{name}": value for name, value in group.items()})
    scheduler = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    flat.update({f"scheduler.{name}": value for name, value in scheduler.items() if name != "lr_lambdas"})
    return flat


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# A warm-up that the extension point falls in: constant_with_warmup does not depend on max_steps, so
# extending is exact. (Schedules stretched over max_steps, linear/cosine/polynomial, cannot be: the
# first run already decayed over its own length; the extension follows the longer schedule.)
EXTEND_VARIANTS = {
    **VARIANTS,
    "warmup": ["--model.optimizer.lr_scheduler", "constant_with_warmup", "--model.optimizer.lr_warmup_steps", "6"],
}
# 5 photos, batch 2: 3 batches an epoch. A first run of 4 steps ends part-way through its second
# epoch (the reported case); one of 3 ends exactly on an epoch boundary.
CASES = [("dreambooth", 4), ("dreambooth", 3), ("prior", 4), ("lora_pdm", 4), ("warmup", 4)]


@pytest.mark.parametrize(("variant", "first_steps"), CASES, ids=[f"{v}-{n}" for v, n in CASES])
def test_extended_run_matches_uninterrupted_run(
    tmp_path: Path,
    tiny_model_dir: Path,
    instance_dir: Path,
    variant: str,
    first_steps: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The quickstart config as it is (constant lr, samples and export at the end of each run: both
    # draw from the global RNG after the last step), with a short class-image generation.
    total_steps = 2 * first_steps
    overrides = [
        "--seed_everything", "7", "--data.num_class_images", "3",
        "--data.class_generation.num_inference_steps", "2", "--samples.num_inference_steps", "2",
        *EXTEND_VARIANTS[variant],
    ]
    if variant == "lora_pdm":
        monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
        overrides += ["--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks")]

    straight = build_cli(
        tmp_path / "straight", tiny_model_dir, instance_dir, "--trainer.max_steps", str(total_steps), *overrides
    )
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)

    run_dir = tmp_path / "extended"
    first = build_cli(run_dir, tiny_model_dir, instance_dir, "--trainer.max_steps", str(first_steps), *overrides)
    first.trainer.fit(first.model, datamodule=first.datamodule)
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == first_steps
    # The first run sampled and exported after its last step (both draw from the global RNG).
    assert (run_dir / "samples" / f"step_{first_steps:06d}").is_dir() and (run_dir / "export").is_dir()
    first_weights = trained_weights(first.model)

    extended = build_cli(run_dir, tiny_model_dir, instance_dir, "--trainer.max_steps", str(total_steps), *overrides)
    extended.trainer.fit(extended.model, datamodule=extended.datamodule, ckpt_path="last")
    assert extended.trainer.global_step == total_steps

    expected, actual = trained_weights(straight.model), trained_weights(extended.model)
    assert actual.keys() == expected.keys()
    mismatched = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not mismatched, (
        f"{len(mismatched)} tensors differ, by up to "
        f"{max((actual[k] - expected[k]).abs().max().item() for k in mismatched):.3g}, e.g. {mismatched[:3]}"
    )
    expected_opt, actual_opt = optimizer_state(straight.trainer), optimizer_state(extended.trainer)
    assert actual_opt.keys() == expected_opt.keys()
    assert [k for k in expected_opt if not same(actual_opt[k], expected_opt[k])] == []
    # Lightning's loop counters agree too (a post-loop checkpoint puts the extension one epoch ahead).
    assert extended.trainer.current_epoch == straight.trainer.current_epoch
    # The extension really trained: its weights moved on from the first run's.
    assert any(not torch.equal(first_weights[k], actual[k]) for k in actual)
