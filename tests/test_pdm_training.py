"""The PDM loss inside training: per-element pairing of bank rows, timesteps and masks; on-the-fly == bank."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import EXAMPLE_SUBJECT, build_cli
from pdm_lightning.data.batch import collate_examples
from pdm_lightning.data.crops import load_training_crop
from pdm_lightning.losses.masks import mask_to_latent, mask_to_tokens
from pdm_lightning.losses.diffusion import per_sample_mse

PDM = ("--model.pdm", "{}", "--model.pdm.inversion_steps", "8", "--data.resolution", "64")


@pytest.fixture
def pdm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PDM_LIGHTNING_CACHE", str(tmp_path / "bank-cache"))
    return tmp_path


def write_masks(folder: Path, instance_dir: Path) -> Path:
    """A different subject region per photo, so a mix-up between elements changes the loss."""
    folder.mkdir()
    for index, photo in enumerate(sorted(instance_dir.glob("*.jpg"))):
        mask = Image.new("L", Image.open(photo).size, 0)
        width, height = mask.size
        ImageDraw.Draw(mask).rectangle((0, 0, width * (index + 1) // 6, height - 1), fill=255)
        mask.save(folder / f"{photo.stem}.png")
    return folder


def test_each_batch_element_uses_its_own_bank_row_timestep_and_mask(
    pdm_env: Path, tiny_model_dir: Path, instance_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    masks = write_masks(pdm_env / "masks", instance_dir)
    cli = build_cli(
        pdm_env / "run", tiny_model_dir, instance_dir, *PDM,
        "--data.masks.instance_mask_dir", str(masks), "--data.masks.mask_pdm_loss", "true",
        "--model.pdm.dtype", "float32",
    )
    module, data = cli.model, cli.datamodule
    data.prepare_data()
    data.setup("fit")
    module.configure_model()
    examples = [data.train_dataset[(0, 11)], data.train_dataset[(1, 12)]]
    assert examples[0].pdm.timestep != examples[1].pdm.timestep
    batch = collate_examples(examples)

    seen: dict[str, torch.Tensor] = {}
    layer = module.unet.get_submodule(module.pdm_teacher.layer)  # the rule's layer: SD1.5's is the paper's
    layer.register_forward_hook(lambda _m, _a, out: seen.__setitem__("queries", out.detach()))
    module.unet.register_forward_pre_hook(
        lambda _m, args: seen.__setitem__("timesteps", args[1].detach().clone())
    )
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "_step_generator", lambda: torch.Generator().manual_seed(0))
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, float(value)))
    module.training_step(batch, 0)

    # The PDM rows (after the 2 instance rows) were noised at each element's own trajectory timestep.
    timesteps = [int(e.pdm.timestep) for e in examples]
    assert seen["timesteps"][2:].tolist() == timesteps
    bank = data.train_dataset.pdm_targets.bank
    photos = data.train_dataset.instance_images
    expected = []
    for i, (photo, timestep) in enumerate(zip(photos[:2], timesteps)):
        teacher = bank.queries(torch.tensor([i]), torch.tensor([timestep]))
        _, mask = load_training_crop(photo, 64, None, masks / f"{photo.stem}.png")
        tokens = mask_to_tokens(mask_to_latent(mask[None], (8, 8)), teacher.shape[1])
        expected.append(per_sample_mse(seen["queries"][2 + i : 3 + i], teacher, tokens.unsqueeze(-1)))
    assert logged["train/loss_pdm"] == pytest.approx(torch.cat(expected).mean().item(), rel=1e-5)
    # Element 0's row, timestep or mask for both elements gives another value.
    wrong = per_sample_mse(
        seen["queries"][3:4], bank.queries(torch.tensor([0]), torch.tensor([timesteps[0]]))
    ).item()
    assert abs(expected[1].item() - wrong) > 1e-4


def first_pdm_loss(run_dir: Path, model_dir: Path, instance_dir: Path, *overrides: str) -> float:
    cli = build_cli(run_dir, model_dir, instance_dir, *PDM, "--model.pdm.dtype", "float32",
                    "--trainer.max_steps", "1", "--samples.at_fit_end", "false", *overrides)
    cli.trainer.fit(cli.model, cli.datamodule)
    return float(cli.trainer.callback_metrics["train/loss_pdm"])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_on_the_fly_teacher_gives_the_bank_targets(pdm_env: Path, tiny_model_dir: Path, instance_dir: Path, lora: bool) -> None:
    # Non-zero adapters: the on-the-fly teacher must switch them off to match the pretrained bank.
    extra = ("--model.lora.rank", "4", "--model.lora.init_lora_weights", "false") if lora else ()
    from_bank = first_pdm_loss(pdm_env / "bank", tiny_model_dir, instance_dir, *extra)
    on_the_fly = first_pdm_loss(pdm_env / "fly", tiny_model_dir, instance_dir, "--model.pdm.teacher", "on_the_fly", *extra)
    assert on_the_fly == pytest.approx(from_bank, rel=1e-4)


def test_pdm_quickstart_config_trains_with_masks_and_previews(pdm_env: Path, tiny_model_dir: Path) -> None:
    from conftest import REPO_ROOT
    from pdm_lightning.cli import cli_main

    instance = Path(shutil.copytree(EXAMPLE_SUBJECT, pdm_env / "instance"))
    run = pdm_env / "run"
    cli_main([
        "fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"),
        "--config", str(REPO_ROOT / "configs" / "quickstart" / "pdm.yaml"),
        "--model.pretrained_model_name_or_path", str(tiny_model_dir),
        "--data.instance_data_dir", str(instance),
        "--data.masks.instance_mask_dir", str(REPO_ROOT / "examples" / "dog_masks"),
        "--data.class_data_dir", str(pdm_env / "class_images"), "--data.num_class_images", "2",
        "--data.class_generation.num_inference_steps", "2", "--model.pdm.inversion_steps", "5",
        "--trainer.max_steps", "2", "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.enable_progress_bar", "false", "--samples.at_fit_end", "false",
    ])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run)).Reload()
    assert {"train/loss_pdm", "train/loss_instance", "train/loss_prior"} <= set(events.Tags()["scalars"])
    total, instance, prior, pdm = (events.Scalars(f"train/loss{t}") for t in ("", "_instance", "_prior", "_pdm"))
    for t, i, p, d in zip(total, instance, prior, pdm):  # docs/method.md: L_inst + 1.0 L_prior + 0.1 L_pdm
        assert t.value == pytest.approx(i.value + p.value + 0.1 * d.value, rel=1e-5)
    pdm_losses = [event.value for event in events.Scalars("train/loss_pdm")]
    assert pdm_losses and all(0.0 < value < float("inf") for value in pdm_losses)
    assert len(list((run / "masks").glob("*.png"))) == 5
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_a_precomputed_both_mode_folder_serves_either_teacher(pdm_env: Path, tiny_model_dir: Path, instance_dir: Path) -> None:
    """Banks extracted ahead with `python -m pdm_lightning.features --mode both` train with bank and on-the-fly teachers."""
    from pdm_lightning.features import main as features_main

    folder = pdm_env / "features"
    assert features_main([
        "--pretrained_model_name_or_path", str(tiny_model_dir), "--instance_data_dir", str(instance_dir),
        "--class_prompt", "a photo of dog", "--resolution", "64", "--inversion_steps", "8", "--dtype", "float32",
        "--mode", "both", "--out", str(folder), "--no_progress",
    ]) == 0
    losses = [
        first_pdm_loss(pdm_env / teacher, tiny_model_dir, instance_dir, "--model.pdm.features_dir", str(folder),
                       "--model.pdm.teacher", teacher)
        for teacher in ("bank", "on_the_fly")
    ]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    # The user's folder was used: nothing was built in the cache (only the model-hash memo lives there).
    assert not list((pdm_env / "bank-cache").rglob("*.safetensors"))


def test_pdm_loss_weight_defaults_to_the_method_values() -> None:
    from pdm_lightning.training.lora import LoraSettings
    from pdm_lightning.training.module import DreamBoothModule
    from pdm_lightning.pdm.settings import PDMSettings

    assert DreamBoothModule("unused", pdm=PDMSettings()).pdm_loss_weight == 0.1
    assert DreamBoothModule("unused", pdm=PDMSettings(), lora=LoraSettings()).pdm_loss_weight == 0.05
    assert DreamBoothModule("unused", pdm=PDMSettings(weight=0.2), lora=LoraSettings()).pdm_loss_weight == 0.2
