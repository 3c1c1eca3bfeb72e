"""Shared fixtures: the tiny random pipeline (built once per session) and copies of the example photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The tiny models' ops are too small to gain from intra-op threads; with other processes on the
# same cores, torch's spinning thread pool made a tiny UNet call up to 60x slower (measured).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the same for the train.py subprocesses some tests start

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_SUBJECT = REPO_ROOT / "examples" / "dog"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SD1.5-shaped pipeline (epsilon prediction), saved once and loaded through from_pretrained."""
    from pdm_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_v_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny pipeline with a v_prediction scheduler."""
    from pdm_lightning.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd-v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def clip_vocabulary_gz() -> Path:
    """CLIP's real ``bpe_simple_vocab_16e6.txt.gz``, sha256-checked, from the cache (``make install`` fills
    it; a missing file is fetched from PyPI's open_clip_torch wheel, or ``$PDM_LIGHTNING_CLIP_BPE``)."""
    from pdm_lightning.clip_vocab import vocabulary_gz

    return vocabulary_gz()


@pytest.fixture(scope="session")
def clip_tokenizer(clip_vocabulary_gz: Path):  # noqa: ANN201 - transformers CLIPTokenizer
    """CLIP's real tokenizer (49,408 tokens, 77 positions) converted from that file, as the sd15 preset saves it."""
    from pdm_lightning.clip_vocab import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture(scope="session")
def clip_tokenizer_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, clip_tokenizer) -> Path:
    """The tiny pipeline with CLIP's real tokenizer in place of its own: for code that only tokenizes (the
    identifier check, the 77-token warning). Its text encoder knows ~600 ids: never encode with it."""
    from pdm_lightning.clip_vocab import save_clip_tokenizer

    model = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("models") / "tiny-sd-clip-tokenizer"))
    save_clip_tokenizer(model / "tokenizer")
    return model


@pytest.fixture(scope="session")
def tiny_sdxl_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL-shaped pipeline (epsilon prediction), saved once and loaded through from_pretrained."""
    from pdm_lightning.tiny import save_preset_pipeline

    return save_preset_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl", "tiny-sdxl")


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Thousands of tiny UNet calls: with several busy processes, torch's thread pool only spins (60x slower).
    A test module asks for it with ``pytestmark = pytest.mark.usefixtures("one_cpu_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def instance_dir(tmp_path: Path) -> Path:
    """A writable copy of the bundled example subject (5 photos, 256 px)."""
    return Path(shutil.copytree(EXAMPLE_SUBJECT, tmp_path / "instance"))


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes, to show a folder was left untouched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.yaml"


def quickstart_args(run_dir: Path, model_dir: Path, instance_dir: Path, *overrides: str) -> list[str]:
    """The quickstart config pointed at test folders, short and without prior preservation unless overridden."""
    return [
        "--config", str(QUICKSTART_CONFIG),
        "--model.pretrained_model_name_or_path", str(model_dir),
        "--data.instance_data_dir", str(instance_dir),
        "--data.with_prior_preservation", "false",
        "--data.class_data_dir", str(run_dir.parent / "class_images"),
        "--trainer.logger.init_args.save_dir", str(run_dir),
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        *overrides,
    ]


def build_cli(run_dir: Path, model_dir: Path, instance_dir: Path, *overrides: str):
    """The LightningCLI as train.py builds it, without running a subcommand (model, data, trainer ready)."""
    from pdm_lightning.cli import cli_main

    return cli_main(quickstart_args(run_dir, model_dir, instance_dir, *overrides), run=False)
