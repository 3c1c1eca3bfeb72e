"""Every shipped config parses and instantiates (module, data module, trainer, callbacks)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO_ROOT
from pdm_lightning.callbacks.export import ExportWeights
from pdm_lightning.cli import cli_main
from pdm_lightning.training.datamodule import DreamBoothDataModule
from pdm_lightning.training.module import DreamBoothModule

CONFIG_DIR = REPO_ROOT / "configs"
# A config in a folder is a delta over that folder's base (configs/sd15/base.yaml) or over the config
# named like the folder (configs/quickstart.yaml): LightningCLI merges several --config in order.
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


def config_args(config: Path) -> list[str]:
    """The --config arguments that run ``config``: its base first, when it has one."""
    if config.parent == CONFIG_DIR or config.name == "base.yaml":
        return ["--config", str(config)]
    base = config.parent / "base.yaml"
    if not base.is_file():
        base = CONFIG_DIR / f"{config.parent.name}.yaml"
    return ["--config", str(base), "--config", str(config)]


def test_configs_exist() -> None:
    names = {str(p.relative_to(CONFIG_DIR)) for p in CONFIGS}
    assert names >= {"quickstart.yaml", "quickstart/lora.yaml", "quickstart/pdm.yaml", "sd15/base.yaml", *RECIPES}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_config_instantiates(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # CI has no GPU: only the accelerator is overridden; weights load lazily, so no model is read.
    cli = cli_main([*config_args(config), "--trainer.accelerator", "cpu"], run=False)
    assert isinstance(cli.model, DreamBoothModule)
    assert isinstance(cli.datamodule, DreamBoothDataModule)
    assert cli.model.unet is None  # nothing loaded before fit
    # The base model is set once and linked into the data module.
    assert cli.datamodule.base_model == cli.model.source
    assert any(isinstance(cb, ExportWeights) for cb in cli.trainer.callbacks)
    assert cli.trainer.checkpoint_callback is not None


# The reference's published runs (PDMBooth scripts/run_all.py and run_all_lora.py; docs/method.md) and
# their DreamBooth baselines: (lora, prior preservation, PDM weight or None, masks on instance + PDM).
RECIPES = {
    "sd15/pdmbooth.yaml": (False, True, 0.1, True),
    "sd15/pdmbooth_lora.yaml": (True, False, 0.05, True),
    "sd15/dreambooth.yaml": (False, True, None, False),
    "sd15/dreambooth_lora.yaml": (True, False, None, False),
}


@pytest.mark.parametrize("config", sorted(RECIPES))
def test_recipes_carry_the_published_settings(config: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lora, prior, pdm_weight, masked = RECIPES[config]
    monkeypatch.chdir(tmp_path)
    cli = cli_main([*config_args(CONFIG_DIR / config), "--trainer.accelerator", "cpu"], run=False)
    model, data, trainer = cli.model.hparams, cli.datamodule, cli.trainer
    assert model.pretrained_model_name_or_path == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert data.hparams.resolution == 512 and data.hparams.train_batch_size == 1
    assert trainer.max_steps == 700 and trainer.gradient_clip_val == 1.0 and trainer.precision == "bf16-mixed"
    # The recipe names its own run folder; the logger class comes from the base config.
    assert type(trainer.logger).__name__ == "TensorBoardLogger"
    assert trainer.logger.save_dir == "runs/sd15_" + config.split("/")[1].removesuffix(".yaml")
    optimizer = cli.model.optimizer_config
    assert (optimizer.adam_beta1, optimizer.adam_beta2, optimizer.adam_weight_decay, optimizer.adam_epsilon) == (
        0.9, 0.999, 1e-2, 1e-8)
    assert optimizer.lr_scheduler == "constant" and optimizer.lr_warmup_steps == 0
    if lora:  # rank 4 on the UNet only, the reference's init, lr 1e-4
        assert model.learning_rate == 1e-4 and not model.train_text_encoder
        assert cli.model.lora.rank == 4 and cli.model.lora.alpha is None and cli.model.lora.init_lora_weights == "gaussian"
    else:  # full fine-tune: lr 1e-6 with the text encoder trained
        assert model.learning_rate == 1e-6 and model.train_text_encoder and cli.model.lora is None
    assert data.hparams.with_prior_preservation == prior
    if prior:
        assert data.hparams.num_class_images == 700 and model.prior_loss_weight == 1.0
    assert (cli.model.pdm is not None) == (pdm_weight is not None) == (data.pdm is not None)
    if pdm_weight is not None:
        assert cli.model.pdm.weight == pdm_weight == cli.model.pdm_loss_weight and data.pdm == cli.model.pdm
        assert cli.model.pdm.inversion_steps is None and cli.model.pdm.dtype == "float16"
    masks = data.masks
    assert (masks.mask_instance_loss, masks.mask_pdm_loss, masks.mask_prior_loss) == (masked, masked, False)
    assert (model.mask_instance_loss, model.mask_pdm_loss, model.mask_prior_loss) == (masked, masked, False)
    assert masks.instance_mask_dir is None  # the recipes' masks come from the automatic segmenter
    assert (masks.auto_mask_model is not None) == masked and model.mask_mode == masks.mode == "binary"


def test_print_config_lists_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    for option in ("pretrained_model_name_or_path", "instance_data_dir", "class_prompt", "num_class_images",
                   "with_prior_preservation", "prior_loss_weight", "resolution", "train_text_encoder", "learning_rate"):
        assert f"{option}:" in printed
    assert "# folder with the 3-5 photos of the subject" in printed  # each option's help above it


def test_a_truncated_option_name_is_an_error_not_an_abbreviation(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(REPO_ROOT / "configs" / "quickstart.yaml"), "--model.learning_rat", "3e-4",
                  "--print_config"])
    assert exit_info.value.code == 2
    assert "--model.learning_rat" in capsys.readouterr().err
