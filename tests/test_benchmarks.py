"""The benchmarks: the GPU check's CPU dry run gives every case with finite figures and the README table; the plain
PyTorch loop computes exactly our module's loss; an option train.py refuses makes a case "not available"."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO_ROOT

if str(REPO_ROOT) not in sys.path:  # benchmarks/ is not an installed package: importable from the checkout
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.cases import CASES, CASES_BY_NAME, RunSettings, lightning_args, plain_spec
from benchmarks.plain_loop import load_models, plain_loss
from benchmarks.readme_table import render
from benchmarks.workspace import Inputs, Workspace, unknown_option
from pdm_lightning.cli import cli_main
from pdm_lightning.core.seeding import derive_seed

DRY_RUN_CASES = [case for case in CASES if "compiled" not in case.name]  # gpu_check.sh --dry-run leaves these out


def finite_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_gpu_check_dry_run_gives_every_case_finite_figures_and_the_readme_table(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "OUT"}
    env.update(PYTHON=sys.executable, WORKDIR=str(tmp_path / "work"))
    done = subprocess.run(["bash", str(REPO_ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    document = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert set(document["cases"]) == {case.name for case in DRY_RUN_CASES}
    assert document["machine"]["cpu"] and document["versions"]["torch"] == torch.__version__
    assert document["settings"]["preset"] == "tiny" and document["settings"]["precision"] == "bf16-mixed"
    for name, entry in document["cases"].items():
        case = CASES_BY_NAME[name]
        if entry["status"] != "ok":
            assert not case.required, f"{name}: {entry['status']} ({entry.get('note')})"
            assert entry["status"] == "not available" and entry["note"], name
            continue
        assert finite_positive(entry["peak_memory_bytes"]), name
        if case.kind == "bank":
            assert finite_positive(entry["s_per_photo"]) and finite_positive(entry["flops_per_photo"]), name
            assert entry["faithful_bytes_per_photo"] == 1000 * entry["bytes_per_row"]
        else:
            assert finite_positive(entry["ms_per_step"]) and finite_positive(entry["flops_per_step"]), name
            assert math.isfinite(entry["first_loss"]), name
    # Every case that runs on a CPU ran; the GPU-only ones say why they did not.
    cpu_cases = [case.name for case in DRY_RUN_CASES if not case.cuda_only]
    assert [name for name in cpu_cases if document["cases"][name]["status"] != "ok"] == []
    # The plain loop trains the same thing: the same FLOPs as ours with every latent encoded each step.
    assert document["cases"]["plain_full_prior_pdm"]["flops_per_step"] == document["cases"]["full_prior_pdm_uncached"]["flops_per_step"]
    assert {r["label"] for r in document["ratios"]} >= {"ours / plain loop, full prior + PDM", "ours / plain loop, LoRA DreamBooth"}

    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table == render(document)
    assert "| case | ms/step |" in table and "| bank build (2 inversion steps) |" in table
    for entry in document["cases"].values():
        assert entry["label"] in table
    assert "ours / plain loop, full prior + PDM:" in table


@pytest.mark.parametrize("case_name", ["full_prior_pdm", "lora_prior_pdm"])
def test_the_plain_loop_computes_our_modules_loss(case_name: str, tiny_model_dir: Path, instance_dir: Path,
                                                   tmp_path: Path) -> None:
    """Step 0 of train.py and ``plain_loss`` on the same batch, weights and generator give the same loss, to the bit
    (latents encoded every step in both: our default caches the class and PDM chunks' posteriors instead)."""
    case = CASES_BY_NAME[case_name]
    settings = RunSettings(resolution=64, inversion_steps=2, extra_args=["--model.cache_latents", "false"])
    inputs = Inputs(model=tiny_model_dir, photos=instance_dir, masks=instance_dir,
                    class_images=Workspace(tmp_path).class_images(2, 64), num_class_images=2,
                    bank_cache=tmp_path / "bank", runs=tmp_path / "runs")
    cli = cli_main([*lightning_args(case, settings, inputs, tmp_path / "run"), "--trainer.max_steps", "1",
                    "--trainer.enable_progress_bar", "false"], run=False)
    seen = {}

    class Keep(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen["batch"], seen["loss"] = batch, float(outputs["loss"])

    cli.trainer.callbacks.append(Keep())
    cli.trainer.fit(cli.model, cli.datamodule)

    spec = plain_spec(case, settings, inputs)
    models = load_models(spec["model"], spec["precision"], torch.device("cpu"), spec["train_text_encoder"], spec["lora"],
                         pdm=True)
    batch = seen["batch"]
    assert batch.num_pdm == batch.num_instance == 1 and len(batch.pixel_values) == 3  # instance, class, PDM
    loss = plain_loss(models, batch.pixel_values, batch.input_ids, batch.num_instance,
                      torch.Generator().manual_seed(derive_seed(0, 0, 0)),  # our step 0's generator (noise_seed 0, rank 0)
                      spec["prior_loss_weight"], spec["pdm"]["weight"], batch.pdm_timesteps, batch.teacher["queries"])
    assert loss.detach().item() == seen["loss"]


def test_an_option_train_py_refuses_is_named_for_the_not_available_note(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--model.pretrained_model_name_or_path", "x", "--model.not_an_option_yet", "true"], run=False)
    assert exit_info.value.code == 2
    assert unknown_option(capsys.readouterr().err) == "--model.not_an_option_yet"


def test_the_readme_table_says_why_a_case_has_no_figures() -> None:
    document = {
        "date": "2026-01-02T03:04:05+00:00",
        "machine": {"cpu": "Some CPU", "cores": 2, "gpu": "NVIDIA H200"},
        "versions": {"torch": "2.11.0"},
        "settings": {"preset": "sd15", "resolution": 512, "batch_size": 1, "device": "cuda", "precision": "bf16-mixed",
                     "threads": 16, "repeats": 1, "steps": 5, "warmup": 2, "bank_inversion_steps": 50, "peak_tflops": 989.0},
        "cases": {
            "a": {"label": "full, prior + PDM", "kind": "lightning", "status": "ok", "ms_per_step": 250.0,
                  "ms_per_step_range": [240.0, 260.0], "peak_memory_bytes": 20 * 2**30, "flops_per_step": 3.0e12,
                  "mfu": 3.0e12 / 0.25 / 989e12, "memory_kind": "cuda_max_memory_allocated"},
            "b": {"label": "full, prior + PDM, torch.compile", "kind": "lightning", "status": "skipped",
                  "note": "the time budget would be exceeded"},
        },
        "ratios": [{"label": "compiled / eager", "value": 0.8}],
    }
    table = render(document)
    assert "| full, prior + PDM | 250.0 | 240.0-260.0 | 20 GiB | 3.00 T | 1.2% |" in table
    assert "| full, prior + PDM, torch.compile | skipped: the time budget would be exceeded |" in table
    assert "NVIDIA H200" in table and "torch.cuda.max_memory_allocated" in table and "- compiled / eager: 0.80" in table
    measured = render(document, measured_only=True)
    assert "| full, prior + PDM | 250.0 |" in measured and "| full, prior + PDM, torch.compile |" not in measured
    assert "Not run (time budget) or not available here: full, prior + PDM, torch.compile." in measured
