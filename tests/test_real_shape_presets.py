"""The sd15 and sd21 presets at full size: built by the command line, loaded the way training loads a model,
trained for 2 LoRA steps on the CPU by train.py, and the exported LoRA loaded back by diffusers.

Slow (``make test-slow``; deselected by ``make test``): each preset is 1.07-1.29 B parameters, 4.3-5.2 GB
in float32, and each part below holds one copy in memory at a time (about 6 GB at the peak). On the 2-core
CPU all four tests took 4 min 11 s: building sd15 21 s, sd21 36 s; 2 LoRA steps + export 80 s and 101 s.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLE_SUBJECT, REPO_ROOT

from pdm_lightning.core.loading import ModelSource
from pdm_lightning.tiny import PRESETS, parameter_count

pytestmark = pytest.mark.slow

CONFIGS = REPO_ROOT / "configs" / "sd15"
SKS_DOG_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]  # "a photo of sks dog"


def run(command: list[str], cwd: Path, timeout: int = 900) -> tuple[str, float]:
    """Runs ``command`` with every core (big matrix products gain from threads), output and seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    start = time.perf_counter()
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output, time.perf_counter() - start


@pytest.fixture(scope="module", params=["sd15", "sd21"])
def preset_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The preset saved by ``python -m pdm_lightning.tiny --preset NAME`` (removed after its tests: GBs of disk)."""
    out = tmp_path_factory.mktemp("presets") / request.param
    output, seconds = run([sys.executable, "-m", "pdm_lightning.tiny", "--preset", request.param, str(out)], REPO_ROOT)
    for name, count in PRESETS[request.param].parameter_counts.items():
        assert f"{name}: {count:,} parameters" in output  # progress names each component with its size
    print(f"\n{request.param}: built and saved in {seconds:.0f} s")
    yield out
    shutil.rmtree(out)


def test_loads_through_the_training_path_with_published_sizes(preset_dir: Path) -> None:
    preset = preset_dir.name
    spec = PRESETS[preset]
    components = ModelSource(str(preset_dir)).components()  # what the module loads for training
    counts = {name: parameter_count(getattr(components, name)) for name in ("unet", "text_encoder", "vae")}
    assert counts == dict(spec.parameter_counts)
    assert components.tokenizer("a photo of sks dog").input_ids == SKS_DOG_IDS
    assert components.tokenizer.pad_token == ("!" if preset == "sd21" else "<|endoftext|>")
    assert components.noise_scheduler.config.prediction_type == spec.prediction_type
    assert components.unet.dtype == torch.float32
    for name in ("vocab.json", "merges.txt"):  # for transformers 4's slow tokenizer too
        assert (preset_dir / "tokenizer" / name).is_file()
    ids = components.tokenizer("a photo of sks dog", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = components.text_encoder(ids).last_hidden_state
    width = {"sd15": 768, "sd21": 1024}[preset]
    assert states.shape == (1, 77, width) and torch.isfinite(states).all()
    del components
    gc.collect()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")  # the second adapter, on purpose
def test_two_lora_steps_on_the_cpu_and_the_export_loads_back(preset_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    instance = Path(shutil.copytree(EXAMPLE_SUBJECT, tmp_path / "instance"))
    run_dir = tmp_path / "run"
    output, seconds = run([
        sys.executable, str(REPO_ROOT / "train.py"), "fit",
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "dreambooth_lora.yaml"),
        "--model.pretrained_model_name_or_path", str(preset_dir), "--data.instance_data_dir", str(instance),
        "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
        "--data.resolution", "256", "--data.num_workers", "0", "--samples.at_fit_end", "false",
        "--trainer.logger.init_args.save_dir", str(run_dir),
    ], tmp_path)
    print(f"\n{preset_dir.name}: 2 LoRA steps at 256 px + export in {seconds:.0f} s")
    assert "step 2/2 (100%)" in output and "loss nan" not in output
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert checkpoint["global_step"] == 2
    exported = load_file(run_dir / "export" / "lora" / "pytorch_lora_weights.safetensors")
    assert exported and all(torch.isfinite(t).all() for t in exported.values())
    assert (run_dir / "export" / "pdm_lightning_lora.safetensors").is_file()

    pipeline = StableDiffusionPipeline.from_pretrained(preset_dir)
    pipeline.load_lora_weights(run_dir / "export" / "lora", adapter_name="diffusers")
    pipeline.load_lora_weights(run_dir / "export" / "pdm_lightning_lora.safetensors", adapter_name="kohya")
    assert set(pipeline.get_list_adapters()["unet"]) == {"diffusers", "kohya"}
    # The trained (non-zero) up-projections arrive in the UNet, under both formats.
    key = next(k for k in sorted(exported) if k.endswith(".lora.up.weight") and exported[k].abs().sum() > 0)
    module = pipeline.unet.get_submodule(key.removeprefix("unet.").removesuffix(".lora.up.weight"))
    for adapter in ("diffusers", "kohya"):
        torch.testing.assert_close(module.lora_B[adapter].weight, exported[key])
