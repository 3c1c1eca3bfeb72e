"""An interrupted run resumed with ckpt_path="last" ends exactly where an uninterrupted one does."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO_ROOT, build_cli


class InterruptAtStep(L.Callback):
    """Simulates a crash (pre-emption, power loss) just before optimizer step ``step`` runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def trained_weights(module: L.LightningModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters() if v.requires_grad}


VARIANTS = {
    "dreambooth": [],
    "prior": ["--data.with_prior_preservation", "true"],
    # Adapters with dropout (its RNG must resume too), text-encoder LoRA, the PDM chunk with masks.
    "lora_pdm": [
        "--model.lora.rank", "4", "--model.lora.dropout", "0.1", "--model.pdm", "{}",
        "--model.pdm.inversion_steps", "6", "--data.masks.mask_pdm_loss", "true",
        "--data.masks.mask_instance_loss", "true",
    ],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_resume_matches_uninterrupted_run(
    tmp_path: Path, tiny_model_dir: Path, instance_dir: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 photos, batch 2: 3 batches an epoch, so the crash (step 4) and the checkpoint it resumes
    # from (step 2) are mid-epoch and the run crosses epoch boundaries; warm-up + linear decay make
    # the lr schedule's state matter.
    overrides = [
        "--trainer.max_steps", "7", "--checkpoint.every_n_train_steps", "2",
        "--model.learning_rate", "1e-3", "--model.offset_noise", "0.05",
        "--model.optimizer.lr_scheduler", "linear", "--model.optimizer.lr_warmup_steps", "2",
        "--data.num_class_images", "3", "--data.class_generation.num_inference_steps", "2",
        "--samples.at_fit_end", "false", *VARIANTS[variant],
    ]
    if variant == "lora_pdm":
        monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
        overrides += ["--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks")]
    straight = build_cli(tmp_path / "straight", tiny_model_dir, instance_dir, *overrides)
    straight.trainer.fit(straight.model, datamodule=straight.datamodule)
    expected = trained_weights(straight.model)

    crashed = build_cli(tmp_path / "resumed", tiny_model_dir, instance_dir, *overrides)
    crashed.trainer.callbacks.append(InterruptAtStep(5))
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.trainer.fit(crashed.model, datamodule=crashed.datamodule)
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    assert not (tmp_path / "resumed" / "export").exists()  # no export from an interrupted run

    resumed = build_cli(tmp_path / "resumed", tiny_model_dir, instance_dir, *overrides)
    resumed.trainer.fit(resumed.model, datamodule=resumed.datamodule, ckpt_path="last")
    assert resumed.trainer.global_step == 7
    actual = trained_weights(resumed.model)
    assert actual.keys() == expected.keys()
    mismatched = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    # The resumed run really trained: its weights are not the checkpoint's.
    step4 = torch.load(tmp_path / "resumed" / "checkpoints" / "step=000004.ckpt", weights_only=False)["state_dict"]
    assert any(not torch.equal(step4[k], actual[k]) for k in actual)
